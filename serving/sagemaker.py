"""The SageMaker adapter: `/invocations` takes an OpenAI chat or completions body (with `model` optional), or the
Hugging Face / TGI `{"inputs", "parameters"}` body answered as `[{"generated_text": ...}]`."""

from __future__ import annotations

from typing import Any

from serving.backends.base import GenerationBody
from serving.errors import bad_request
from serving.protocol import ChatCompletionRequest, CompletionRequest, SageMakerRequest


class InvocationsAdapter:
    """One `/invocations` request: `parse` turns its body into a generation request for `default_model`, `render`
    turns the OpenAI answer back into the shape the body asked for."""

    def __init__(self, default_model: str) -> None:
        self.default_model = default_model
        self.prefix = ""  # `return_full_text`: the input, put back in front of the generated text

    def parse(self, raw: Any) -> GenerationBody:
        if not isinstance(raw, dict):
            raise bad_request("Body must be a JSON object.")
        if "messages" in raw:
            return ChatCompletionRequest.model_validate({"model": self.default_model, **raw})
        if "prompt" in raw:
            return CompletionRequest.model_validate({"model": self.default_model, **raw})
        if "inputs" in raw:
            sm = SageMakerRequest.model_validate(raw)
            if sm.parameters.return_full_text:
                self.prefix = sm.inputs
            return sm.to_completion(self.default_model)
        raise bad_request("Expected an OpenAI body ('messages' or 'prompt') or {'inputs', 'parameters'}.")

    def render(self, result: dict[str, Any], raw: Any) -> Any:
        if "inputs" in raw and "messages" not in raw and "prompt" not in raw:
            return [{"generated_text": self.prefix + result["choices"][0]["text"]}]
        return result
