"""`n > 1`, prompt lists, `echo` + prompt logprobs, streamed logprobs and the Hugging Face / TGI `/invocations` body
(issue 26): in the engine (a prompt's choices share one prefill) and through the API."""

from __future__ import annotations

import io
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.batching import BatchPolicy, BatchScheduler, Event, FinishEvent, GenerationRequest, TokenEvent
from serving.decode import Decoder, SamplingParams
from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServerFactory, ServingProcess

HEADERS = {"Authorization": f"Bearer {ALICE_KEY}"}


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


class CountingDecoder(Decoder):
    """Counts the prompt tokens the engine computes."""

    prefilled = 0

    def prefill_full(self, prompts: list[list[int]]):  # type: ignore[no-untyped-def]
        CountingDecoder.prefilled += sum(len(p) for p in prompts)
        return super().prefill_full(prompts)


@pytest.fixture(scope="module")
def model(debug_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(debug_model_dir).eval(), AutoTokenizer.from_pretrained(debug_model_dir)


def submit_forked(scheduler: BatchScheduler, ids: list[int], params: list[SamplingParams]) -> list[Collector]:
    collectors = [Collector() for _ in params]
    requests = [GenerationRequest(ids, p, c) for p, c in zip(params, collectors, strict=True)]
    requests[0].forks = requests[1:]
    scheduler.submit(requests[0])
    for c in collectors:
        assert c.done.wait(60), "a choice never finished"
    return collectors


@pytest.mark.parametrize(("policy", "budget"), [(BatchPolicy.CONTINUOUS, 0), (BatchPolicy.CONTINUOUS, 4),
                                                (BatchPolicy.DYNAMIC, 0)])  # fmt: skip
def test_choices_share_one_prefill_and_greedy_choices_equal_generate(model, policy: BatchPolicy, budget: int) -> None:
    """Four greedy choices of one prompt: the prompt is computed once (whole, or in chunks of 4 tokens), and every
    choice is exactly what `generate` gives for the prompt alone."""
    m, tok = model
    ids = tok.encode("The choices of one prompt share its prefill")
    want = m.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids) :].tolist()
    CountingDecoder.prefilled = 0
    scheduler = BatchScheduler(CountingDecoder(m, 0), {tok.eos_token_id}, policy=policy, token_budget=budget)
    scheduler.start()
    try:
        out = submit_forked(scheduler, ids, [SamplingParams(max_tokens=6, temperature=0.0)] * 4)
    finally:
        scheduler.stop(10)
    assert [c.tokens for c in out] == [want] * 4
    assert all(c.finish is not None and c.finish.reason == "length" for c in out)
    if budget == 0:  # chunked prefill goes through prefill_begin / prefill_more, not prefill_full
        assert CountingDecoder.prefilled == len(ids)


def test_seeded_choices_differ_and_are_reproducible(model) -> None:
    m, tok = model
    ids = tok.encode("Sampled choices")
    scheduler = BatchScheduler(Decoder(m, 0), {tok.eos_token_id})
    scheduler.start()
    try:
        params = [SamplingParams(max_tokens=8, temperature=1.0, seed=7 + j) for j in range(3)]
        first = [c.tokens for c in submit_forked(scheduler, ids, params)]
        again = [c.tokens for c in submit_forked(scheduler, ids, params)]
        alone = submit_forked(scheduler, ids, params[1:2])[0].tokens  # choice 1's seed, on its own
    finally:
        scheduler.stop(10)
    assert first == again and len({tuple(t) for t in first}) == 3
    assert alone == first[1]  # a fork samples exactly as the same request without forks


def test_a_request_wider_than_the_batch_is_refused(model) -> None:
    m, tok = model
    scheduler = BatchScheduler(Decoder(m, 0), {tok.eos_token_id}, max_batch_size=2)
    parent = GenerationRequest([1, 2], SamplingParams(max_tokens=1), Collector())
    parent.forks = [GenerationRequest([1, 2], SamplingParams(max_tokens=1), Collector()) for _ in range(2)]
    with pytest.raises(ValueError, match="3 rows"):
        scheduler.sched.add(parent)


# -- through the API ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server: ServingProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=60)


def test_n_and_prompt_lists_index_choices_as_openai(client: openai.OpenAI) -> None:
    prompts = ["First prompt", "Second one", "Third"]
    r = client.completions.create(model=MODEL_ID, prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(prompts):  # prompt i, choice j is index i * n + j; greedy: both choices as the prompt alone
        alone = client.completions.create(model=MODEL_ID, prompt=p, max_tokens=4, temperature=0)
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == alone.choices[0].text
        assert alone.usage is not None
    assert r.usage is not None and r.usage.completion_tokens == sum(4 for _ in r.choices)
    ids = client.completions.create(model=MODEL_ID, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage is not None and ids.usage.prompt_tokens == 5


def test_chat_n_with_a_seed_differs_per_choice_and_repeats(client: openai.OpenAI) -> None:
    kw = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 8, "seed": 11}
    a = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    b = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) == 3
    one = client.chat.completions.create(**{**kw, "n": 1})  # type: ignore[call-overload]
    assert one.choices[0].message.content == texts[0]  # choice 0 is what n=1 gets


def test_streamed_n_interleaves_choices_with_their_logprobs(client: openai.OpenAI) -> None:
    kw = {"model": MODEL_ID, "prompt": "Streamed", "n": 2, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))  # type: ignore[call-overload]
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        tokens = [t for c in mine if c.logprobs for t in c.logprobs.token_logprobs or []]
        assert choice.logprobs is not None and tokens == choice.logprobs.token_logprobs
        assert mine[-1].finish_reason == "length"
    assert chunks[-1].usage == whole.usage
    chat = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0, stream=True,
            logprobs=True, top_logprobs=1,
        )
    )  # fmt: skip
    content = [t for c in chat if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert len(content) >= 1 and all(len(t.top_logprobs) == 1 for t in content)


def test_echo_logprobs_score_the_prompt_as_the_models_log_softmax(client: openai.OpenAI, debug_model_dir: Path) -> None:
    """lm-eval-harness's loglikelihood request: echo, max_tokens 0, logprobs 1."""
    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    m = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    prompt = "The capital of France is Paris"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, echo=True, max_tokens=0, logprobs=1)
    choice = r.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 0
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        expected = torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), dim=-1)
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(expected[i - 1, ids[i]])) < 1e-4
        best = int(expected[i - 1].argmax())
        assert list(lp.top_logprobs[i]) == [tokenizer.decode([best])]
    # with generation after the echoed prompt: the prompt's scores, then the completion's
    more = client.completions.create(model=MODEL_ID, prompt=prompt, echo=True, max_tokens=3, logprobs=0, temperature=0)
    assert more.choices[0].text.startswith(prompt) and more.choices[0].logprobs is not None
    assert more.choices[0].logprobs.token_logprobs[: len(ids)] == lp.token_logprobs
    assert len(more.choices[0].logprobs.token_logprobs or []) == len(ids) + 3


def test_max_tokens_zero_only_with_echo(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=0)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "max_tokens"


def test_n_and_choices_beyond_their_bounds_are_refused(server: ServingProcess) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": 17}, headers=HEADERS, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["x"] * 20, "n": 4}, headers=HEADERS, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


# -- SageMaker: the Hugging Face LLM container's (TGI's) body ------------------------------------------------------


def test_tgi_body_with_details_and_full_text(server: ServingProcess) -> None:
    body = {"inputs": "What is a GPU?", "parameters": {"max_new_tokens": 4, "details": True, "do_sample": False,
                                                       "return_full_text": True}}  # fmt: skip
    r = httpx.post(server.url + "/invocations", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    [out] = r.json()
    assert out["generated_text"].startswith("What is a GPU?")
    details = out["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 4
    assert len(details["tokens"]) == 4 and all(t["logprob"] <= 0 for t in details["tokens"])
    assert "".join(t["text"] for t in details["tokens"]) == out["generated_text"][len("What is a GPU?") :]


def test_tgi_stream_is_tgi_server_sent_events(server: ServingProcess) -> None:
    body = {"inputs": "Stream me", "parameters": {"max_new_tokens": 5, "details": True, "do_sample": False},
            "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/invocations", json=body, headers=HEADERS, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    events = [json.loads(line[len("data:") :]) for line in lines]  # every line is JSON: no [DONE]
    assert all(e["token"]["text"] for e in events) and [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"]["finish_reason"] == "length" and events[-1]["details"]["generated_tokens"] == 5
    assert events[-1]["details"]["input_length"] >= 1
    whole = httpx.post(server.url + "/invocations", json={**body, "stream": False}, headers=HEADERS, timeout=60)
    assert whole.json()[0]["generated_text"] == events[-1]["generated_text"]


class LineIterator:
    """The line reader of the Hugging Face / AWS examples for `InvokeEndpointWithResponseStream` (boto3 yields
    `{"PayloadPart": {"Bytes": b"..."}}` events whose boundaries fall anywhere, mid-line and mid-character)."""

    def __init__(self, events: Iterator[dict]) -> None:
        self.events, self.buffer, self.read_pos = events, io.BytesIO(), 0

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while True:
            self.buffer.seek(self.read_pos)
            line = self.buffer.readline()
            if line and line[-1] == ord("\n"):
                self.read_pos += len(line)
                return line[:-1]
            chunk = next(self.events)  # StopIteration ends the iterator
            self.buffer.seek(0, io.SEEK_END)
            self.buffer.write(chunk["PayloadPart"]["Bytes"])


def test_tgi_stream_read_as_sagemaker_payload_parts(server: ServingProcess) -> None:
    """The bytes of a TGI stream, cut into SageMaker `PayloadPart`s at arbitrary points, read with the documented
    client loop: every `data:` line is one JSON event and the tokens add up to the final text."""
    body = {"inputs": "Ünïcode and parts", "parameters": {"max_new_tokens": 8, "seed": 5}, "stream": True}
    with httpx.stream("POST", server.url + "/invocations", json=body, headers=HEADERS, timeout=60) as r:
        raw = r.read()
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(raw)), min(20, len(raw) - 1)))
    parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    events = iter({"PayloadPart": {"Bytes": p}} for p in parts)
    tokens, final = [], None
    for line in LineIterator(events):
        if line.startswith(b"data:"):
            event = json.loads(line[5:].decode())
            tokens.append(event["token"]["text"])
            final = event["generated_text"] or final
    assert final is not None and "".join(tokens) == final


def test_a_small_batch_runs_choices_group_by_group_and_refuses_n_beyond_it(
    start_server: ServerFactory, debug_model_dir: Path, keys_file: Path
) -> None:
    """--max-batch-size 2: three prompts x n=2 run one prompt's choices at a time (a group is admitted whole), and
    n=3 can never fit: 400 naming n."""
    small = start_server(
        "--model", str(debug_model_dir), "--served-model-name", MODEL_ID, "--api-keys-file", str(keys_file),
        "--max-batch-size", "2",
    )  # fmt: skip
    body = {"prompt": ["one", "two", "three"], "n": 2, "max_tokens": 3, "temperature": 0}
    r = httpx.post(small.url + "/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(texts) == 6 and texts[0::2] == texts[1::2]
    r = httpx.post(small.url + "/v1/completions", json={**body, "n": 3}, headers=HEADERS, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    small.stop()
