"""Structured outputs and tools on the built-in engine (issue 26): per-row grammar masks (serving/grammar.py), the
tool-call formats (serving/tools.py), and the API through the real `openai` client, on the debug model.

The debug model is random, so what it writes is noise: these tests check the mechanics (the mask, the parse, the
deltas, the bounds), which hold whatever the model prefers. tests/serving/test_serving_structured_smollm2.py checks
the answers of a real model."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.backends import local
from serving.backends.base import RequestContext
from serving.backends.upstream import UpstreamBackend
from serving.batching import BatchScheduler, Event, FinishEvent, GenerationRequest, TokenEvent
from serving.decode import Decoder, SamplingParams
from serving.errors import APIError
from serving.grammar import (
    MAX_SCHEMA_DEPTH,
    GrammarCompiler,
    GrammarError,
    apply_bitmask,
    check_schema_size,
    json_grammar,
)
from serving.protocol import ChatCompletionRequest
from serving.tools import HERMES, LLAMA3_JSON, ToolStream, parse_tool_calls, tool_format
from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServerFactory, ServingProcess
from tests.serving.tool_template import HERMES_TOOLS_TEMPLATE, with_tool_template

TOOLS_MODEL = "debug-tools"
HEADERS = {"Authorization": f"Bearer {ALICE_KEY}"}
# bounded schemas: a random model completes them in a few tokens (an unbounded string could run to max_tokens)
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "word": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "color", "word"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "maxLength": 5}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(debug_model_dir: Path):
    return AutoTokenizer.from_pretrained(debug_model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


@pytest.fixture(scope="module")
def tools_server(
    start_server: ServerFactory, debug_model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServingProcess:
    model = with_tool_template(debug_model_dir, tmp_path_factory.mktemp("models") / TOOLS_MODEL)
    return start_server(
        "--model", str(model), "--served-model-name", TOOLS_MODEL, "--api-keys-file", str(keys_file),
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(tools_server: ServingProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tools_server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=120)


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = torch.arange(32, dtype=torch.int32)
    return ((bitmask[:, :, None] >> bits) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]


# -- grammar: masks, cache, bounds ---------------------------------------------------------------------------------


def test_the_mask_applies_to_its_row_only(tokenizer, compiler: GrammarCompiler) -> None:
    vocab = len(tokenizer)
    logits = torch.randn(3, vocab)
    requests = [GenerationRequest([1], SamplingParams(4), lambda e: None) for _ in range(3)]
    requests[1].grammar = compiler.compile(json_grammar(SCHEMA)).row()
    rows = [SimpleNamespace(request=r) for r in requests]
    failed: dict[int, str] = {}
    masked = BatchScheduler._constrained(logits, rows, failed)  # type: ignore[arg-type]
    assert not failed
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    ok = masked[1] > float("-inf")
    # the only tokens left for the first position of a JSON object are those starting with "{"
    assert 0 < int(ok.sum()) < vocab
    assert all(tokenizer.decode([t]).startswith("{") for t in ok.nonzero().flatten().tolist())


def test_apply_bitmask_matches_the_bits(compiler: GrammarCompiler) -> None:
    row = compiler.compile(json_grammar({"enum": ["yes", "no"]})).row()
    mask = row.new_bitmask(1)
    row.fill(mask, 0)
    logits = torch.zeros(3, compiler.vocab_size)
    out = apply_bitmask(logits, mask, [1])
    assert torch.equal(out[1] == 0, allowed(mask, compiler.vocab_size)[0])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.equal(logits, torch.zeros(3, compiler.vocab_size))  # a copy: the raw logits stay for logprobs


def test_compiled_grammars_are_cached_by_their_text(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}}
    before = compiler.compiled
    first = compiler.compile(json_grammar(schema))
    again = compiler.compile(json_grammar(json.loads(json.dumps(schema))))
    assert again is first and compiler.compiled == before + 1
    # each request gets its own matcher: advancing one leaves the cached grammar pristine
    a, b = first.row(), first.row()
    mask_a, mask_b = a.new_bitmask(1), b.new_bitmask(1)
    a.accept(next(t for t in range(compiler.vocab_size) if _starts_object(compiler, t)))
    a.fill(mask_a, 0)
    b.fill(mask_b, 0)
    assert not torch.equal(mask_a, mask_b)


def _starts_object(compiler: GrammarCompiler, token: int) -> bool:
    row = compiler.compile(json_grammar({"type": "object"})).row()
    mask = row.new_bitmask(1)
    row.fill(mask, 0)
    return bool(allowed(mask, compiler.vocab_size)[0, token])


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "description": "x" * 70_000}, "bytes serialized"),
        (json.loads('{"type":"array","items":' * 40 + "{}" + "}" * 40), f"deeper than {MAX_SCHEMA_DEPTH}"),
    ],
)
def test_schemas_are_bounded_before_compiling(schema: dict, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        check_schema_size(schema, "the schema")


@pytest.mark.parametrize(
    "schema", [{"type": "foo"}, {"type": "string", "pattern": "(a"}, {"type": "object", "required": 3}]
)
def test_unusable_schemas_fail_at_compile_not_in_the_engine(compiler: GrammarCompiler, schema: dict) -> None:
    with pytest.raises(GrammarError):
        compiler.compile(json_grammar(schema))


def test_a_slow_compile_is_a_400_not_a_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request waits at most GRAMMAR_COMPILE_TIMEOUT_S for its grammar; the compile runs on its own pool."""
    monkeypatch.setattr(local, "GRAMMAR_COMPILE_TIMEOUT_S", 0.2)
    release = threading.Event()

    def slow(text: str) -> None:
        release.wait(10)

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    fake = SimpleNamespace(
        _grammar_text=lambda body: ("grammar", "response_format"),
        _grammar_pool=pool,
        _grammars=SimpleNamespace(compile=slow),
    )
    body = ChatCompletionRequest.model_validate({"messages": USER, "response_format": {"type": "json_object"}})
    started = time.monotonic()
    with pytest.raises(APIError) as err:
        asyncio.run(local.LocalBackend._grammar(fake, body))  # type: ignore[arg-type]
    release.set()
    pool.shutdown()
    assert time.monotonic() - started < 5
    assert err.value.status == 400 and err.value.code == "invalid_grammar" and err.value.param == "response_format"


# -- the engine: constrained rows beside free ones -----------------------------------------------------------------


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: FinishEvent | None = None
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
        else:
            self.finish = event
            self.done.set()


def test_a_constrained_row_parses_and_leaves_its_neighbours_unchanged(debug_model_dir: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    eos = {tokenizer.eos_token_id}
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, eos)
    prompt = tokenizer.encode("The quick brown fox")

    def run(constrained: list[bool], params: SamplingParams) -> list[Collector]:
        scheduler = BatchScheduler(Decoder(model, tokenizer.pad_token_id), eos, max_batch_size=4)
        scheduler.start()
        try:
            collectors = [Collector() for _ in constrained]
            for c, on in zip(collectors, constrained, strict=True):
                request = GenerationRequest(prompt, params, c)
                request.grammar = compiler.compile(json_grammar(SCHEMA)).row() if on else None
                scheduler.submit(request)
            for c in collectors:
                assert c.done.wait(60)
            return collectors
        finally:
            scheduler.stop(10)

    for params in (SamplingParams(40, temperature=0.0), SamplingParams(40, temperature=1.0, seed=7)):
        alone = run([False], params)[0]
        free, json_row, free2 = run([False, True, False], params)
        assert free.tokens == alone.tokens == free2.tokens  # the mask of one row never reaches another
        assert json_row.finish is not None and json_row.finish.reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(json_row.tokens)), SCHEMA)


# -- tool-call formats ---------------------------------------------------------------------------------------------


def test_tool_format_is_read_from_the_template(debug_model_dir: Path) -> None:
    assert tool_format(HERMES_TOOLS_TEMPLATE) == HERMES
    assert tool_format((debug_model_dir / "chat_template.jinja").read_text()) is None  # no tools: refused
    llama = "{% if tools %}{{ tools | tojson }}{% endif %}<|start_header_id|>ipython<|end_header_id|><|python_tag|>"
    assert tool_format(llama) == LLAMA3_JSON


@pytest.mark.parametrize(
    ("fmt", "text", "content", "calls"),
    [
        (HERMES, 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "Sure.", [("f", {"a": 1})]),
        (
            HERMES,
            '<tool_call>{"name":"f","arguments":{}}</tool_call>\n<tool_call>{"name":"g","arguments":{"b":"x"}}</tool_call>',
            None,
            [("f", {}), ("g", {"b": "x"})],
        ),
        # SmolLM2's prompt asks for a list of calls in one block
        (HERMES, '<tool_call>[{"name":"f","arguments":{"a":2}}]</tool_call>', None, [("f", {"a": 2})]),
        (HERMES, '<tool_call>{"name":"f","arguments":{"a":3}}', None, [("f", {"a": 3})]),  # ended without its tag
        (HERMES, "<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
        (HERMES, "just text", "just text", []),
        (LLAMA3_JSON, '<|python_tag|>{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
        (LLAMA3_JSON, '{"name":"f","parameters":{}}; {"name":"g","parameters":{"x":[1]}}', None,
         [("f", {}), ("g", {"x": [1]})]),
        (LLAMA3_JSON, "The answer is 4.", "The answer is 4.", []),
        (LLAMA3_JSON, '{"answer": 4}', '{"answer": 4}', []),
    ],
)  # fmt: skip
def test_tool_calls_are_parsed(fmt: str, text: str, content: str | None, calls: list) -> None:
    got_content, got = parse_tool_calls(text, fmt)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (HERMES, 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
                 '<tool_call>{"name":"g","arguments":{}}</tool_call>'),
        (HERMES, "No tools needed: 2 < 3 and <tool is not a tag."),
        (LLAMA3_JSON, '{"name": "f", "parameters": {"a": [1, 2]}}'),
        (LLAMA3_JSON, "Plain answer."),
    ],
)  # fmt: skip
@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_streamed_deltas_add_up_to_the_whole_parse(fmt: str, text: str, piece: int) -> None:
    stream = ToolStream(fmt)
    deltas = []
    for i in range(0, len(text), piece):
        deltas += stream.feed(text[i : i + piece])
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            if "id" in tc:
                assert tc["id"].startswith("call_") and tc["type"] == "function"
            call["name"] += tc["function"].get("name", "")
            call["arguments"] += tc["function"].get("arguments", "")
    want_content, want_calls = parse_tool_calls(text, fmt)
    assert content.strip() == (want_content or "").strip()
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want_calls
    ]


# -- through the server and the openai client ----------------------------------------------------------------------


def test_json_schema_answer_validates(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=USER,  # type: ignore[arg-type]
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}},
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_json_schema_streamed_answer_validates(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=USER,  # type: ignore[arg-type]
        max_tokens=60,
        stream=True,
        seed=3,
        temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


class Answer(pydantic.BaseModel):
    ok: bool
    color: str = pydantic.Field(json_schema_extra={"enum": ["red", "green"]})


def test_openai_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(model=TOOLS_MODEL, messages=USER, max_tokens=40, response_format=Answer)  # type: ignore[arg-type]
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Answer) and parsed.color in ("red", "green")


def test_json_object_is_accepted_on_completions_too(tools_server: ServingProcess) -> None:
    r = httpx.post(
        tools_server.url + "/v1/completions",
        json={"model": TOOLS_MODEL, "prompt": "x", "max_tokens": 30, "response_format": {"type": "json_schema",
              "json_schema": {"name": "e", "schema": {"enum": ["alpha", "beta"]}}}},
        headers=HEADERS,
        timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["text"]) in ("alpha", "beta")


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "Invalid response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"description": "y" * 70_000}}}, "bytes"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads('{"type":"array","items":' * 40
          + "{}" + "}" * 40)}}, "deeper"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(a|"}}},
         "Invalid response_format"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "xml"}, "response_format"),
    ],
)  # fmt: skip
def test_hostile_or_broken_schemas_are_400_and_the_server_stays_up(
    tools_server: ServingProcess, response_format: dict, message: str
) -> None:
    body = {"model": TOOLS_MODEL, "messages": USER, "max_tokens": 5, "response_format": response_format}
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"].startswith("response_format")
    ok = httpx.post(
        tools_server.url + "/v1/chat/completions",
        json={"model": TOOLS_MODEL, "messages": USER, "max_tokens": 2},
        headers=HEADERS,
        timeout=60,
    )
    assert ok.status_code == 200


def _call_args(call) -> dict:
    return json.loads(call.function.arguments)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_are_parsed_and_follow_the_parameters(client: openai.OpenAI, tool_choice) -> None:
    out = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=[{"role": "user", "content": "time?"}],
        max_tokens=60,
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        tool_choice=tool_choice,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time"
    jsonschema.validate(_call_args(call), tool["function"]["parameters"])


def test_forced_tool_call_streams_as_openai_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=[{"role": "user", "content": "weather?"}],
        max_tokens=60,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_calls_and_results_are_accepted_in_the_history(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"unit":"c"}'}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20C"},
        ],
        max_tokens=3,
        tools=[WEATHER],  # type: ignore[list-item]
    )  # fmt: skip
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_on_a_template_without_tool_support_are_refused_naming_the_model(server: ServingProcess) -> None:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert MODEL_ID in err.value.message and err.value.code == "tools_unsupported"
    assert err.value.body["param"] == "tools"  # type: ignore[index]
    # tool_choice none: the tools are not rendered, so nothing needs the template's support
    out = c.chat.completions.create(
        model=MODEL_ID,
        messages=USER,  # type: ignore[arg-type]
        max_tokens=2,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
    )
    assert out.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ],
)  # fmt: skip
def test_inconsistent_tool_requests_are_400(tools_server: ServingProcess, extra: dict, param: str) -> None:
    body = {"model": TOOLS_MODEL, "messages": USER, "max_tokens": 2, **extra}
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_the_gateway_forwards_tools_and_response_format_as_sent() -> None:
    """vLLM implements both: the gateway passes them on (the schema under its wire name `schema`), with history tool
    calls, instead of dropping them."""
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "20C"},
    ]
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, "tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False,
         "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}
    )  # fmt: skip
    payload = UpstreamBackend("http://127.0.0.1:9", default_max_tokens=3)._payload(body, RequestContext("r", "chat"))
    assert payload["response_format"]["json_schema"]["schema"] == SCHEMA
    assert payload["tools"][0]["function"]["parameters"] == WEATHER["function"]["parameters"]
    assert (payload["tool_choice"], payload["parallel_tool_calls"]) == ("auto", False)
    assert payload["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert payload["messages"][2]["tool_call_id"] == "c1"
