"""The built-in engine's generic decode path (the model's own `forward`), which every architecture but Llama takes,
on a tiny GPT-2: greedy decoding through the batching engine equals `transformers` `generate`, batched requests equal
solo ones, and the model serves through the HTTP API."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.batching import BatchPolicy, BatchScheduler
from serving.decode import Decoder, SamplingParams
from tests.serving.conftest import ALICE_KEY, GPT2_MODEL_ID, ServerFactory, ServingProcess
from tests.serving.test_serving_batching import PROMPTS, run_all


@pytest.fixture(scope="module")
def gpt2(gpt2_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(gpt2_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(gpt2_model_dir)


def hf_greedy(model, tok, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    return out[0, len(ids) :].tolist()


def test_a_non_llama_model_takes_the_generic_path(gpt2) -> None:
    model, tok = gpt2
    decoder = Decoder(model, tok.pad_token_id)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert decoder._fast is None  # not the direct-tensor Llama step
    assert decoder.supports_merge  # so `continuous` batching joins rows mid-flight through `forward` too


@pytest.mark.parametrize("policy", list(BatchPolicy))
def test_generic_path_batched_greedy_matches_hf_generate(gpt2, policy: BatchPolicy) -> None:
    model, tok = gpt2
    prompts = [tok.encode(p) for p in PROMPTS]
    max_tokens = [12, 9, 12, 5]
    expected = [hf_greedy(model, tok, ids, n) for ids, n in zip(prompts, max_tokens, strict=True)]
    requests = [(p, SamplingParams(n, temperature=0.0)) for p, n in zip(prompts, max_tokens, strict=True)]

    def decode(max_batch_size: int) -> list[list[int]]:
        decoder = Decoder(model, tok.pad_token_id)
        scheduler = BatchScheduler(decoder, set(), max_batch_size=max_batch_size, policy=policy)
        scheduler.start()
        try:
            return [c.tokens for c in run_all(scheduler, requests)]
        finally:
            scheduler.stop()

    # batch of 3 with left padding (the 4th waits, and with `continuous` joins mid-flight), then one at a time
    assert decode(3) == expected
    assert decode(1) == expected


@pytest.fixture(scope="module")
def gpt2_server(start_server: ServerFactory, gpt2_model_dir: Path, keys_file: Path) -> ServingProcess:
    return start_server(
        "--model", str(gpt2_model_dir), "--served-model-name", GPT2_MODEL_ID, "--api-keys-file", str(keys_file),
    )  # fmt: skip


def test_generic_path_serves_through_the_api(gpt2, gpt2_server: ServingProcess) -> None:
    model, tok = gpt2
    client = openai.OpenAI(base_url=gpt2_server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [GPT2_MODEL_ID]

    def complete(prompt: str) -> str:
        r = client.completions.create(model=GPT2_MODEL_ID, prompt=prompt, max_tokens=10, temperature=0)
        return r.choices[0].text

    expected = [tok.decode(hf_greedy(model, tok, tok.encode(p), 10), skip_special_tokens=True) for p in PROMPTS]
    assert [complete(p) for p in PROMPTS] == expected  # solo
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched by the engine
        assert list(pool.map(complete, PROMPTS * 2)) == expected * 2

    messages = [{"role": "user", "content": "Say something"}]
    chat = client.chat.completions.create(model=GPT2_MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=GPT2_MODEL_ID, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert chat.choices[0].message.content == streamed
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
