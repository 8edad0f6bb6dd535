"""Build the ASGI app around an already-loaded engine (the engine is made before the app: see serving.server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.errors import install_error_handlers
from serving.handlers import AppState
from serving.routes import build_router


def build_app(state: AppState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # runs after the server has drained in-flight requests: only now stop the engine
        await state.backend.close()

    app = FastAPI(title="llm-platform serving", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = state
    install_error_handlers(app)
    app.include_router(build_router())
    return app
