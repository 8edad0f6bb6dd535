"""URL map: which handler serves which path (OpenAI, SageMaker and operations routes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from serving import handlers
from serving.protocol import ChatCompletionRequest, CompletionRequest, SageMakerRequest

REQUEST_MODELS: tuple[type[BaseModel], ...] = (CompletionRequest, ChatCompletionRequest, SageMakerRequest)


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a handler that parses the body itself (serving.app adds the schemas)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def build_router() -> APIRouter:
    """Bind the routes to `serving.handlers`."""
    router = APIRouter()
    # OpenAI-compatible API (Bearer key when keys are configured)
    router.add_api_route("/v1/models", handlers.list_models, methods=["GET"])
    router.add_api_route("/v1/models/{model_id:path}", handlers.retrieve_model, methods=["GET"])
    router.add_api_route(
        "/v1/completions", handlers.completions, methods=["POST"], openapi_extra=request_body(CompletionRequest)
    )
    router.add_api_route(
        "/v1/chat/completions",
        handlers.chat_completions,
        methods=["POST"],
        openapi_extra=request_body(ChatCompletionRequest),
    )
    # SageMaker container contract: GET /ping, POST /invocations on port 8080
    router.add_api_route("/ping", handlers.readyz, methods=["GET"])
    router.add_api_route(
        "/invocations", handlers.invocations, methods=["POST"], openapi_extra=request_body(*REQUEST_MODELS)
    )
    # operations: liveness, readiness, Prometheus
    router.add_api_route("/healthz", handlers.healthz, methods=["GET"])
    router.add_api_route("/readyz", handlers.readyz, methods=["GET"])
    router.add_api_route("/metrics", handlers.metrics, methods=["GET"])
    return router
