"""Tool calling on the built-in engine: which tool-call format a model's chat template uses, the grammar that forces
a call (`tool_choice` required or named), and parsing the model's text back into OpenAI `tool_calls`, whole or as
stream deltas.

The tool definitions reach the model through its own chat template (`apply_chat_template(..., tools=...)`, in
serving/backends/local.py); the template's source says which format the model answers in. Formats parsed, after
vLLM's tool parsers (vllm/entrypoints/openai/tool_parsers/ at v0.11):
- "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (hermes_tool_parser.py;
  Qwen 2.5 and Hermes templates, and SmolLM2's tool prompt, whose block may hold a JSON list of calls);
- "llama3_json": a bare JSON object `{"name": ..., "parameters": {...}}` (several separated by `;`), optionally after
  `<|python_tag|>` (llama_tool_parser.py; Llama 3.1-3.3 templates).
A template that never mentions `tools` cannot show the model its tools: such a request is refused, naming the model.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.protocol import ChatCompletionRequest, NamedToolChoice

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_COMPACT = {"whitespace_flexible": False}


def tool_format(template: str | None) -> str | None:
    """The tool-call format a chat template's source implies, or None when it has no tool support."""
    if not template or "tools" not in template:
        return None
    if _OPEN in template:
        return HERMES
    if _PYTHON_TAG in template or "ipython" in template:
        return LLAMA3_JSON
    return None


def new_call_id() -> str:
    """An OpenAI-style tool call id (`call_` + 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def template_tools(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The tools as chat templates take them (transformers' `apply_chat_template(tools=...)`: OpenAI's JSON shape)."""
    out = []
    for tool in body.tools or []:
        fn: dict[str, Any] = {"name": tool.function.name, "parameters": _parameters(tool.function.parameters)}
        if tool.function.description:
            fn["description"] = tool.function.description
        out.append({"type": "function", "function": fn})
    return out


def template_tool_calls(calls: list[Any]) -> list[dict[str, Any]]:
    """A history message's tool calls as templates read them: arguments as an object (Qwen's and Llama's templates
    apply `tojson` to them; vLLM parses them likewise before rendering)."""
    out = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments
        out.append(
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": arguments},
            }
        )
    return out


def forced_call_schemas(body: ChatCompletionRequest, fmt: str) -> list[dict[str, Any]]:
    """For `tool_choice` required or named: the JSON schema of one call of each allowed function."""
    key = "parameters" if fmt == LLAMA3_JSON else "arguments"
    allowed = [
        t.function
        for t in body.tools or []
        if not isinstance(body.tool_choice, NamedToolChoice) or t.function.name == body.tool_choice.function.name
    ]
    return [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, key: _parameters(f.parameters)},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for f in allowed
    ]


def forced_call_lark(body: ChatCompletionRequest, fmt: str) -> str:
    """The Lark grammar (llguidance's dialect, with `%json`) of exactly one call in the model's format."""
    schemas = forced_call_schemas(body, fmt)
    # compact JSON, as serving/grammar.py `json_grammar`: free whitespace would let a model spend its tokens on it
    call = json.dumps({**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": _COMPACT})
    if fmt == HERMES:
        return f'start: "{_OPEN}\\n" call "\\n{_CLOSE}"\ncall: %json {call}\n'
    return f"start: call\ncall: %json {call}\n"


def _parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters if parameters else {"type": "object", "properties": {}}


# -- parsing -----------------------------------------------------------------------------------------------------------


def _call(obj: Any) -> dict[str, Any] | None:
    """One parsed call as OpenAI's `tool_calls` item, or None when `obj` is not a call."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": obj["name"], "arguments": text}}


def _calls(payload: str) -> list[dict[str, Any]] | None:
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    calls = [_call(o) for o in (obj if isinstance(obj, list) else [obj])]
    return None if not calls or any(c is None for c in calls) else calls  # type: ignore[return-value]


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole answer; text that is not a well-formed call stays content (as vLLM)."""
    if fmt == HERMES:
        if _OPEN not in text:
            return text, []
        calls: list[dict[str, Any]] = []
        for closed, open_ended in _HERMES_BLOCK.findall(text):
            found = _calls((closed or open_ended).strip())
            if found is None:
                return text, []
            calls += found
        content = text[: text.find(_OPEN)].strip()
        return content or None, calls
    stripped = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not stripped.startswith("{"):
        return text, []
    decoder, at, calls = json.JSONDecoder(), 0, []
    while at < len(stripped):
        try:
            obj, end = decoder.raw_decode(stripped, at)
        except ValueError:
            return text, []
        call = _call(obj)
        if call is None:
            return text, []
        calls.append(call)
        at = end
        while at < len(stripped) and stripped[at] in " \t\r\n;":
            at += 1
    return None, calls


@dataclass
class ToolStream:
    """Turns streamed text into OpenAI chat deltas: content while the model writes prose, a tool call's deltas
    (index, id, type, function.name, then function.arguments) once the call is complete. Text that may still become a
    call is held back."""

    fmt: str
    calls: int = 0
    _buffer: str = ""
    _in_call: bool = False
    _decided: bool = False  # llama3_json: whether the answer is a call (decided by its first non-blank character)
    _deltas: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas `text` completes (each a chat `delta` object)."""
        self._buffer += text
        return self._hermes() if self.fmt == HERMES else self._llama(final=False)

    def finish(self) -> list[dict[str, Any]]:
        """The deltas of whatever is still held back at the end of the answer."""
        if self.fmt != HERMES:
            return self._llama(final=True)
        out = self._hermes()
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            calls = _calls(rest.strip())
            if calls is not None:
                return out + self._call_deltas(calls)
            rest = _OPEN + rest
        return out + ([{"content": rest}] if rest else [])

    def _hermes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if not self._in_call:
                at = self._buffer.find(_OPEN)
                if at < 0:
                    keep = _partial_len(self._buffer, _OPEN)
                    text = self._buffer[: len(self._buffer) - keep]
                    if text.strip() or (text and not self.calls):
                        out.append({"content": text})
                    self._buffer = self._buffer[len(text) :]
                    return out
                if self._buffer[:at].strip() or (at and not self.calls):
                    out.append({"content": self._buffer[:at]})
                self._buffer, self._in_call = self._buffer[at + len(_OPEN) :], True
            end = self._buffer.find(_CLOSE)
            if end < 0:
                return out
            payload, self._buffer, self._in_call = self._buffer[:end], self._buffer[end + len(_CLOSE) :], False
            calls = _calls(payload.strip())
            out += self._call_deltas(calls) if calls is not None else [{"content": _OPEN + payload + _CLOSE}]

    def _llama(self, *, final: bool) -> list[dict[str, Any]]:
        if not self._decided:
            head = self._buffer.lstrip().removeprefix(_PYTHON_TAG).lstrip()
            if not head:
                return []
            self._decided, self._in_call = True, head.startswith("{")
        if not self._in_call:
            text, self._buffer = self._buffer, ""
            return [{"content": text}] if text else []
        if not final:
            return []
        content, calls = parse_tool_calls(self._buffer, self.fmt)
        self._buffer = ""
        return self._call_deltas(calls) if calls else [{"content": content or ""}]

    def _call_deltas(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for call in calls:
            fn = call["function"]
            head = {"index": self.calls, "id": call["id"], "type": "function", "function": {"name": fn["name"],
                    "arguments": ""}}  # fmt: skip
            out.append({"tool_calls": [head]})
            out.append({"tool_calls": [{"index": self.calls, "function": {"arguments": fn["arguments"]}}]})
            self.calls += 1
        return out


def _partial_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
