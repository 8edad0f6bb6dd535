"""Request and response models: OpenAI's completions / chat completions / models, and SageMaker's invocations body.

Request models validate ranges so bad parameters fail with 400 before any work. What a body may hold, as vLLM's
OpenAI server treats it (docs/serving.md "Compatibility"):
- a declared parameter sent as `null` means its default (`"temperature": null` is temperature 1.0);
- a known OpenAI field that changes nothing here (`prompt_cache_key`, `safety_identifier`, `store`, `metadata`,
  `service_tier`, ...) is accepted and dropped;
- a known parameter this server does not implement (`suffix`, engine options such as vLLM's `ignore_eos`, `tools`
  on completions, ...) is refused with 400 naming it, unless it is sent with its no-op value (e.g. `"tools": []`):
  silently ignoring it would give the client something other than what it asked for; a gateway accepts those its
  upstream implements and forwards them as sent (validation context `passthrough`);
- any other field is ignored, and named in the `X-Ignored-Params` response header and the log (vLLM likewise
  ignores and logs unknown fields: vllm/entrypoints/openai/protocol.py `OpenAIBaseModel.__log_extra_fields__`).
The gateway forwards only the fields declared here (`serving.backends.upstream.FORWARDED_FIELDS`) and its upstream's
capabilities (`ENGINE_CAPABILITIES`), so a client cannot reach engine options the operator did not expose.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_MODEL_NAME_CHARS = 256  # the model id is echoed in errors and written to the audit log
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256  # each; stop handling costs grow with their length on every generated token
MAX_USER_CHARS = 256
# Every list a client sends is bounded, and validated fail-fast (pydantic's `fail_fast`: the first bad item ends the
# list's validation), so a body of a million list items costs one error, not a million (docs/serving.md "Limits").
MAX_MESSAGES = 2048  # chat messages per request
MAX_CONTENT_PARTS = 256  # text parts per message
# prompts per completions request: LangChain's `OpenAI.batch` packs up to 20 (langchain_openai BaseOpenAI.batch_size)
MAX_PROMPTS = 32
MAX_PROMPT_TOKEN_IDS = 1 << 20  # ids in one token-id prompt (the context length refuses far fewer; this bounds parsing)
MAX_N = 16  # choices per prompt (`n`); the built-in engine also needs n <= --max-batch-size (the forks run together)
MAX_CHOICES = 64  # prompts x n per request: each choice is an engine row (or a queued request) and a reservation
# torch.Generator.manual_seed accepts exactly this range (a signed or unsigned 64-bit integer)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat `top_logprobs` (and vLLM's default --max-logprobs)
MAX_TOP_K = 2**20  # above any vocabulary: top_k beyond the vocabulary keeps every token
# repetition_penalty: vLLM asks only > 0; these bounds keep the divided logits finite (a 1e-300 penalty would turn a
# row into inf and fail it) and are far beyond useful values (1.0-1.5)
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
MAX_TOOLS = 128  # tool definitions per request (OpenAI allows 128)
MAX_TOOL_CALLS = 128  # tool calls per assistant message in the history
MAX_TOOL_DESCRIPTION_CHARS = 4096
MAX_TOOL_CALL_ID_CHARS = 256
# OpenAI's function-name rule (1-64 of letters, digits, underscores, dashes; dots as vLLM allows)
FUNCTION_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"

# OpenAI / engine parameters that are not implemented, with the values that mean "off" (accepted and dropped)
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    # vLLM engine options that change the answer (the gateway never forwards them)
    "ignore_eos": (None, False),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
    "chat_template_kwargs": (None, {}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "prompt_logprobs": (None, 0),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
}
# Known OpenAI fields that change nothing on this server (routing, caching, storage, abuse-tracking hints): accepted
# with any value and dropped, as vLLM does. Their size is bounded by the body limit; nothing here validates them.
_NO_EFFECT_FIELDS = frozenset(
    {"prompt_cache_key", "safety_identifier", "store", "metadata", "service_tier", "modalities", "verbosity"}
)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
MAX_IGNORED_NAMED = 8  # unknown fields named in the X-Ignored-Params header (and the log), each cut to 64 chars
# the TGI / Hugging Face `parameters` of SageMaker's invocations body, likewise
_TGI_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "decoder_input_details": (None, False),
    "top_n_tokens": (None, 0),
    "truncate": (None,),
    "typical_p": (None, 1, 1.0),
    "watermark": (None, False),
    "best_of": (None, 1),
}


def _screen(
    raw: Any, model: type[BaseModel], no_ops: dict[str, tuple[Any, ...]], passthrough: frozenset[str] = frozenset()
) -> tuple[Any, list[str], dict[str, Any]]:
    """The body without what this server drops, the unknown fields it ignored (see the module docstring), and the
    known parameters this server does not implement but its engine does (`passthrough`: a gateway's upstream
    capabilities, serving/backends/upstream.py), set aside unvalidated for the engine to judge.

    Refuses a known unimplemented parameter sent with anything but its no-op value."""
    if not isinstance(raw, dict):
        return raw, [], {}
    kept: dict[Any, Any] = {}
    ignored: list[str] = []
    refused: list[str] = []
    passed: dict[str, Any] = {}
    for k, v in raw.items():
        if k in model.model_fields:
            if v is not None or model.model_fields[k].default is None:
                kept[k] = v  # `null` for a field with a default means that default (as OpenAI's and vLLM's servers)
        elif k in no_ops and k in passthrough:
            if v is not None:
                passed[k] = v
        elif k in no_ops:
            if not any(_same(v, no_op) for no_op in no_ops[k]):
                refused.append(k)
        elif k not in _NO_EFFECT_FIELDS:
            # echoed in a response header and the log: only header-safe characters, never a client's CR/LF
            ignored.append(_UNSAFE_NAME_CHARS.sub("?", str(k)[:64]))
    if refused:
        names = ", ".join(str(k)[:64] for k in refused[:8])
        raise PydanticCustomError(
            "unsupported_parameter",
            "Unsupported parameter(s): {names}. This server does not implement them.",
            {"names": names, "param": str(refused[0])[:64]},
        )
    return kept, ignored, passed


def _same(value: Any, no_op: Any) -> bool:
    # `type(...) is` so that True does not pass for 1 or 0.0 for False
    return (value is None and no_op is None) or (type(value) is type(no_op) and value == no_op)


StopList = Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES, fail_fast=True)]
PromptList = Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)]
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS, fail_fast=True)
]
TokenIdsList = Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)]


class StreamOptions(BaseModel):
    """OpenAI's `stream_options` (`include_obfuscation` is accepted: this server never pads its chunks)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, raw: Any) -> Any:
        return {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw


class _Lenient(BaseModel):
    """A request body screened by `_screen`: the unknown fields it ignored are in `ignored_params`."""

    model_config = ConfigDict(extra="forbid")
    _no_ops: ClassVar[dict[str, tuple[Any, ...]]] = _NO_OP_VALUES
    _ignored: list[str] = PrivateAttr(default_factory=list)
    _passthrough: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _screened(cls, raw: Any, handler: ModelWrapValidatorHandler[Any], info: ValidationInfo) -> Any:
        if isinstance(raw, cls):
            return raw
        context = info.context if isinstance(info.context, dict) else {}
        kept, ignored, passed = _screen(raw, cls, cls._no_ops, context.get("passthrough", frozenset()))
        out = handler(kept)
        out._ignored = ignored
        out._passthrough = passed
        return out

    @property
    def passthrough_params(self) -> dict[str, Any]:
        """Parameters this server does not implement, accepted for a gateway's upstream that does (forwarded as
        sent); empty unless validated with `context={"passthrough": names}`."""
        return self._passthrough

    @property
    def ignored_params(self) -> list[str]:
        """The unknown fields this body carried, ignored (at most `MAX_IGNORED_NAMED` of them are named)."""
        return self._ignored


class _SamplingFields(_Lenient):
    model: str | None = Field(
        default=None, max_length=MAX_MODEL_NAME_CHARS, description="Optional when the server serves one model."
    )
    max_tokens: int | None = Field(default=None, ge=0, description="0 only with `echo` (completions): scoring.")
    temperature: float = Field(
        default=1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="Below 0.001 the sampling is greedy."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N, description="Choices per prompt; they share the prompt's prefill.")
    stop: str | StopList | None = Field(
        default=None, description=f"At most {MAX_STOP_SEQUENCES} sequences of 1-{MAX_STOP_CHARS} characters."
    )
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    # samplers (serving/sampling.py); `None` is off. Ranges as vLLM's SamplingParams._verify_args
    # (vllm/sampling_params.py): top_k -1 or 0 is off; penalties of OpenAI's range; repetition_penalty > 0.
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False
    )
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)

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

    @model_validator(mode="after")
    def _zero_tokens_only_for_scoring(self) -> _SamplingFields:
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            raise PydanticCustomError(
                "greater_than_equal", "max_tokens must be at least 1 (0 only with echo)", {"param": "max_tokens"}
            )
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """The body of `POST /v1/completions`: one prompt or a list of them (strings or token ids); `n` choices each."""

    prompt: str | PromptList | TokenIds | TokenIdsList = Field(
        description=f"A string, a token-id list, or a list of up to {MAX_PROMPTS} of either."
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="The chosen token's log-probability and this many more."
    )
    echo: bool = Field(default=False, description="Return the prompt before the completion (its logprobs too).")
    response_format: ResponseFormat | None = None  # structured output, as vLLM's completions accept it

    @field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_off(cls, v: Any) -> Any:
        return None if v is False else v  # `"logprobs": false` is what several clients send for "off"

    @property
    def logprobs_count(self) -> int | None:
        """How many top alternatives to return per token; None: no logprobs."""
        return self.logprobs

    @model_validator(mode="after")
    def _bounded_choices(self) -> CompletionRequest:
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise PydanticCustomError(
                "too_many_choices",
                "prompts x n must be at most {limit}; got {got}",
                {"limit": MAX_CHOICES, "got": len(self.prompts) * self.n, "param": "n"},
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @property
    def prompt_text(self) -> str:
        """The first prompt, when it is text ("" for token ids)."""
        first = self.prompts[0]
        return first if isinstance(first, str) else ""


class TextPart(BaseModel):
    """A text part of a chat message's content."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class _Nested(BaseModel):
    """A nested object of a tool or format definition: unknown keys are dropped (clients add their own)."""

    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Nested):
    """A call's function: its name and its arguments as a JSON text (OpenAI's shape)."""

    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = "{}"


class ToolCall(_Nested):
    """One tool call of an assistant message in the history."""

    id: str = Field(default="", max_length=MAX_TOOL_CALL_ID_CHARS)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Nested):
    """A function the model may call: `parameters` is a JSON schema (its arguments are constrained to it when the
    call is forced by `tool_choice`)."""

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(default=None, max_length=MAX_TOOL_DESCRIPTION_CHARS)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Nested):
    """One entry of `tools`."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(_Nested):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(_Nested):
    """`tool_choice` naming one function: the answer is a call of it."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class JsonSchemaFormat(_Nested):
    """`response_format.json_schema`: the schema the answer follows (`strict` accepted: always enforced here)."""

    name: str = Field(default="response", max_length=64)
    description: str | None = Field(default=None, max_length=MAX_TOOL_DESCRIPTION_CHARS)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Nested):
    """`response_format`: free text, any JSON object, or JSON following a schema (by constrained decoding)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "json_schema_missing",
                "response_format of type json_schema needs a json_schema object",
                {"param": "response_format"},
            )
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"


class ChatMessage(BaseModel):
    """One chat message; content as a string or text parts."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = Field(default=None, max_length=MAX_USER_CHARS, description="Accepted; not rendered.")
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS, fail_fast=True)] | None = None
    # an assistant turn that called tools, and a tool's result answering one of those calls (serving/tools.py)
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS, fail_fast=True)] | None = None
    tool_call_id: str | None = Field(default=None, max_length=MAX_TOOL_CALL_ID_CHARS)

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    """The body of `POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES, fail_fast=True)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # tools (serving/tools.py) and structured output (serving/grammar.py)
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS, fail_fast=True)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @property
    def tool_mode(self) -> str:
        """ "none" (no tools, or tool_choice none), "auto", "required", or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and not self.tools:
            raise PydanticCustomError(
                "tool_choice_without_tools", "tool_choice {choice} needs tools", {"param": "tool_choice",
                "choice": "required" if self.tool_choice == "required" else "naming a function"},
            )  # fmt: skip
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            name = self.tool_choice.function.name
            if all(t.function.name != name for t in self.tools):
                raise PydanticCustomError(
                    "unknown_tool", "tool_choice names {name}, which is not in tools", {"param": "tool_choice",
                    "name": repr(name)},
                )  # fmt: skip
        if forced and self.response_format is not None and self.response_format.constrained:
            raise PydanticCustomError(
                "conflicting_constraints",
                "response_format cannot be combined with a forced tool_choice (required or named)",
                {"param": "response_format"},
            )
        return self

    @property
    def logprobs_count(self) -> int | None:
        """How many top alternatives to return per token; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError(
                "top_logprobs_without_logprobs", "top_logprobs needs logprobs: true", {"param": "top_logprobs"}
            )
        return self

    @model_validator(mode="after")
    def _completion_tokens_alias(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class SageMakerParameters(_Lenient):
    """The common Hugging Face / TGI `parameters` block (TGI's GenerateParameters)."""

    _no_ops: ClassVar[dict[str, tuple[Any, ...]]] = _TGI_NO_OP_VALUES

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    do_sample: bool | None = None
    stop: StopList | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    return_full_text: bool = False
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    repetition_penalty: float | None = Field(
        default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False
    )
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    details: bool = Field(default=False, description="Add TGI's `details` (finish reason, token counts, tokens).")


class SageMakerRequest(BaseModel):
    """SageMaker's `{"inputs", "parameters", "stream"}` body: the Hugging Face LLM container's (TGI's
    `CompatGenerateRequest`, text-generation-inference router/src/lib.rs @ v3.3.7)."""

    model_config = ConfigDict(extra="forbid")

    inputs: str
    parameters: SageMakerParameters = Field(default_factory=SageMakerParameters)
    stream: bool = False

    def to_completion(self, model: str) -> CompletionRequest:
        """The same request as a completions body for `model`."""
        p = self.parameters
        temperature = p.temperature if p.temperature is not None else 1.0
        if p.do_sample is False:
            temperature = 0.0
        body = CompletionRequest(
            model=model,
            prompt=self.inputs,
            max_tokens=p.max_new_tokens,
            temperature=temperature,
            top_p=p.top_p if p.top_p is not None else 1.0,
            stop=p.stop,
            seed=p.seed,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            stream=self.stream,
            # what TGI's answer reports: the tokens (details) and, streamed, the input length (usage)
            logprobs=0 if p.details or self.stream else None,
            stream_options={"include_usage": True} if self.stream else None,
        )
        body._ignored = p.ignored_params
        return body


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
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: Usage | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `text_completion` response body."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_body(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: Usage,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
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
                "logprobs": logprobs,
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
