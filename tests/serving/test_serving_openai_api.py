"""The official `openai` client, unchanged, against a running server."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServingProcess


@pytest.fixture(scope="module")
def client(server: ServingProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(debug_model_dir: Path):
    return AutoTokenizer.from_pretrained(debug_model_dir)


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL_ID]


def test_completion_usage_counts_the_tokens(client: openai.OpenAI, tokenizer) -> None:
    prompt = "The platform serves models to applications"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    choice = r.choices[0]
    # a random model may hit end-of-sequence early: then the finish reason is "stop" (the EOS token is counted, as in
    # vLLM, so an EOS as the 12th token also gives 12 completion tokens)
    assert choice.finish_reason == "stop" or r.usage.completion_tokens == 12


def test_greedy_completion_equals_transformers_generate(
    client: openai.OpenAI, tokenizer, debug_model_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    prompt = "Models are served"
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    ids = tokenizer.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected


def test_chat_uses_the_tokenizers_chat_template(client: openai.OpenAI, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenizer.encode(templated, add_special_tokens=False))
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion"


def test_greedy_and_seeded_requests_are_reproducible(client: openai.OpenAI) -> None:
    def run(**kw: object) -> str:
        r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=10, **kw)  # type: ignore[call-overload]
        return r.choices[0].text

    assert run(temperature=0) == run(temperature=0)
    assert run(temperature=1.0, top_p=0.9, seed=7) == run(temperature=1.0, top_p=0.9, seed=7)


def test_stop_sequence_truncates_and_reports_stop(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_ID, prompt="Hello there", max_tokens=24, temperature=0)
    text = full.choices[0].text
    if len(text) < 6:
        pytest.skip("the debug model ended too early to pick a stop sequence")
    stop = text[3:6]
    cut = client.completions.create(model=MODEL_ID, prompt="Hello there", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    kw = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Stream please"}], "max_tokens": 16}
    whole = client.chat.completions.create(temperature=0, **kw)  # type: ignore[call-overload]
    stream = client.chat.completions.create(temperature=0, stream=True, stream_options={"include_usage": True}, **kw)  # type: ignore[call-overload]
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_raw_stream_is_sse_ending_with_done(server: ServingProcess) -> None:
    body = {"model": MODEL_ID, "prompt": "abc", "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {ALICE_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3  # at least one token, the finish chunk, [DONE]


def test_metrics_expose_the_documented_names(server: ServingProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL_ID, prompt="count me", max_tokens=3)
    text = httpx.get(server.ops_url + "/metrics", timeout=10).text
    for name in (
        "llm_serving_requests_total",
        "llm_serving_request_latency_seconds_bucket",
        "llm_serving_time_to_first_token_seconds_bucket",
        "llm_serving_generated_tokens_total",
        "llm_serving_prompt_tokens_total",
        "llm_serving_queue_depth",
        "llm_serving_batch_size_bucket",
        "llm_serving_inflight_requests",
        "llm_serving_rejected_requests_total",
        "llm_serving_ready",
    ):
        assert name in text, name
    assert 'llm_serving_requests_total{endpoint="completions",status="200"}' in text


def test_probes(server: ServingProcess) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.get(server.url + "/ping").status_code == 200
