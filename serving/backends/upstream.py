"""Gateway mode: forward OpenAI requests to an upstream OpenAI-compatible engine (vLLM in the GPU image).

The gateway never forwards the client's key (it sends its own `--upstream-api-key`, if any); it streams chunks
through as they arrive, and reads `usage` from the upstream so token limits, metrics and audit work as in the
built-in engine. For streams it asks the upstream for usage (`stream_options.include_usage`) and drops that final
chunk again when the client did not ask for it.
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
from serving.protocol import ChatCompletionRequest

log = logging.getLogger("serving.upstream")


class UpstreamBackend:
    def __init__(
        self,
        base_url: str,
        api_key: str = "",
        timeout_s: float = 600.0,
        child: subprocess.Popen[bytes] | None = None,
        child_stop_timeout_s: float = 30.0,
    ) -> None:
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
        return response.json()

    async def complete(self, body: GenerationBody, ctx: RequestContext) -> dict[str, Any]:
        payload = body.model_dump(exclude_none=True)
        payload["stream"] = False
        result = await self._json("POST", self._path(body), payload)
        usage = result.get("usage") or {}
        ctx.prompt_tokens = int(usage.get("prompt_tokens", 0))
        ctx.completion_tokens = int(usage.get("completion_tokens", 0))
        choices = result.get("choices") or [{}]
        ctx.finish_reason = choices[0].get("finish_reason")
        return result

    async def stream(self, body: GenerationBody, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        payload = body.model_dump(exclude_none=True)
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
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise APIError(502, f"Upstream error mid-stream: {chunk['error']}", code="upstream_error")
                choices = chunk.get("choices") or []
                for choice in choices:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or choice.get("text"):
                        ctx.first_token()
                    if choice.get("finish_reason"):
                        ctx.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    ctx.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    ctx.completion_tokens = int(usage.get("completion_tokens", 0))
                    if not choices and not client_wants_usage:
                        continue
                    if not client_wants_usage:
                        chunk.pop("usage", None)
                yield chunk
        except httpx.HTTPError as exc:
            raise APIError(502, f"Upstream stream broke: {type(exc).__name__}.", code="upstream_error") from exc
        finally:
            await response.aclose()  # closing mid-stream tells the upstream the client went away


def _upstream_error(status: int, content: bytes, headers: httpx.Headers) -> APIError:
    """Pass the upstream's status and message through (a 400 from vLLM stays a 400 for the client)."""
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
    retry_after = headers.get("Retry-After")
    return APIError(
        status,
        message,
        code=str(code) if code is not None else None,
        param=param,
        retry_after=float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None,
    )
