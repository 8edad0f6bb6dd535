"""The SageMaker adapter: `/invocations` takes an OpenAI chat or completions body (with `model` optional), or the
Hugging Face LLM container's (TGI's) `{"inputs", "parameters", "stream"}` body, answered in TGI's shapes.

TGI's shapes (text-generation-inference router/src/lib.rs and server.rs @ v3.3.7, `compat_generate`):
- not streamed: `[{"generated_text": str, "details"?: {"finish_reason", "generated_tokens", "seed", "prefill",
  "tokens"}}]` (details only with `parameters.details`);
- streamed (`"stream": true`): server-sent events `data: {"index", "token": {"id", "text", "logprob", "special"},
  "generated_text": null, "details": null}`, the last one with `generated_text` (the whole text, the input in front
  with `return_full_text`) and, with `parameters.details`, `details: {"finish_reason", "generated_tokens", "seed",
  "input_length"}`; no `[DONE]` line (TGI sends none, and its clients parse every `data:` line as JSON).
SageMaker's `InvokeEndpointWithResponseStream` relays the container's response bytes as they come, in `PayloadPart`
events, so the stream above is what a boto3 client reads, in parts.

Not exact: `token.id` is null (the engine's OpenAI-shaped chunks name a token by its text), a streamed event is one
OpenAI chunk (one or more tokens, several when the client reads slower than the engine decodes), and an OpenAI
finish reason "stop" is reported as "stop_sequence" when the request has stop sequences, else "eos_token".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from serving.backends.base import GenerationBody
from serving.errors import bad_request
from serving.protocol import ChatCompletionRequest, CompletionRequest, SageMakerRequest


class InvocationsAdapter:
    """One `/invocations` request: `parse` turns its body into a generation request for `default_model`, `render`
    turns the OpenAI answer back into the shape the body asked for, `render_stream` likewise for its chunks."""

    def __init__(self, default_model: str, context: dict[str, Any] | None = None) -> None:
        self.default_model = default_model
        self.context = context or {}
        self.prefix = ""  # `return_full_text`: the input, put back in front of the generated text
        self.tgi: SageMakerRequest | None = None

    def parse(self, raw: Any) -> GenerationBody:
        if not isinstance(raw, dict):
            raise bad_request("Body must be a JSON object.")
        if "messages" in raw:
            return ChatCompletionRequest.model_validate({"model": self.default_model, **raw}, context=self.context)
        if "prompt" in raw:
            return CompletionRequest.model_validate({"model": self.default_model, **raw}, context=self.context)
        if "inputs" in raw:
            sm = SageMakerRequest.model_validate(raw)
            if sm.parameters.return_full_text:
                self.prefix = sm.inputs
            self.tgi = sm
            return sm.to_completion(self.default_model)
        raise bad_request("Expected an OpenAI body ('messages' or 'prompt') or {'inputs', 'parameters'}.")

    @property
    def sse_done(self) -> bool:
        """Whether a stream ends with OpenAI's `data: [DONE]` (not for TGI's stream)."""
        return self.tgi is None

    def render(self, result: dict[str, Any], raw: Any) -> Any:
        if self.tgi is None:
            return result
        choice = result["choices"][0]
        out: dict[str, Any] = {"generated_text": self.prefix + choice["text"]}
        if self.tgi.parameters.details:
            lp = choice.get("logprobs") or {}
            out["details"] = {
                "finish_reason": self._finish(choice.get("finish_reason")),
                "generated_tokens": (result.get("usage") or {}).get("completion_tokens", 0),
                "seed": self.tgi.parameters.seed,
                "prefill": [],
                "tokens": [
                    _token(t, v) for t, v in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], strict=False)
                ],
            }
        return [out]

    def render_stream(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        """The OpenAI chunks as TGI stream events (an OpenAI body's chunks pass as they are)."""
        return chunks if self.tgi is None else self._tgi_events(chunks, self.tgi)

    async def _tgi_events(self, chunks: AsyncIterator[dict[str, Any]], tgi: SageMakerRequest) -> AsyncIterator[dict]:
        text, index, held = self.prefix, 0, None
        finish: str | None = None
        try:
            async for chunk in chunks:
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                    if not choice.get("text"):
                        continue
                    if held is not None:
                        yield held  # an event is held back one chunk: the last one carries the whole text
                    index += 1
                    text += choice["text"]
                    lps = (choice.get("logprobs") or {}).get("token_logprobs") or []
                    logprob = sum(v for v in lps if v is not None) if lps else None
                    held = {"index": index, "token": _token(choice["text"], logprob), "generated_text": None,
                            "details": None}  # fmt: skip
                usage = chunk.get("usage")
                if usage and not chunk.get("choices"):
                    last = held or {"index": index + 1, "token": _token("", None), "generated_text": None}
                    last["generated_text"] = text
                    last["details"] = None
                    if tgi.parameters.details:
                        last["details"] = {
                            "finish_reason": self._finish(finish),
                            "generated_tokens": usage.get("completion_tokens", 0),
                            "seed": tgi.parameters.seed,
                            "input_length": usage.get("prompt_tokens", 0),
                        }
                    held = None
                    yield last
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    def _finish(self, reason: str | None) -> str:
        if reason == "length":
            return "length"
        return "stop_sequence" if self.tgi is not None and self.tgi.parameters.stop else "eos_token"


def _token(text: str, logprob: float | None) -> dict[str, Any]:
    return {"id": None, "text": text, "logprob": logprob, "special": False}
