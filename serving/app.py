"""Build the ASGI app around an already-loaded engine (the engine is made before the app: see serving.server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.errors import install_error_handlers
from serving.handlers import AppState
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
    return app
