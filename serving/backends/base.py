"""What the handlers need from an engine, and the per-request accounting both engines fill in."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serving.protocol import ChatCompletionRequest, CompletionRequest

GenerationBody = CompletionRequest | ChatCompletionRequest


@dataclass(eq=False)  # identity: the handlers key in-flight requests by their context
class RequestContext:
    """One request's identity and accounting, filled in by the engine and read by the handlers."""

    request_id: str
    endpoint: str
    key_id: str = "-"  # the API key's id (never its secret): the engine's fairness unit and prefix-cache salt
    started: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    max_tokens: int | None = None  # the completion's token limit the engine applied (after any clamping)
    # Called by the engine once it knows the most tokens the request can use (prompt + max_tokens), before any
    # generation work; the handler reserves that much of the key's token budget here (raising 429 when it does not
    # fit). A no-op outside the handlers.
    reserve: Callable[[int], None] = field(default=lambda tokens: None)
    cut: bool = False  # set when the drain deadline cut this request

    def first_token(self) -> None:
        """Record the time of the first generated token (later calls no-op)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    @property
    def ttft_s(self) -> float | None:
        """Seconds from arrival to the first token; None before it."""
        return None if self.first_token_at is None else self.first_token_at - self.started


class Backend(Protocol):
    """An engine behind the handlers: the built-in one (`LocalBackend`) or an upstream (`UpstreamBackend`)."""

    async def model_ids(self) -> list[str]: ...

    async def alive(self) -> bool:
        """False when the engine is dead for good (liveness fails, the orchestrator restarts the container)."""
        ...

    async def ready(self) -> bool:
        """True when requests can be served now (readiness)."""
        ...

    async def complete(self, body: GenerationBody, ctx: RequestContext) -> dict[str, Any]:
        """The whole OpenAI response body (completion or chat completion)."""
        ...

    async def stream(self, body: GenerationBody, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """Admit the request (raising APIError when it cannot be), then return an iterator of OpenAI chunks."""
        ...

    async def close(self) -> None: ...
