"""Request handlers: authenticate, limit, validate, run on the engine, and account (metrics + audit) exactly once.

Routes (`serving.routes`) only bind paths to these functions; the engine (`serving.backends`) knows nothing of keys,
limits or audit, so the built-in engine and the upstream gateway get the same treatment. The seams live apart:
in-flight accounting in `serving.inflight`, body I/O in `serving.body`, the SageMaker adapter in `serving.sagemaker`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from serving.auth import presented_key
from serving.backends.base import GenerationBody, RequestContext
from serving.body import ClientGoneError, parse_json, read_body, unless_disconnected
from serving.errors import APIError, bad_request, from_validation_error
from serving.inflight import CLIENT_CLOSED, AppState, InFlight, account, drain_deadline_error
from serving.protocol import (
    MAX_IGNORED_NAMED,
    MAX_MODEL_NAME_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    new_id,
)
from serving.sagemaker import InvocationsAdapter

log = logging.getLogger("serving.handlers")


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
        state.served_models.update(ids)
    except APIError as exc:
        account(state, ctx, key_id, "", exc.status, False, exc.code)
        return exc.response()
    account(state, ctx, key_id, "", 200, False, None)
    return JSONResponse(ModelList(data=[ModelCard(id=i) for i in ids]).model_dump())


async def retrieve_model(request: Request) -> JSONResponse:
    """`GET /v1/models/{model_id}`: one served model, or 404 in OpenAI's error shape (authenticated, audited)."""
    state: AppState = request.app.state.serving
    model_id = str(request.path_params["model_id"])
    ctx = RequestContext(new_id("req"), "models")
    key_id = "-"
    try:
        key_id = state.keys.authenticate(
            presented_key(request.headers), state.cfg.default_rpm, state.cfg.default_tpm
        ).key_id
        ids = await state.backend.model_ids()
        state.served_models.update(ids)
        if model_id not in ids:
            raise APIError(
                404, f"The model '{model_id[:MAX_MODEL_NAME_CHARS]}' does not exist.", code="model_not_found",
                param="model",
            )  # fmt: skip
    except APIError as exc:
        account(state, ctx, key_id, "", exc.status, False, exc.code)
        return exc.response()
    account(state, ctx, key_id, model_id, 200, False, None)
    return JSONResponse(ModelCard(id=model_id).model_dump())


# -- generation ------------------------------------------------------------------------------------------------------


def _context(request: Request) -> dict[str, Any]:
    """Validation context: the parameters this server's engine implements beyond the built-in engine's (a gateway's
    upstream capabilities, `UpstreamBackend.passthrough`), accepted and forwarded instead of refused."""
    state: AppState = request.app.state.serving
    return {"passthrough": getattr(state.backend, "passthrough", frozenset())}


async def completions(request: Request) -> Response:
    """`POST /v1/completions`."""
    context = _context(request)
    return await _generate(request, "completions", lambda raw: CompletionRequest.model_validate(raw, context=context))


async def chat_completions(request: Request) -> Response:
    """`POST /v1/chat/completions`."""
    context = _context(request)
    return await _generate(
        request, "chat_completions", lambda raw: ChatCompletionRequest.model_validate(raw, context=context)
    )


async def invocations(request: Request) -> Response:
    """SageMaker's inference route: an OpenAI chat/completions body, or `{"inputs", "parameters"}`."""
    state: AppState = request.app.state.serving
    if not state.default_model:  # gateway without --served-model-name: the upstream's first model
        try:
            state.default_model = (await state.backend.model_ids())[0]
            state.served_models.add(state.default_model)
        except (APIError, IndexError):
            return APIError(503, "Upstream engine is not ready.", code="unavailable", retry_after=5.0).response()

    adapter = InvocationsAdapter(state.default_model, _context(request))
    return await _generate(request, "invocations", adapter.parse, adapter.render, adapter)


async def _generate(
    request: Request,
    endpoint: str,
    parse: Callable[[Any], GenerationBody],
    render: Callable[[dict[str, Any], Any], Any] | None = None,
    adapter: InvocationsAdapter | None = None,
) -> Response:
    """One generation request, start to end: `_serve` runs its steps; every way it can end is answered here, and
    `InFlight` settles the limiter, the counters and the accounting exactly once, whichever way that is."""
    state: AppState = request.app.state.serving
    async with InFlight(state, endpoint) as req:
        try:
            return await _serve(request, req, parse, render, adapter)
        except APIError as exc:
            return req.refuse(exc)
        except ClientGoneError:
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
    adapter: InvocationsAdapter | None = None,
) -> Response:
    """authenticate -> draining? -> rate limit (RPM) -> read body (bounded) -> validate -> in-flight bound ->
    engine (tokenize, reserve tokens, queue) -> answer. Cheap checks first: nothing costly runs for a request the
    key's limits would refuse, and nothing is read beyond the body limit."""
    state = req.state
    req.admit(state.keys.authenticate(presented_key(request.headers), state.cfg.default_rpm, state.cfg.default_tpm))
    raw = parse_json(await read_body(request, state.max_request_bytes, state.cfg.body_timeout_s))
    body = _validate(parse, raw, req)
    if body.model is None:
        body.model = await _only_model(state)
    req.model = body.model  # accounted from here on, refusals included
    if isinstance(body, ChatCompletionRequest) and not req.ctx.request_id.startswith("chatcmpl-"):
        req.ctx.request_id = "chat" + req.ctx.request_id  # /invocations with a chat body: a chat completion's id
    asked = body.max_tokens
    if asked is not None and asked > state.cfg.max_tokens_cap:
        # clamped, not refused, as vLLM clamps to its --max-model-len room (see LocalBackend._sampling)
        body.max_tokens = state.cfg.max_tokens_cap
    req.take_slot()
    if body.stream:
        chunks = await state.backend.stream(body, req.ctx)
        if adapter is not None:  # /invocations: TGI's stream for a TGI body
            response: Response = req.stream(adapter.render_stream(chunks), done=adapter.sse_done)
        else:
            response = req.stream(chunks)
    else:
        result = await unless_disconnected(request, state.backend.complete(body, req.ctx))
        response = JSONResponse(render(result, raw) if render else result)
        req.end(200, None)
    _report(response, body, asked, req)
    return response


def _validate(parse: Callable[[Any], GenerationBody], raw: Any, req: InFlight) -> GenerationBody:
    """The parsed body (400 when invalid)."""
    try:
        body = parse(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
    req.model, req.stream_requested = body.model or "", body.stream
    return body


async def _only_model(state: AppState) -> str:
    """The model a body without `model` means: the one served model (400 when there are several)."""
    if state.default_model:
        return state.default_model
    ids = await state.backend.model_ids()
    if len(ids) != 1:
        raise bad_request(
            "This server serves several models: name one in 'model'.", param="model", code="model_required"
        )
    return ids[0]


def _report(response: Response, body: GenerationBody, asked: int | None, req: InFlight) -> None:
    """Tell the client what the server changed or dropped: headers, and the log for ignored fields."""
    applied = req.ctx.max_tokens
    if asked is not None and applied is not None and applied < asked:
        response.headers["X-Max-Tokens-Clamped"] = f"{asked}->{applied}"
    ignored = body.ignored_params
    if ignored:
        names = ",".join(ignored[:MAX_IGNORED_NAMED])
        response.headers["X-Ignored-Params"] = names
        log.info("request %s: ignored unknown fields: %s", req.ctx.request_id, names)
