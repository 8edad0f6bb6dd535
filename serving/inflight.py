"""In-flight accounting: what the handlers share (`AppState`), and one generation request from arrival to its last
byte (`InFlight`): its RPM slot and token reservation, its place under the in-flight bound, the drain deadline, and
its metrics and audit line, written exactly once however it ends."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Response
from fastapi.responses import StreamingResponse

from serving import audit
from serving.auth import ApiKey, KeyStore
from serving.backends.base import Backend, RequestContext
from serving.config import ServingConfig
from serving.errors import APIError
from serving.limits import Admission, RateLimiter
from serving.metrics import Metrics
from serving.protocol import new_id

log = logging.getLogger("serving.handlers")

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
    # model ids known to be served (the engine's, what /v1/models listed, what a request was answered for): the
    # audit log records a request's `model` only when it is one of these, never a client's arbitrary string
    served_models: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.default_model:
            self.served_models.add(self.default_model)


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
        self._reserved = False
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
        self.ctx.reserve = self._reserve

    def _reserve(self, tokens: int) -> None:
        """The engine's reservation of the key's tokens (`RequestContext.reserve`); 429 when they do not fit."""
        assert self._admission is not None
        self.state.limiter.reserve(self._admission, tokens)
        self._reserved = True

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

    def stream(self, chunks: AsyncIterator[dict[str, Any]], *, done: bool = True) -> StreamingResponse:
        """Hand the request over to its streaming response, which ends it (`done`: end with `data: [DONE]`)."""
        response = StreamingResponse(
            _sse(self, chunks, done),
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
            if not self._reserved:
                # refused before its tokens were reserved (e.g. 429 on tokens per minute): it is charged nothing,
                # so the audit line, which billing may read, records no prompt tokens either
                self.ctx.prompt_tokens = 0
            if status == 200:
                self.state.served_models.add(self.model)  # the engine answered for it
            model = self.model if self.model in self.state.served_models else ""
            account(self.state, self.ctx, self.key_id, model, status, self.stream_requested, code)
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


async def _sse(req: InFlight, chunks: AsyncIterator[dict[str, Any]], done: bool = True) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's format; errors after the first byte become an error event, then [DONE]. Ends
    the request (`InFlight.end`) when the stream ends, however it ends."""
    status, code = CLIENT_CLOSED, "client_closed"
    # the task writing this stream (not the handler's): the drain deadline cancels it
    req.track(asyncio.current_task())
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
        status, code = 200, None
        if done:
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


def account(
    state: AppState, ctx: RequestContext, key_id: str, model: str, status: int, stream: bool, code: str | None
) -> None:
    """A request's metrics and audit line."""
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
