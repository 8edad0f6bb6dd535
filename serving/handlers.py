"""Request handlers: authenticate, limit, validate, run on the engine, and account (metrics + audit) exactly once.

Routes (`serving.routes`) only bind paths to these functions; the engine (`serving.backends`) knows nothing of keys,
limits or audit, so the built-in engine and the upstream gateway get the same treatment.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from serving import audit
from serving.auth import KeyStore, presented_key
from serving.backends.base import Backend, GenerationBody, RequestContext
from serving.config import ServingConfig
from serving.errors import APIError, bad_request, from_validation_error
from serving.limits import Admission, RateLimiter
from serving.metrics import Metrics
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SageMakerRequest,
    new_id,
)

log = logging.getLogger("serving.handlers")

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's convention for "client closed the request"


@dataclass
class AppState:
    cfg: ServingConfig
    backend: Backend
    keys: KeyStore
    metrics: Metrics
    default_model: str
    limiter: RateLimiter = field(default_factory=RateLimiter)
    draining: bool = False
    inflight: int = 0  # generation requests admitted and not finished (streams until their last byte)
    max_request_bytes: int = 1 << 20  # set from the config and the engine's context length (serving.server)
    # the task serving each admitted request (for a stream: the task writing it), for the drain deadline
    active: dict[RequestContext, asyncio.Task[Any]] = field(default_factory=dict)


class _ClientGoneError(Exception):
    pass


# -- probes and metrics --------------------------------------------------------------------------------------------


async def healthz(request: Request) -> JSONResponse:
    state: AppState = request.app.state.serving
    if await state.backend.alive():
        return JSONResponse({"status": "alive"})
    return JSONResponse({"status": "engine dead"}, status_code=503)


async def readyz(request: Request) -> JSONResponse:
    state: AppState = request.app.state.serving
    ready = not state.draining and await state.backend.ready()
    state.metrics.ready.set(1 if ready else 0)
    if ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "draining" if state.draining else "not ready"}, status_code=503)


async def metrics(request: Request) -> Response:
    state: AppState = request.app.state.serving
    return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> JSONResponse:
    state: AppState = request.app.state.serving
    ctx = RequestContext(new_id("req"), "models")
    key_id = "-"
    try:
        key_id = state.keys.authenticate(
            presented_key(request.headers), state.cfg.default_rpm, state.cfg.default_tpm
        ).key_id
        ids = await state.backend.model_ids()
    except APIError as exc:
        _account(state, ctx, key_id, "", exc.status, False, exc.code)
        return exc.response()
    _account(state, ctx, key_id, "", 200, False, None)
    return JSONResponse(ModelList(data=[ModelCard(id=i) for i in ids]).model_dump())


# -- generation ------------------------------------------------------------------------------------------------------


async def completions(request: Request) -> Response:
    return await _generate(request, "completions", lambda raw: CompletionRequest.model_validate(raw))


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat_completions", lambda raw: ChatCompletionRequest.model_validate(raw))


async def invocations(request: Request) -> Response:
    """SageMaker's inference route: an OpenAI chat/completions body, or `{"inputs", "parameters"}`."""
    state: AppState = request.app.state.serving
    if not state.default_model:  # gateway without --served-model-name: the upstream's first model
        try:
            state.default_model = (await state.backend.model_ids())[0]
        except (APIError, IndexError):
            return APIError(503, "Upstream engine is not ready.", code="unavailable", retry_after=5.0).response()

    def parse(raw: Any) -> GenerationBody:
        if not isinstance(raw, dict):
            raise bad_request("Body must be a JSON object.")
        if "messages" in raw:
            return ChatCompletionRequest.model_validate({"model": state.default_model, **raw})
        if "prompt" in raw:
            return CompletionRequest.model_validate({"model": state.default_model, **raw})
        if "inputs" in raw:
            sm = SageMakerRequest.model_validate(raw)
            if sm.parameters.return_full_text:
                request.state.prefix = sm.inputs
            return sm.to_completion(state.default_model)
        raise bad_request("Expected an OpenAI body ('messages' or 'prompt') or {'inputs', 'parameters'}.")

    def render(result: dict[str, Any], raw: Any) -> Any:
        if "inputs" in raw and "messages" not in raw and "prompt" not in raw:
            prefix = getattr(request.state, "prefix", "")
            return [{"generated_text": prefix + result["choices"][0]["text"]}]
        return result

    return await _generate(request, "invocations", parse, render)


async def _generate(
    request: Request,
    endpoint: str,
    parse: Callable[[Any], GenerationBody],
    render: Callable[[dict[str, Any], Any], Any] | None = None,
) -> Response:
    """authenticate -> draining? -> rate limit (RPM) -> read body (bounded) -> validate -> in-flight bound ->
    engine (tokenize, reserve tokens, queue) -> account. Cheap checks first: nothing costly runs for a request the key's
    limits would refuse, and nothing is read beyond the body limit."""
    state: AppState = request.app.state.serving
    ctx = RequestContext(new_id("cmpl" if endpoint != "chat_completions" else "chatcmpl"), endpoint)
    key_id, model, stream = "-", "", False
    state.metrics.inflight.inc()
    handed_off = admitted = False
    admission: Admission | None = None
    task = asyncio.current_task()
    try:
        key = state.keys.authenticate(presented_key(request.headers), state.cfg.default_rpm, state.cfg.default_tpm)
        key_id = key.key_id
        if state.draining:
            raise APIError(503, "Server is shutting down.", code="draining", retry_after=1.0)
        admission = state.limiter.admit(key)
        ctx.reserve = functools.partial(state.limiter.reserve, admission)
        raw = _parse_json(await _read_body(request, state.max_request_bytes, state.cfg.body_timeout_s))
        try:
            body = parse(raw)
        except ValidationError as exc:
            raise from_validation_error(exc) from exc
        model, stream = body.model, body.stream
        cap = state.cfg.max_tokens_cap
        if body.max_tokens is not None and body.max_tokens > cap:
            raise bad_request(f"max_tokens={body.max_tokens} is above this server's limit of {cap}.", "max_tokens")
        if state.inflight >= state.cfg.inflight_limit:
            # the built-in engine also bounds its queue; this bound holds in gateway mode too, so memory stays
            # bounded whatever the engine
            raise APIError(503, "Server is overloaded: too many requests in flight. Retry later.",
                           code="queue_full", retry_after=1.0)  # fmt: skip
        state.inflight += 1
        admitted = True
        if task is not None:
            state.active[ctx] = task

        def finish(status: int, code: str | None) -> None:
            state.active.pop(ctx, None)
            state.inflight -= 1
            assert admission is not None
            state.limiter.settle(admission, ctx.prompt_tokens + ctx.completion_tokens)
            _account(state, ctx, key_id, model, status, stream, code)
            state.metrics.inflight.dec()

        if stream:
            chunks = await state.backend.stream(body, ctx)
            handed_off = True
            return StreamingResponse(
                _sse(state, ctx, chunks, finish),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _unless_disconnected(request, state.backend.complete(body, ctx))
        finish(200, None)
        handed_off = True
        return JSONResponse(render(result, raw) if render else result)
    except APIError as exc:
        if exc.status in (401, 429, 503):
            state.metrics.rejected.labels(reason=exc.code or str(exc.status)).inc()
        elif exc.status < 500:
            state.metrics.rejected.labels(reason="invalid").inc()
        if admission is not None:
            # refused before generating (4xx, or shed with 503: then its RPM slot comes back too): nothing charged;
            # failed while generating (500, 502): charged what it used
            shed = exc.status == 503
            used = 0 if exc.status < 500 or shed else ctx.prompt_tokens + ctx.completion_tokens
            state.limiter.settle(admission, used, refund_request=shed)
        _account(state, ctx, key_id, model, exc.status, stream, exc.code)
        return exc.response()
    except _ClientGoneError:
        _account(state, ctx, key_id, model, CLIENT_CLOSED, stream, "client_closed")
        return Response(status_code=CLIENT_CLOSED)
    except asyncio.CancelledError:
        if not ctx.cut or task is None:
            raise
        task.uncancel()  # the drain deadline cut it (see serving.server): answer it instead of dying
        error = drain_deadline_error()
        _account(state, ctx, key_id, model, error.status, stream, error.code)
        return error.response()
    except Exception:
        log.exception("request %s failed", ctx.request_id)
        error = APIError(500, "Internal server error.", type_="server_error")
        _account(state, ctx, key_id, model, 500, stream, "internal_error")
        return error.response()
    finally:
        if not handed_off:
            state.active.pop(ctx, None)
            state.metrics.inflight.dec()
            if admitted:
                state.inflight -= 1
            if admission is not None:  # no-op when already settled (shed)
                state.limiter.settle(admission, ctx.prompt_tokens + ctx.completion_tokens)


def drain_deadline_error() -> APIError:
    return APIError(
        503, "Server is shutting down: the request was cut at the drain deadline. Retry it.",
        code="drain_deadline", retry_after=1.0,
    )  # fmt: skip


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (from Content-Length, before reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(size, limit)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise APIError(408, f"Request body not received within {timeout_s:g}s.", code="request_timeout") from exc
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413, f"Request body is larger than this server's limit of {limit} bytes (--max-request-bytes).",
        code="request_too_large",
    )  # fmt: skip


def _parse_json(data: bytes) -> Any:
    try:
        raw = json.loads(data)
        # a lone surrogate (`"\ud800"`) is valid JSON but no string a tokenizer (or our own JSON output) can encode
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request("Request body is not valid JSON.", code="invalid_json") from exc
    except UnicodeEncodeError as exc:
        raise bad_request("Request body holds a string with an unpaired surrogate.", code="invalid_json") from exc
    except RecursionError as exc:
        raise bad_request("Request body is nested too deeply.", code="invalid_json") from exc
    return raw


async def _sse(
    state: AppState,
    ctx: RequestContext,
    chunks: AsyncIterator[dict[str, Any]],
    finish: Callable[[int, str | None], None],
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format; errors after the first byte become an error event, then [DONE]."""
    status, code = CLIENT_CLOSED, "client_closed"
    task = asyncio.current_task()  # the task writing this stream (not the handler's): the drain deadline cancels it
    if task is not None:
        state.active[ctx] = task
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
        status, code = 200, None
        yield "data: [DONE]\n\n"
    except APIError as exc:
        status, code = exc.status, exc.code
        yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:
        if not ctx.cut or task is None:
            raise
        task.uncancel()
        error = drain_deadline_error()
        status, code = error.status, error.code
        yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    except Exception:
        log.exception("stream failed")
        status, code = 500, "internal_error"
        yield f"data: {json.dumps(APIError(500, 'Internal server error.', type_='server_error').body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # shielded: when the client disconnects this runs inside a cancelled scope, and the engine must still hear
        # that the request is gone (local: stop decoding it; upstream: close the upstream stream)
        with anyio.CancelScope(shield=True):
            await chunks.aclose()  # type: ignore[attr-defined]
        finish(status, code)


def cut_in_flight(state: AppState) -> int:
    """The drain deadline: cancel every request still in flight; each answers with a `drain_deadline` error (JSON
    or a stream error event) and its audit line, instead of the server's plain-text 500 at its own deadline."""
    cut = 0
    for ctx, task in list(state.active.items()):
        if not task.done():
            ctx.cut = True
            task.cancel()
            cut += 1
    return cut


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it if the client disconnects first (the engine then drops the request)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGoneError()
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})


def _account(
    state: AppState, ctx: RequestContext, key_id: str, model: str, status: int, stream: bool, code: str | None
) -> None:
    latency = time.monotonic() - ctx.started
    m = state.metrics
    m.requests.labels(endpoint=ctx.endpoint, status=str(status)).inc()
    m.latency.labels(endpoint=ctx.endpoint).observe(latency)
    if ctx.ttft_s is not None:
        m.ttft.labels(endpoint=ctx.endpoint).observe(ctx.ttft_s)
    m.prompt_tokens.inc(ctx.prompt_tokens)
    m.generated_tokens.inc(ctx.completion_tokens)
    audit.write(
        audit.AuditRecord(
            request_id=ctx.request_id,
            key_id=key_id,
            endpoint=ctx.endpoint,
            model=model,
            status=status,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            latency_ms=round(latency * 1000, 2),
            ttft_ms=None if ctx.ttft_s is None else round(ctx.ttft_s * 1000, 2),
            stream=stream,
            finish_reason=ctx.finish_reason,
            error_code=code,
        )
    )
