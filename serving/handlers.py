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
from serving.auth import ApiKey, KeyStore, presented_key
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
    """What the handlers share: the config, the engine, keys, limits, metrics and the requests in flight."""

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
    """The client disconnected before its (non-streaming) answer was ready."""


# -- probes and metrics --------------------------------------------------------------------------------------------


async def healthz(request: Request) -> JSONResponse:
    """Liveness: 503 only when the engine is dead for good."""
    state: AppState = request.app.state.serving
    if await state.backend.alive():
        return JSONResponse({"status": "alive"})
    return JSONResponse({"status": "engine dead"}, status_code=503)


async def readyz(request: Request) -> JSONResponse:
    """Readiness: 503 while the engine is not ready or the server is draining."""
    state: AppState = request.app.state.serving
    ready = not state.draining and await state.backend.ready()
    state.metrics.ready.set(1 if ready else 0)
    if ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "draining" if state.draining else "not ready"}, status_code=503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    state: AppState = request.app.state.serving
    return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> JSONResponse:
    """`GET /v1/models`: the served model ids (authenticated, audited)."""
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
    """`POST /v1/completions`."""
    return await _generate(request, "completions", lambda raw: CompletionRequest.model_validate(raw))


async def chat_completions(request: Request) -> Response:
    """`POST /v1/chat/completions`."""
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
    """One generation request, start to end: `_serve` runs its steps; every way it can end is answered here, and
    `InFlight` settles the limiter, the counters and the accounting exactly once, whichever way that is."""
    state: AppState = request.app.state.serving
    async with InFlight(state, endpoint) as req:
        try:
            return await _serve(request, req, parse, render)
        except APIError as exc:
            return req.refuse(exc)
        except _ClientGoneError:
            req.end(CLIENT_CLOSED, "client_closed")
            return Response(status_code=CLIENT_CLOSED)
        except asyncio.CancelledError:
            if not req.cut_at_drain_deadline():
                raise
            error = drain_deadline_error()  # answer it instead of dying (see `cut_in_flight`)
            req.end(error.status, error.code)
            return error.response()
        except Exception:
            log.exception("request %s failed", req.ctx.request_id)
            req.end(500, "internal_error")
            return APIError(500, "Internal server error.", type_="server_error").response()


async def _serve(
    request: Request,
    req: InFlight,
    parse: Callable[[Any], GenerationBody],
    render: Callable[[dict[str, Any], Any], Any] | None,
) -> Response:
    """authenticate -> draining? -> rate limit (RPM) -> read body (bounded) -> validate -> in-flight bound ->
    engine (tokenize, reserve tokens, queue) -> answer. Cheap checks first: nothing costly runs for a request the
    key's limits would refuse, and nothing is read beyond the body limit."""
    state = req.state
    req.admit(state.keys.authenticate(presented_key(request.headers), state.cfg.default_rpm, state.cfg.default_tpm))
    raw = _parse_json(await _read_body(request, state.max_request_bytes, state.cfg.body_timeout_s))
    body = _validate(parse, raw, state.cfg.max_tokens_cap, req)
    req.take_slot()
    if body.stream:
        return req.stream(await state.backend.stream(body, req.ctx))
    result = await _unless_disconnected(request, state.backend.complete(body, req.ctx))
    response = JSONResponse(render(result, raw) if render else result)
    req.end(200, None)
    return response


def _validate(parse: Callable[[Any], GenerationBody], raw: Any, max_tokens_cap: int, req: InFlight) -> GenerationBody:
    """The parsed body (400 when invalid, or when it asks for more than `max_tokens_cap` tokens)."""
    try:
        body = parse(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
    req.model, req.stream_requested = body.model, body.stream  # accounted from here on, refusals included
    if body.max_tokens is not None and body.max_tokens > max_tokens_cap:
        raise bad_request(
            f"max_tokens={body.max_tokens} is above this server's limit of {max_tokens_cap}.", "max_tokens"
        )
    return body


class InFlight:
    """One generation request from arrival to its last byte (for a stream: until the stream ends), as an async
    context manager that owns what the request holds: the in-flight gauge, the RPM slot and token reservation
    (`serving.limits.Admission`), its place under the in-flight bound, and its entry in `AppState.active` (for the
    drain deadline).

    `end` (or `refuse`) settles all of that and writes the request's metrics and audit line, once. Leaving the
    `async with` without either (a cancellation that propagates) still releases everything, unaccounted. A stream
    hands the request over to its response body (`stream`): it ends when the last byte is written or the client
    goes away, not when the handler returns.
    """

    def __init__(self, state: AppState, endpoint: str) -> None:
        self.state = state
        self.ctx = RequestContext(new_id("cmpl" if endpoint != "chat_completions" else "chatcmpl"), endpoint)
        self.key_id = "-"
        self.model = ""
        self.stream_requested = False
        self._admission: Admission | None = None
        self._holds_slot = False
        self._handed_over = False
        self._released = False
        self._accounted = False
        self._task = asyncio.current_task()

    async def __aenter__(self) -> InFlight:
        self.state.metrics.inflight.inc()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._handed_over:
            self._release()

    def admit(self, key: ApiKey) -> None:
        """Refuse the request while draining, else count it against the key's RPM (429 when over) and let the
        engine reserve tokens against its TPM (`RequestContext.reserve`)."""
        self.key_id = self.ctx.key_id = key.key_id
        if self.state.draining:
            raise APIError(503, "Server is shutting down.", code="draining", retry_after=1.0)
        self._admission = self.state.limiter.admit(key)
        self.ctx.reserve = functools.partial(self.state.limiter.reserve, self._admission)

    def take_slot(self) -> None:
        """A place under the in-flight bound, or 503. The built-in engine also bounds its queue; this bound holds in
        gateway mode too, so memory stays bounded whatever the engine."""
        state = self.state
        if state.inflight >= state.cfg.inflight_limit:
            raise APIError(503, "Server is overloaded: too many requests in flight. Retry later.",
                           code="queue_full", retry_after=1.0)  # fmt: skip
        state.inflight += 1
        self._holds_slot = True
        self.track(self._task)

    def stream(self, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        """Hand the request over to its streaming response, which ends it."""
        response = StreamingResponse(
            _sse(self, chunks),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._handed_over = True
        return response

    def refuse(self, exc: APIError) -> Response:
        """End with an error the request raised. Refused before generating (4xx, or shed with 503: then its RPM slot
        comes back too), nothing is charged; failed while generating (500, 502), it is charged what it used."""
        if exc.status in (401, 429, 503):
            self.state.metrics.rejected.labels(reason=exc.code or str(exc.status)).inc()
        elif exc.status < 500:
            self.state.metrics.rejected.labels(reason="invalid").inc()
        shed = exc.status == 503
        self._settle(0 if exc.status < 500 or shed else self._used(), refund_request=shed)
        self.end(exc.status, exc.code)
        return exc.response()

    def end(self, status: int, code: str | None) -> None:
        """The request is over: charge what it used (unless already settled), account it, release what it held."""
        self._settle(self._used())
        if not self._accounted:
            self._accounted = True
            _account(self.state, self.ctx, self.key_id, self.model, status, self.stream_requested, code)
        self._release()

    def cut_at_drain_deadline(self) -> bool:
        """Whether a cancellation came from the drain deadline (`cut_in_flight`); if so it is withdrawn from the
        current task, which then answers the request instead of dying."""
        task = asyncio.current_task()
        if not self.ctx.cut or task is None:
            return False
        task.uncancel()
        return True

    def track(self, task: asyncio.Task[Any] | None) -> None:
        """The task serving the request now (the drain deadline cancels it)."""
        if task is not None:
            self.state.active[self.ctx] = task

    def _used(self) -> int:
        return self.ctx.prompt_tokens + self.ctx.completion_tokens

    def _settle(self, used: int, *, refund_request: bool = False) -> None:
        if self._admission is not None:  # a no-op once settled
            self.state.limiter.settle(self._admission, used, refund_request=refund_request)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._settle(self._used())
        self.state.active.pop(self.ctx, None)
        if self._holds_slot:
            self.state.inflight -= 1
        self.state.metrics.inflight.dec()


def drain_deadline_error() -> APIError:
    """What a request cut at the drain deadline answers (as JSON, or as a stream's error event)."""
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


async def _sse(req: InFlight, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format; errors after the first byte become an error event, then [DONE]. Ends
    the request (`InFlight.end`) when the stream ends, however it ends."""
    status, code = CLIENT_CLOSED, "client_closed"
    # the task writing this stream (not the handler's): the drain deadline cancels it
    req.track(asyncio.current_task())
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
        if not req.cut_at_drain_deadline():
            raise
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
        req.end(status, code)


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
