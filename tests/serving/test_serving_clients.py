"""The clients people point at an OpenAI-compatible endpoint, pinned in requirements.txt, driving this server
unchanged (issue 26): `openai` (sync and async), LangChain (`ChatOpenAI`, and `OpenAI`'s batch that packs prompts
into one request), LiteLLM (its `openai/` provider with `api_base`). Chat, streaming, usage, `n`, logprobs, prompt
lists, the max_tokens clamp, and errors mapped to each client's exception types, on the debug model; answer text and
logprobs on SmolLM2 (`real_model`).

LlamaIndex's `OpenAILike` (llama-index-llms-openai-like 0.8.1) needs llama-index-llms-openai 0.8.x, which asks
`openai<3`: it cannot share this environment's openai 3.x, and its test is skipped with that reason.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServerFactory, ServingProcess

# the tool-capable debug model, its server and tool definition, as the structured-output tests serve them
from tests.serving.test_serving_structured import TOOLS_MODEL, WEATHER, tools_server  # noqa: F401

# LiteLLM fetches a model price list from the internet at import unless told to use its bundled copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def sync_client(server: ServingProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=60)


def completions_requests(server: ServingProcess) -> int:
    return sum(1 for a in server.audit_lines() if a["endpoint"] == "completions" and a["status"] == 200)


# -- openai -------------------------------------------------------------------------------------------------------


def test_openai_sync_chat_stream_usage_n_and_logprobs(sync_client: openai.OpenAI) -> None:
    r = sync_client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=6, n=2, logprobs=True)  # type: ignore[arg-type]
    assert [c.index for c in r.choices] == [0, 1] and r.usage is not None
    assert r.usage.completion_tokens == sum(len(c.logprobs.content or []) for c in r.choices if c.logprobs)
    chunks = list(
        sync_client.chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_openai_sync_errors_and_the_max_tokens_clamp(sync_client: openai.OpenAI, server: ServingProcess) -> None:
    with pytest.raises(openai.BadRequestError):
        sync_client.chat.completions.create(model=MODEL_ID, messages=USER, temperature=5)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        sync_client.chat.completions.create(model="no-such-model", messages=USER)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    raw = sync_client.chat.completions.with_raw_response.create(model=MODEL_ID, messages=USER, max_tokens=4096)  # type: ignore[arg-type]
    assert raw.headers["X-Max-Tokens-Clamped"] == "4096->256"  # the shared server's --max-tokens-cap


def test_openai_async_chat_and_stream(server: ServingProcess) -> None:
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0) as client:
            kw = {"model": MODEL_ID, "messages": USER, "max_tokens": 6, "temperature": 0}
            whole = await client.chat.completions.create(**kw)  # type: ignore[call-overload]
            stream = await client.chat.completions.create(stream=True, **kw)  # type: ignore[call-overload]
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return whole.choices[0].message.content or "", text

    whole, streamed = asyncio.run(run())
    assert whole == streamed and whole


# -- LangChain ------------------------------------------------------------------------------------------------------


def test_langchain_chat_invoke_stream_batch_n_and_logprobs(server: ServingProcess) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL_ID, base_url=server.url + "/v1", api_key=ALICE_KEY, max_tokens=6, temperature=0,
                     max_retries=0)  # fmt: skip
    answer = llm.invoke("Hello")
    assert isinstance(answer.content, str) and answer.usage_metadata and answer.usage_metadata["output_tokens"] >= 1
    assert "".join(str(c.content) for c in llm.stream("Hello")) == answer.content
    assert [m.content for m in llm.batch(["Hello", "Hello"])] == [answer.content] * 2
    scored = llm.bind(logprobs=True).invoke("Hello")
    assert scored.response_metadata["logprobs"]["content"]
    two = ChatOpenAI(model=MODEL_ID, base_url=server.url + "/v1", api_key=ALICE_KEY, max_tokens=4, n=2, seed=3,
                     max_retries=0).generate([[HumanMessage("Hello")]])  # fmt: skip
    assert len(two.generations[0]) == 2


def test_langchain_completions_batch_packs_prompts_into_one_request(server: ServingProcess) -> None:
    from langchain_openai import OpenAI

    llm = OpenAI(model=MODEL_ID, base_url=server.url + "/v1", api_key=ALICE_KEY, max_tokens=3, temperature=0,
                 max_retries=0)  # fmt: skip
    prompts = [f"Prompt number {i}" for i in range(20)]
    before = completions_requests(server)
    result = llm.generate(prompts)  # BaseOpenAI sends up to batch_size (20) prompts per request
    assert len(result.generations) == 20 and all(len(g) == 1 for g in result.generations)
    assert completions_requests(server) - before == 1
    alone = llm.invoke(prompts[7])
    assert result.generations[7][0].text == alone


def test_langchain_errors_are_openai_exceptions(server: ServingProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="no-such-model", base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        llm.invoke("Hello")


# -- LiteLLM --------------------------------------------------------------------------------------------------------


def test_litellm_completion_stream_usage_and_errors(server: ServingProcess) -> None:
    import litellm

    kw = {"model": f"openai/{MODEL_ID}", "api_base": server.url + "/v1", "api_key": ALICE_KEY, "max_tokens": 6,
          "temperature": 0}  # fmt: skip
    r = litellm.completion(messages=USER, **kw)
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    chunks = list(litellm.completion(messages=USER, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    two = litellm.completion(messages=USER, n=2, **kw)
    assert len(two.choices) == 2
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(messages=USER, **{**kw, "temperature": 5})
    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(messages=USER, **{**kw, "api_key": "sk-wrong"})
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(messages=USER, **{**kw, "model": "openai/no-such-model"})


def test_litellm_async_completion(server: ServingProcess) -> None:
    import litellm

    r = asyncio.run(
        litellm.acompletion(
            model=f"openai/{MODEL_ID}", api_base=server.url + "/v1", api_key=ALICE_KEY, messages=USER, max_tokens=4
        )
    )
    assert r.usage.completion_tokens >= 1


# -- tools and structured outputs through the clients (debug model served with a tool-capable template) -----------


def test_langchain_bind_tools_and_structured_output(tools_server: ServingProcess) -> None:  # noqa: F811
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, ConfigDict, Field

    class Verdict(BaseModel):  # bounded, so the random debug model completes it in a few tokens
        model_config = ConfigDict(extra="forbid")  # additionalProperties false: else it may add keys until max_tokens
        ok: bool
        color: str = Field(json_schema_extra={"enum": ["red", "green", "blue"]})

    llm = ChatOpenAI(model=TOOLS_MODEL, base_url=tools_server.url + "/v1", api_key=ALICE_KEY, max_tokens=60,
                     temperature=0, max_retries=0)  # fmt: skip
    # a named tool choice is enforced by constrained decoding: the call is parsed into AIMessage.tool_calls
    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather?")
    assert [c["name"] for c in called.tool_calls] == ["get_weather"]
    assert called.tool_calls[0]["args"]["unit"] in ("c", "f")
    # LangChain's default structured output (json_schema, strict) and its function-calling method
    for method in ("json_schema", "function_calling"):
        verdict = llm.with_structured_output(Verdict, method=method).invoke("Judge this.")
        assert isinstance(verdict, Verdict) and verdict.color in ("red", "green", "blue"), method


def test_litellm_tools_and_json_schema(tools_server: ServingProcess) -> None:  # noqa: F811
    import json

    import litellm

    kw = {"model": f"openai/{TOOLS_MODEL}", "api_base": tools_server.url + "/v1", "api_key": ALICE_KEY,
          "max_tokens": 60, "temperature": 0}  # fmt: skip
    r = litellm.completion(messages=USER, tools=[WEATHER], tool_choice="required", **kw)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["unit"] in ("c", "f")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    r = litellm.completion(
        messages=USER, response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}, **kw
    )
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_llama_index_openai_like() -> None:
    pytest.skip(
        "llama-index-llms-openai-like 0.8.1 needs llama-index-llms-openai 0.8.x, which requires openai<3; this "
        "environment pins openai 3.x (docs/serving.md, Compatibility)"
    )


# -- SmolLM2: answer text and logprobs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(start_server: ServerFactory, keys_file: Path) -> Iterator[tuple[ServingProcess, Path]]:
    from ops.smollm2 import ensure as smollm2_dir

    path = smollm2_dir()
    proc = start_server("--model", str(path), "--served-model-name", "smol", "--api-keys-file", str(keys_file))
    yield proc, path
    proc.stop()


@pytest.mark.real_model
def test_smollm2_through_the_clients_answers_and_scores_as_the_model(smol: tuple[ServingProcess, Path]) -> None:
    import litellm
    import torch
    from langchain_openai import ChatOpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    server, path = smol
    question = [{"role": "user", "content": "What is the capital of France?"}]
    lc = ChatOpenAI(model="smol", base_url=server.url + "/v1", api_key=ALICE_KEY, max_tokens=20, temperature=0,
                    max_retries=0)  # fmt: skip
    assert "Paris" in str(lc.invoke(question).content)
    ll = litellm.completion(model="openai/smol", api_base=server.url + "/v1", api_key=ALICE_KEY, messages=question,
                            max_tokens=20, temperature=0)  # fmt: skip
    assert "Paris" in ll.choices[0].message.content
    # logprobs of a greedy completion: the model's own log-softmax (transformers, the same weights)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=120)
    prompt = "The capital of France is"
    r = client.completions.create(model="smol", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    full = out[0].tolist()[: len(ids) + 4]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), dim=-1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(full)
    for i in range(1, len(full)):
        assert abs(lp.token_logprobs[i] - float(expected[i - 1, full[i]])) < 2e-3, i
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {ALICE_KEY}"}).status_code == 200
