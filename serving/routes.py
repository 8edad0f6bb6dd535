"""URL map: which handler serves which path (OpenAI, SageMaker and operations routes)."""

from __future__ import annotations

from fastapi import APIRouter

from serving import handlers


def build_router() -> APIRouter:
    router = APIRouter()
    # OpenAI-compatible API (Bearer key when keys are configured)
    router.add_api_route("/v1/models", handlers.list_models, methods=["GET"])
    router.add_api_route("/v1/completions", handlers.completions, methods=["POST"])
    router.add_api_route("/v1/chat/completions", handlers.chat_completions, methods=["POST"])
    # SageMaker container contract: GET /ping, POST /invocations on port 8080
    router.add_api_route("/ping", handlers.readyz, methods=["GET"])
    router.add_api_route("/invocations", handlers.invocations, methods=["POST"])
    # operations: liveness, readiness, Prometheus
    router.add_api_route("/healthz", handlers.healthz, methods=["GET"])
    router.add_api_route("/readyz", handlers.readyz, methods=["GET"])
    router.add_api_route("/metrics", handlers.metrics, methods=["GET"])
    return router
