"""Chunked prefill through the engine thread (debug model): a long prompt prefilled in chunks gives the tokens
`generate` gives, a running stream keeps getting tokens while the long prompt prefills, fairness across keys holds
end to end, and prefix-cache blocks are private to a key unless a group shares them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.batching import BatchScheduler, Event, FinishEvent, GenerationRequest, TokenEvent
from serving.config import ConfigError, ServingConfig
from serving.decode import Decoder, SamplingParams
from serving.prefix_cache import PrefixCache


@pytest.fixture(scope="module")
def model(debug_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.finishes: list[FinishEvent] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
            self.times.append(time.monotonic())
        else:
            self.finishes.append(event)
            self.done.set()


def generate(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def prompt(model, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()


@pytest.mark.parametrize("fast", [True, False], ids=["direct-tensor", "model-forward"])
def test_a_prompt_prefilled_in_chunks_generates_what_generate_does(model, fast: bool) -> None:
    decoder = Decoder(model, 0, prefix_cache=PrefixCache(8 << 20))
    if not fast:
        decoder._fast = None
    scheduler = BatchScheduler(decoder, set(), max_batch_size=4, token_budget=40)
    long_ids, short_ids = prompt(model, 300, 1), prompt(model, 12, 2)
    collectors = [Collector(), Collector()]
    scheduler.start()
    try:
        scheduler.submit(GenerationRequest(short_ids, SamplingParams(30, temperature=0.0), collectors[0]))
        scheduler.submit(GenerationRequest(long_ids, SamplingParams(8, temperature=0.0), collectors[1]))
        assert all(c.done.wait(120) for c in collectors)
    finally:
        scheduler.stop(10)
    assert collectors[0].tokens == generate(model, short_ids, 30)
    assert collectors[1].tokens == generate(model, long_ids, 8)


def test_a_running_stream_gets_tokens_while_a_long_prompt_prefills(model) -> None:
    """Before chunked prefill the whole long prompt ran between two decode steps; now it runs in budget-sized
    chunks with a decode step of the running stream between each two."""
    scheduler = BatchScheduler(Decoder(model, 0), set(), max_batch_size=4, token_budget=32)
    short, long_ = Collector(), Collector()
    scheduler.start()
    try:
        scheduler.submit(GenerationRequest(prompt(model, 8, 3), SamplingParams(200, temperature=0.0), short))
        while not short.tokens:
            time.sleep(0.001)
        submitted = time.monotonic()
        scheduler.submit(GenerationRequest(prompt(model, 480, 4), SamplingParams(1, temperature=0.0), long_))
        assert long_.done.wait(120) and short.done.wait(120)
    finally:
        scheduler.stop(10)
    during = [t for t in short.times if submitted <= t <= long_.times[0]]
    # 480 prompt tokens in chunks of at most 31 (32 less the stream's own decode token): >= 15 iterations
    assert len(during) >= 15


def test_without_a_budget_the_whole_prompt_runs_between_two_steps(model) -> None:
    """The same load with token_budget=0 (the behaviour before chunked prefill): no step in between."""
    scheduler = BatchScheduler(Decoder(model, 0), set(), max_batch_size=4, token_budget=0)
    short, long_ = Collector(), Collector()
    scheduler.start()
    try:
        scheduler.submit(GenerationRequest(prompt(model, 8, 3), SamplingParams(200, temperature=0.0), short))
        while not short.tokens:
            time.sleep(0.001)
        submitted = time.monotonic()
        scheduler.submit(GenerationRequest(prompt(model, 480, 4), SamplingParams(1, temperature=0.0), long_))
        assert long_.done.wait(120) and short.done.wait(120)
    finally:
        scheduler.stop(10)
    assert len([t for t in short.times if submitted <= t <= long_.times[0]]) <= 2


def test_prefix_cache_blocks_are_private_to_a_salt(model) -> None:
    cache = PrefixCache(8 << 20, block_size=16)
    decoder = Decoder(model, 0, prefix_cache=cache)
    ids = prompt(model, 40, 5)
    with torch.inference_mode():
        decoder.prefill([ids], ["key:alice"])
        assert cache.hit_tokens == 0
        decoder.prefill([ids], ["key:mallory"])  # another key guessing alice's prompt: no hit
        assert cache.hit_tokens == 0
        decoder.prefill([ids], ["key:alice"])
        assert cache.hit_tokens == 32


def test_prefix_cache_salt_collisions_still_never_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("serving.prefix_cache.hash", lambda _: 42, raising=False)
    cache = PrefixCache(1 << 20, block_size=2)
    cache.insert([1, 2, 3], torch.zeros(1, 2, 1, 3, 2), "key:alice")
    assert cache.match([1, 2, 3], "key:mallory") == []
    assert len(cache.match([1, 2, 3], "key:alice")) == 1


def test_keys_share_cache_blocks_only_within_a_named_group() -> None:
    cfg = ServingConfig(model="m", prefix_cache_groups="team:alice,bob; solo:carol")
    assert cfg.cache_salt("alice") == cfg.cache_salt("bob") == "group:team"
    assert cfg.cache_salt("carol") == "group:solo" != cfg.cache_salt("alice")
    assert cfg.cache_salt("dave") == "key:dave"
    assert cfg.cache_salt("team") != cfg.cache_salt("alice")  # a key named like a group is not in it
    for bad in ("team", "team:", ":alice", "a:x;b:x"):
        with pytest.raises(ConfigError, match="prefix_cache_groups"):
            ServingConfig(model="m", prefix_cache_groups=bad)
    with pytest.raises(ConfigError, match="max_batched_tokens"):
        ServingConfig(model="m", max_batched_tokens=-1)
    assert ServingConfig(model="m").token_budget == 64
    assert ServingConfig(model="m", device="cuda").token_budget == 2048
    assert ServingConfig(model="m", max_batched_tokens=64).token_budget == 64


def test_a_key_with_many_queued_requests_does_not_starve_a_key_with_one(model) -> None:
    """mallory queues 12 requests before bob's one; with 2 rows, bob is admitted in the first turn after the running
    ones, not after all of mallory's."""
    scheduler = BatchScheduler(Decoder(model, 0), set(), max_batch_size=2, max_queue=32, batch_wait_s=0.2)
    order: list[str] = []
    lock = threading.Lock()

    def tracker(name: str) -> Collector:
        c = Collector()
        inner = c.__call__

        def emit(event: Event) -> None:
            if isinstance(event, TokenEvent) and not c.tokens:
                with lock:
                    order.append(name)
            inner(event)

        c.__call__ = emit  # type: ignore[method-assign]
        return c

    collectors = []
    for i in range(12):
        c = tracker(f"mallory{i}")
        collectors.append((c, GenerationRequest(prompt(model, 20, i), SamplingParams(4, 0.0), c, key_id="mallory")))
    bob = tracker("bob")
    collectors.append((bob, GenerationRequest(prompt(model, 20, 99), SamplingParams(4, 0.0), bob, key_id="bob")))
    for c, req in collectors:
        req.emit = c.__call__
    scheduler.start()
    try:
        for _, req in collectors:
            scheduler.submit(req)
        assert all(c.done.wait(120) for c, _ in collectors)
    finally:
        scheduler.stop(10)
    assert order.index("bob") <= 1  # FIFO would have made it 12th


def test_the_api_key_id_reaches_the_engine_as_fairness_unit_and_cache_salt(debug_model_dir: Path) -> None:
    """Through the built-in backend: a request's `RequestContext.key_id` is its engine key and salts its prefix-cache
    blocks, so a second key sending the same prompt misses, and a key in the same group hits."""
    import asyncio

    from serving.backends.base import RequestContext
    from serving.backends.local import LocalBackend
    from serving.metrics import Metrics
    from serving.protocol import CompletionRequest

    metrics = Metrics()
    cfg = ServingConfig(
        model=str(debug_model_dir),
        served_model_name="debug-model",
        torch_threads=1,
        prefix_cache_mb=8,
        prefix_cache_groups="team:alice,carol",
    )
    backend = LocalBackend(debug_model_dir, cfg, observer=metrics)
    hits = "llm_serving_prefix_cache_hits_total"
    body = CompletionRequest.model_validate(
        {"model": "debug-model", "prompt": "word " * 60, "max_tokens": 2, "temperature": 0}
    )

    async def as_key(key_id: str) -> float:
        await backend.complete(body, RequestContext("req", "completions", key_id=key_id))
        return metrics.registry.get_sample_value(hits) or 0.0

    async def scenario() -> list[float]:
        return [await as_key(k) for k in ("alice", "mallory", "carol", "mallory")]

    try:
        after = asyncio.run(scenario())
    finally:
        asyncio.run(backend.close())
    assert after[0] == 0  # first sight of the prompt
    assert after[1] == after[0]  # another key: a miss, the counter does not move
    assert after[2] > after[1]  # carol shares alice's group: a hit
    assert after[3] > after[2]  # mallory's own blocks from its first request
    assert metrics.registry.get_sample_value("llm_serving_key_queue_wait_seconds_count", {"key": "mallory"}) == 2
