"""Gateway mode: forward OpenAI requests to an upstream OpenAI-compatible engine (vLLM in the GPU image).

The gateway never forwards the client's key (it sends its own `--upstream-api-key`, if any); it streams chunks
through as they arrive, and reads `usage` from the upstream so token limits, metrics and audit work as in the
built-in engine. For streams it asks the upstream for usage (`stream_options.include_usage`) and drops that final
chunk again when the client did not ask for it.

Parity with the built-in engine: `max_tokens` defaults to --default-max-tokens (never the upstream's default, which
for vLLM is the rest of the context), only the declared request fields are forwarded (`FORWARDED_FIELDS`), and the
key's token budget is reserved before forwarding (prompt bounded from above by its UTF-8 size, one token per byte
plus the chat template's tokens per message, so concurrent requests cannot overspend the key; settled to the
upstream's usage, or to the chunks counted as they pass when the upstream reports none, so an abandoned stream is
charged too). The
upstream's own 401/403/429 are about the gateway's credentials or the upstream's capacity, never the client's key:
they become 502 / 503 with a message that says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx

from serving.backends.base import GenerationBody, RequestContext
from serving.errors import APIError
from serving.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("serving.upstream")

# The request fields a client may have forwarded upstream: an allow-list, so engine options (vLLM's `ignore_eos`,
# `min_tokens`, `best_of`, `use_beam_search`, ...) never reach it. `max_completion_tokens` is sent as `max_tokens`.
FORWARDED_FIELDS = frozenset(
    {"model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "user"}
    # samplers and scoring vLLM implements (vllm/entrypoints/openai/protocol.py: ChatCompletionRequest's and
    # CompletionRequest's fields); `prompt` lists and token-id prompts, `n` and `echo` likewise
    | {"top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs"}
    | {"echo"}
    # tools and structured outputs: vLLM implements them (its tool parser and structured-output backends)
    | {"tools", "tool_choice", "parallel_tool_calls", "response_format"}
)
# What each upstream engine implements beyond the built-in engine: OpenAI parameters the built-in engine refuses
# (serving/protocol.py `_NO_OP_VALUES`) that the gateway accepts and forwards as sent, for the engine to validate and
# honour. vLLM (vllm/entrypoints/openai/protocol.py ChatCompletionRequest / CompletionRequest): tools and tool_choice
# (with --enable-auto-tool-choice; vLLM answers 400 itself without it), parallel_tool_calls, response_format
# (json_object, json_schema: structured outputs), logit_bias, chat_template_kwargs and prompt_logprobs (its extra
# params). Engine-behaviour options (ignore_eos, min_tokens, use_beam_search, guided_*, allowed_token_ids,
# bad_words, ...) stay refused: they change what an operator's limits and defaults assume. Declared fields of the
# built-in engine's models that the engine implements are in FORWARDED_FIELDS.
ENGINE_CAPABILITIES: dict[str, frozenset[str]] = {
    "vllm": frozenset(
        {"tools", "tool_choice", "parallel_tool_calls", "response_format", "logit_bias"}
        | {"chat_template_kwargs", "prompt_logprobs"}
    ),
}
# Completion tokens are estimated from UTF-8 bytes when the upstream reports no usage (typical BPE vocabularies
# average 3-4 bytes per token on English text).
BYTES_PER_TOKEN_ESTIMATE = 4
# The reservation before forwarding is an upper bound, never an average: a byte-level BPE or byte-fallback
# SentencePiece token covers at least one byte, so a prompt has at most one token per UTF-8 byte (digits and CJK come
# close: about one each), and a chat template adds tokens per message (role markers, separators: 4-6 in ChatML and
# Llama 3's) and per request (a default system prompt, the generation prompt), which an empty message's 0 bytes do not
# show. Reserving bytes / 4 let a tpm=2000 key spend 7380 tokens with concurrent requests.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_PER_REQUEST = 64


class UpstreamBackend:
    """Gateway mode: requests go to an OpenAI-compatible upstream (vLLM), optionally a child process
    this server started and stops."""

    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        timeout_s: float = 600.0,
        child: subprocess.Popen[bytes] | None = None,
        child_stop_timeout_s: float = 30.0,
        default_max_tokens: int = 256,
        engine: str = "vllm",
    ) -> None:
        self.default_max_tokens = default_max_tokens
        # parameters the handlers accept for this upstream and leave unvalidated (`_Lenient.passthrough_params`)
        self.passthrough = ENGINE_CAPABILITIES[engine]
        self.child = child  # the engine process this gateway started (--engine vllm), if any
        self.child_stop_timeout_s = child_stop_timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        # many concurrent streams share few connections to one host: raise httpx's default pool limits
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )

    async def model_ids(self) -> list[str]:
        body = await self._json("GET", "/v1/models")
        return [m["id"] for m in body.get("data", [])]

    async def alive(self) -> bool:
        return self.child is None or self.child.poll() is None

    async def ready(self) -> bool:
        if not await self.alive():
            return False
        try:
            response = await self.client.get("/v1/models", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def close(self) -> None:
        await self.client.aclose()
        if self.child is not None and self.child.poll() is None:
            # after our own drain: nothing is in flight to the engine any more
            self.child.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.child.wait, self.child_stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.error("engine process did not stop in %.0fs; killing it", self.child_stop_timeout_s)
                self.child.kill()

    @staticmethod
    def _path(body: GenerationBody) -> str:
        return "/v1/chat/completions" if isinstance(body, ChatCompletionRequest) else "/v1/completions"

    async def _json(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = await self.client.request(method, path, json=payload)
        except httpx.HTTPError as exc:
            raise APIError(502, f"Upstream engine unreachable: {type(exc).__name__}.", code="upstream_error") from exc
        if response.status_code >= 400:
            raise _upstream_error(response.status_code, response.content, response.headers)
        try:
            return response.json()
        except ValueError as exc:
            raise APIError(502, "Upstream engine sent a body that is not JSON.", code="upstream_error") from exc

    def _payload(self, body: GenerationBody, ctx: RequestContext) -> dict[str, Any]:
        """The allow-listed fields, the default max_tokens, and the key's token reservation."""
        # by alias: `response_format.json_schema.schema` is `schema_` in the model
        payload = body.model_dump(include=set(FORWARDED_FIELDS), exclude_none=True, by_alias=True)
        if payload.get("echo") is False:
            payload.pop("echo")  # the default: the payload stays what it was before `echo` existed
        payload.update({k: v for k, v in body.passthrough_params.items() if k in self.passthrough})
        payload["max_tokens"] = body.max_tokens if body.max_tokens is not None else self.default_max_tokens
        ctx.prompt_tokens = estimate_prompt_tokens(body)
        ctx.max_tokens = payload["max_tokens"]
        # every choice of every prompt may use max_tokens (vLLM: n per prompt, a completion per choice)
        choices = body.n * (len(body.prompts) if isinstance(body, CompletionRequest) else 1)
        ctx.reserve(ctx.prompt_tokens + choices * payload["max_tokens"])
        return payload

    async def complete(self, body: GenerationBody, ctx: RequestContext) -> dict[str, Any]:
        """Forward the request upstream; the answer with its usage counted (see `Backend.complete`)."""
        payload = self._payload(body, ctx)
        payload["stream"] = False
        result = await self._json("POST", self._path(body), payload)
        usage = result.get("usage") or {}
        choices = result.get("choices") or [{}]
        ctx.prompt_tokens = int(usage.get("prompt_tokens", ctx.prompt_tokens))
        if "completion_tokens" in usage:
            ctx.completion_tokens = int(usage["completion_tokens"])
        else:  # no usage from the upstream: estimate from the text of every choice, so the key is still charged
            size = 0
            for choice in choices:
                choice = choice if isinstance(choice, dict) else {}
                text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
                size += len(str(text).encode())
            ctx.completion_tokens = -(-size // BYTES_PER_TOKEN_ESTIMATE)
        ctx.finish_reason = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
        return result

    async def stream(self, body: GenerationBody, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """Open the upstream stream (an unreachable upstream or an error status raises here); its chunks."""
        payload = self._payload(body, ctx)
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        request = self.client.build_request("POST", self._path(body), json=payload)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise APIError(502, f"Upstream engine unreachable: {type(exc).__name__}.", code="upstream_error") from exc
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            raise _upstream_error(response.status_code, content, response.headers)
        return self._chunks(response, body.include_usage, ctx)

    async def _chunks(
        self, response: httpx.Response, client_wants_usage: bool, ctx: RequestContext
    ) -> AsyncIterator[dict[str, Any]]:
        counted = 0  # content chunks seen: vLLM sends one per token; the charge if the upstream reports no usage
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise APIError(
                        502, "Upstream engine sent a malformed stream chunk.", code="upstream_error"
                    ) from exc
                if not isinstance(chunk, dict):
                    raise APIError(502, "Upstream engine sent a malformed stream chunk.", code="upstream_error")
                if "error" in chunk:
                    raise APIError(502, f"Upstream error mid-stream: {chunk['error']}", code="upstream_error")
                choices = chunk.get("choices") or []
                for choice in choices:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or choice.get("text"):
                        ctx.first_token()
                        counted += 1
                        ctx.completion_tokens = counted
                    if choice.get("finish_reason"):
                        ctx.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    ctx.prompt_tokens = int(usage.get("prompt_tokens", ctx.prompt_tokens))
                    ctx.completion_tokens = int(usage.get("completion_tokens", counted))
                    if not choices and not client_wants_usage:
                        continue
                    if not client_wants_usage:
                        chunk.pop("usage", None)
                yield chunk
        except httpx.HTTPError as exc:
            raise APIError(502, f"Upstream stream broke: {type(exc).__name__}.", code="upstream_error") from exc
        finally:
            await response.aclose()  # closing mid-stream tells the upstream the client went away


def estimate_prompt_tokens(body: GenerationBody) -> int:
    """The most tokens the prompt can have (what is reserved until the upstream reports the count): one per UTF-8
    byte, plus the chat template's tokens, plus one for a BOS token."""
    if isinstance(body, ChatCompletionRequest):
        size = sum(len(m.text.encode()) for m in body.messages)
        template = TEMPLATE_TOKENS_PER_REQUEST + TEMPLATE_TOKENS_PER_MESSAGE * len(body.messages)
    else:
        # a token-id prompt has exactly its ids; each prompt of a list may get a BOS token
        size = sum(len(p.encode()) if isinstance(p, str) else len(p) for p in body.prompts)
        template = len(body.prompts) - 1
    return size + template + 1


def _upstream_error(status: int, content: bytes, headers: httpx.Headers) -> APIError:
    """Pass the upstream's client errors through (a 400 from vLLM stays a 400 for the client); its 401/403 (the
    gateway's own credentials) become 502, its 429 (its capacity) 503, its 5xx 502 (503 stays 503)."""
    retry_after = headers.get("Retry-After")
    retry = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
    if status in (401, 403):
        log.error("upstream refused the gateway's credentials (HTTP %d): check --upstream-api-key", status)
        return APIError(
            502, f"The upstream engine refused this gateway's credentials (HTTP {status}); this is a server "
            "configuration problem, not your API key.", code="upstream_auth_error",
        )  # fmt: skip
    if status == 429 or status == 503:
        return APIError(
            503, f"The upstream engine is overloaded (HTTP {status}). Retry later.",
            code="upstream_overloaded", retry_after=retry if retry is not None else 1.0,
        )  # fmt: skip
    if status >= 500:
        return APIError(502, f"The upstream engine failed (HTTP {status}).", code="upstream_error")
    message, code, param = f"Upstream returned HTTP {status}.", None, None
    try:
        err = json.loads(content).get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            code, param = err.get("code"), err.get("param")
        elif isinstance(err, str):
            message = err
    except (ValueError, AttributeError):
        pass
    return APIError(
        status,
        str(message)[:1000],
        code=str(code)[:64] if code is not None else None,
        param=str(param)[:64] if param is not None else None,
        retry_after=retry,
    )
