"""Usage accounting of the built-in engine matches vLLM: the EOS token that ends an answer is a completion token
(vLLM: completion_tokens = len(output.token_ids), EOS included), in complete and stream responses alike. The gateway
passes the upstream's usage through unchanged (tests/serving/test_serving_upstream.py), so a bill or a token limit
is the same whichever engine served the request. Also: the engine's thread default and the prefix-cache metrics on
the real model."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from serving.backends.base import RequestContext
from serving.config import ServingConfig
from serving.metrics import Metrics
from serving.protocol import ChatCompletionRequest


@pytest.fixture(scope="module")
def backend():
    from ops.smollm2 import ensure as smollm2_dir
    from serving.backends.local import LocalBackend

    path = smollm2_dir()
    metrics = Metrics()
    cfg = ServingConfig(model=str(path), served_model_name="smol", torch_threads=1, prefix_cache_mb=16)
    b = LocalBackend(path, cfg, observer=metrics)
    b.metrics = metrics  # type: ignore[attr-defined]
    yield b
    asyncio.run(b.close())


def _body(stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "smol",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 40,
            "temperature": 0,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
    )


def test_eos_counts_as_a_completion_token(backend) -> None:
    tok = backend.tokenizer
    body = _body(stream=False)
    prompt = list(
        tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], tokenize=True, add_generation_prompt=True
        )["input_ids"]
    )
    with torch.inference_mode():
        out = backend.model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    generated = out[0, len(prompt) :].tolist()
    assert tok.eos_token_id in generated, "the reference answer must end with EOS for this test to mean anything"
    with_eos = generated[: generated.index(tok.eos_token_id) + 1]

    r = asyncio.run(backend.complete(body, RequestContext("r1", "chat")))
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["message"]["content"] == tok.decode(with_eos, skip_special_tokens=True)
    assert r["usage"]["completion_tokens"] == len(with_eos)  # the answer's tokens + EOS
    assert r["usage"]["total_tokens"] == len(prompt) + len(with_eos)

    async def stream() -> list[dict]:
        return [chunk async for chunk in await backend.stream(_body(stream=True), RequestContext("r2", "chat"))]

    chunks = asyncio.run(stream())
    assert chunks[-1]["usage"]["completion_tokens"] == len(with_eos)


def test_thread_default_is_logged_and_prefix_hits_reach_metrics(caplog: pytest.LogCaptureFixture) -> None:
    from ops.smollm2 import ensure as smollm2_dir
    from serving.backends.local import LocalBackend
    from serving.threads import cpu_budget

    path = smollm2_dir()
    metrics = Metrics()
    with caplog.at_level(logging.INFO, logger="serving.local"):
        b = LocalBackend(path, ServingConfig(model=str(path), served_model_name="smol"), observer=metrics)
    try:
        assert torch.get_num_threads() == cpu_budget().threads
        assert any("cpu threads:" in r.getMessage() and "affinity" in r.getMessage() for r in caplog.records)
        for i in range(2):
            asyncio.run(b.complete(_body(stream=False), RequestContext(f"p{i}", "chat")))
        hits = metrics.registry.get_sample_value("llm_serving_prefix_cache_hits_total")
        assert hits and hits >= 16  # the second identical prompt reused the first one's blocks
    finally:
        asyncio.run(b.close())
        torch.set_num_threads(1)
