"""The batching module on its own: batched decoding equals one-at-a-time decoding, queues are bounded, cancel works."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.batching import (
    BatchPolicy,
    BatchScheduler,
    Event,
    FinishEvent,
    GenerationRequest,
    QueueFullError,
    TokenEvent,
)
from serving.decode import Decoder, SamplingParams, sample

PROMPTS = ["The quick brown fox", "Hello", "A much longer prompt than the others, to force left padding", "x y"]


@pytest.fixture(scope="module")
def model_and_tokenizer(debug_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(debug_model_dir)


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


def run_all(scheduler: BatchScheduler, requests: list[tuple[list[int], SamplingParams]]) -> list[Collector]:
    collectors = [Collector() for _ in requests]
    for (ids, params), c in zip(requests, collectors, strict=True):
        scheduler.submit(GenerationRequest(ids, params, c))
    for c in collectors:
        assert c.done.wait(60), "request never finished"
    return collectors


@pytest.mark.parametrize("policy", list(BatchPolicy))
def test_batched_greedy_matches_hf_generate_one_at_a_time(model_and_tokenizer, policy: BatchPolicy) -> None:
    model, tok = model_and_tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    max_tokens = [12, 9, 12, 5]
    expected = []
    for ids, n in zip(prompts, max_tokens, strict=True):
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
        )
        expected.append(out[0, len(ids) :].tolist())
    # a batch limit of 3 makes the 4th request wait: with `continuous` it joins mid-flight (cache merge)
    scheduler = BatchScheduler(Decoder(model, tok.pad_token_id), set(), max_batch_size=3, policy=policy)
    scheduler.start()
    try:
        results = run_all(
            scheduler, [(p, SamplingParams(n, temperature=0.0)) for p, n in zip(prompts, max_tokens, strict=True)]
        )
    finally:
        scheduler.stop()
    assert [c.tokens for c in results] == expected
    assert all(c.finish and c.finish.reason == "length" for c in results)


def test_seeded_sampling_does_not_depend_on_batch_companions(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    ids = tok.encode("Once upon a time")
    params = SamplingParams(10, temperature=0.9, top_p=0.9, seed=1234)
    scheduler = BatchScheduler(Decoder(model, tok.pad_token_id), set(), max_batch_size=8)
    scheduler.start()
    try:
        alone = run_all(scheduler, [(ids, params)])[0].tokens
        noise = [(tok.encode("noise"), SamplingParams(10, seed=i)) for i in range(3)]
        crowd = run_all(scheduler, [*noise, (ids, params)])
    finally:
        scheduler.stop()
    assert crowd[-1].tokens == alone


def test_eos_finishes_with_stop(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    ids = tok.encode("Hello")
    first = int(Decoder(model, tok.pad_token_id).prefill([ids]).logits.argmax())
    # declare the greedy first token an end-of-sequence token: the request must stop before emitting it
    scheduler = BatchScheduler(Decoder(model, tok.pad_token_id), {first}, max_batch_size=2)
    scheduler.start()
    try:
        (c,) = run_all(scheduler, [(ids, SamplingParams(8, temperature=0.0))])
    finally:
        scheduler.stop()
    assert c.tokens == [] and c.finish is not None and c.finish.reason == "stop"


def test_queue_is_bounded_and_cancel_is_honoured(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    scheduler = BatchScheduler(Decoder(model, tok.pad_token_id), set(), max_batch_size=1, max_queue=2)
    # not started: nothing leaves the queue, so the third request must be refused, not buffered
    waiting = [GenerationRequest(tok.encode("a"), SamplingParams(5), Collector()) for _ in range(2)]
    for r in waiting:
        scheduler.submit(r)
    with pytest.raises(QueueFullError):
        scheduler.submit(GenerationRequest(tok.encode("a"), SamplingParams(5), Collector()))
    waiting[0].cancel()
    scheduler.start()
    try:
        for r in waiting:
            assert r.emit.done.wait(60)  # type: ignore[attr-defined]
    finally:
        scheduler.stop()
    assert waiting[0].emit.finish.reason == "cancelled" and waiting[0].emit.tokens == []  # type: ignore[attr-defined]
    assert waiting[1].emit.finish.reason == "length"  # type: ignore[attr-defined]


def test_cancel_mid_generation_stops_decoding(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    scheduler = BatchScheduler(Decoder(model, tok.pad_token_id), set(), max_batch_size=2)
    holder: list[GenerationRequest] = []

    def emit(event: Event) -> None:
        collector(event)
        if isinstance(event, TokenEvent) and len(collector.tokens) == 3:
            holder[0].cancel()

    collector = Collector()
    holder.append(GenerationRequest(tok.encode("a"), SamplingParams(400, temperature=0.0), emit))
    scheduler.start()
    try:
        scheduler.submit(holder[0])
        assert collector.done.wait(60)
    finally:
        scheduler.stop()
    assert collector.finish is not None and collector.finish.reason == "cancelled"
    assert len(collector.tokens) == 3


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([[10.0, 9.0, -10.0, -10.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(50)]
    picks = {sample(logits, [SamplingParams(1, temperature=1.0, top_p=0.5)], [g])[0] for g in gens}
    assert picks == {0}  # token 0 alone holds > 50% of the mass
    greedy = sample(logits, [SamplingParams(1, temperature=0.0)], [None])
    assert greedy == [0]
