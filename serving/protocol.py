"""Request and response models: OpenAI's completions / chat completions / models, and SageMaker's invocations body.

Request models validate ranges so bad parameters fail with 400 before any work. A parameter this server does not
implement (`logprobs`, `tools`, `response_format`, `echo`, `suffix`, engine options such as vLLM's `ignore_eos`, ...)
is refused with 400 naming it, unless it is sent with its no-op value (e.g. `"logprobs": false`): silently ignoring it
would give the client something other than what it asked for. The gateway forwards only the fields declared here
(`serving.backends.upstream.FORWARDED_FIELDS`), so a client cannot reach engine options the operator did not expose.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_MODEL_NAME_CHARS = 256  # the model id is echoed in errors and written to the audit log
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256  # each; stop handling costs grow with their length on every generated token
MAX_USER_CHARS = 256
# Every list a client sends is bounded, and validated fail-fast (pydantic's `fail_fast`: the first bad item ends the
# list's validation), so a body of a million list items costs one error, not a million (docs/serving.md "Limits").
MAX_MESSAGES = 2048  # chat messages per request
MAX_CONTENT_PARTS = 256  # text parts per message
MAX_PROMPTS = 1  # prompts per completions request (n=1 and one prompt are what this server implements)
# torch.Generator.manual_seed accepts exactly this range (a signed or unsigned 64-bit integer)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

# OpenAI / engine parameters that are not implemented, with the values that mean "off" (accepted and dropped)
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
}
# the TGI / Hugging Face `parameters` of SageMaker's invocations body, likewise
_TGI_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "details": (None, False),
    "decoder_input_details": (None, False),
    "top_k": (None, 0),
    "repetition_penalty": (None, 1, 1.0),
    "truncate": (None,),
    "typical_p": (None, 1, 1.0),
    "watermark": (None, False),
    "best_of": (None, 1),
}


def _refuse_unsupported(raw: Any, model: type[BaseModel], no_ops: dict[str, tuple[Any, ...]]) -> Any:
    """Drop unimplemented parameters sent with their no-op value; refuse any other undeclared parameter."""
    if not isinstance(raw, dict):
        return raw
    unknown = [k for k in raw if k not in model.model_fields]
    refused = [k for k in unknown if not any(_same(raw[k], v) for v in no_ops.get(k, ()))]
    if refused:
        names = ", ".join(str(k)[:64] for k in refused[:8])
        raise PydanticCustomError(
            "unsupported_parameter",
            "Unsupported parameter(s): {names}. This server does not implement them.",
            {"names": names, "param": str(refused[0])[:64]},
        )
    return {k: v for k, v in raw.items() if k not in unknown}


def _same(value: Any, no_op: Any) -> bool:
    # `type(...) is` so that True does not pass for 1 or 0.0 for False
    return (value is None and no_op is None) or (type(value) is type(no_op) and value == no_op)


StopList = Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES, fail_fast=True)]
PromptList = Annotated[list[str], Field(min_length=MAX_PROMPTS, max_length=MAX_PROMPTS, fail_fast=True)]


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=MAX_MODEL_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(
        default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="Below 0.001 the sampling is greedy."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=1, description="Only n=1 is supported.")
    stop: str | StopList | None = Field(
        default=None, description=f"At most {MAX_STOP_SEQUENCES} sequences of 1-{MAX_STOP_CHARS} characters."
    )
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, raw: Any) -> Any:
        return _refuse_unsupported(raw, cls, _NO_OP_VALUES)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return v

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """The body of `POST /v1/completions` (one prompt per request)."""

    prompt: str | PromptList = Field(description="One prompt: a string, or a list holding exactly one string.")

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    """A text part of a chat message's content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; content as a string or text parts."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    """The body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _completion_tokens_alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class SageMakerParameters(BaseModel):
    """The common Hugging Face / TGI `parameters` block."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    do_sample: bool | None = None
    stop: StopList | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    return_full_text: bool = False

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, raw: Any) -> Any:
        return _refuse_unsupported(raw, cls, _TGI_NO_OP_VALUES)


class SageMakerRequest(BaseModel):
    """SageMaker's `{"inputs", "parameters"}` body (the Hugging Face inference toolkit's format)."""

    model_config = ConfigDict(extra="forbid")

    inputs: str
    parameters: SageMakerParameters = Field(default_factory=SageMakerParameters)

    def to_completion(self, model: str) -> CompletionRequest:
        """The same request as a completions body for `model`."""
        p = self.parameters
        temperature = p.temperature if p.temperature is not None else 1.0
        if p.do_sample is False:
            temperature = 0.0
        return CompletionRequest(
            model=model,
            prompt=self.inputs,
            max_tokens=p.max_new_tokens,
            temperature=temperature,
            top_p=p.top_p if p.top_p is not None else 1.0,
            stop=p.stop,
            seed=p.seed,
        )


# -- responses ----------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    """OpenAI's `usage` object."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llm-platform"


class ModelList(BaseModel):
    """The body of `GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    """A unique id such as `chatcmpl-<hex>`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_body(
    request_id: str, model: str, text: str, finish_reason: str | None, usage: Usage | None
) -> dict[str, Any]:
    """A `text_completion` response body."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_body(request_id: str, model: str, text: str, finish_reason: str | None, usage: Usage) -> dict[str, Any]:
    """A `chat.completion` response body."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage.model_dump(),
    }


def chat_chunk(
    request_id: str, model: str, delta: dict[str, str], finish_reason: str | None, usage: Usage | None = None
) -> dict[str, Any]:
    """One `chat.completion.chunk` of a stream (with `usage` and no choices: the final usage chunk)."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["choices"] = []
        body["usage"] = usage.model_dump()
    return body


def completion_chunk(
    request_id: str, model: str, text: str, finish_reason: str | None, usage: Usage | None = None
) -> dict[str, Any]:
    """One streamed `text_completion` chunk (with `usage` and no choices: the final usage chunk)."""
    body = completion_body(request_id, model, text, finish_reason, None)
    if usage is not None:
        body["choices"] = []
        body["usage"] = usage.model_dump()
    return body
