"""Build the ASGI app around an already-loaded engine (the engine is made before the app: see serving.server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import APIError, install_error_handlers
from serving.inflight import AppState
from serving.routes import REQUEST_MODELS, build_router


def build_app(state: AppState) -> FastAPI:
    """The FastAPI app over `state`: routes, error handlers, and the engine closed after the drain."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # runs after the server has drained in-flight requests: only now stop the engine
        await state.backend.close()

    # redirect_slashes=False: Starlette's trailing-slash redirect builds its Location from the client's Host header
    # (an open redirect through a shared front end); `/v1/models/` is simply 404
    app = FastAPI(
        title="llm-platform serving", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False
    )
    app.state.serving = state
    install_error_handlers(app)
    app.include_router(build_router())

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the request models: the handlers read the raw body (to bound and time it before
        parsing), so FastAPI cannot see the models; the routes reference them by name (routes.request_body)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUEST_MODELS:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(ListenerGuard, ops_port=state.cfg.ops_port)
    return app


OPS_PATHS = frozenset({"/healthz", "/readyz", "/ping", "/metrics"})
"""What the operations listener (`--ops-port`) serves; `/metrics` is served nowhere else."""


class ListenerGuard:
    """Which listener serves what, and no connection kept open past an unread body.

    - The operations listener answers only `OPS_PATHS`; the client port never answers `/metrics` (its prefix-cache
      counters tell whether another key's prompt is cached: docs/serving.md "Privacy").
    - A response sent before the request's body was read (401, 429, 413, 408, 404, ...) carries
      `Connection: close`, and uvicorn closes the connection after it: otherwise a client trickling one body byte
      now and then would hold the connection (and its slot) forever.
    """

    def __init__(self, app: ASGIApp, ops_port: int) -> None:
        self.app = app
        self.ops_port = ops_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = scope.get("server") or ("", 0)
        on_ops = bool(self.ops_port) and server[1] == self.ops_port
        path = scope["path"]
        if (on_ops and path not in OPS_PATHS) or (not on_ops and path == "/metrics"):
            await _not_found(scope, receive, send)
            return
        headers = dict(scope["headers"])
        body_done = headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers

        async def receive_tracked() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_tracked, send_closing)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    response = APIError(404, "Not Found").response()
    response.headers["Connection"] = "close"
    await response(scope, receive, send)
