"""Per-request failure isolation in the engine: one bad sequence leaves the batch, the others complete; a failure that
belongs to no sequence finishes every in-flight request (joiners included) with an error; nothing ever hangs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.batching import (
    BatchPolicy,
    BatchScheduler,
    EngineStoppedError,
    Event,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
)
from serving.decode import DecodeBatch, Decoder, SamplingParams

LONG = 40


@pytest.fixture(scope="module")
def model_and_tokenizer(debug_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(debug_model_dir)


class Collector:
    def __init__(self, on_token: int = 0) -> None:
        self.tokens: list[int] = []
        self.finishes: list[FinishEvent] = []
        self.done = threading.Event()
        self.started = threading.Event()  # set after `on_token` tokens
        self.on_token = on_token

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
            if len(self.tokens) >= self.on_token:
                self.started.set()
        else:
            self.finishes.append(event)
            self.done.set()

    @property
    def finish(self) -> FinishEvent:
        assert len(self.finishes) == 1, self.finishes  # exactly one finish event per request
        return self.finishes[0]


def alone(model, tok, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    return out[0, len(ids) :].tolist()


def test_a_failing_sequence_injected_into_a_running_batch_leaves_alone(model_and_tokenizer) -> None:
    """Two long greedy streams are running; three poisoned requests join mid-flight: a non-finite temperature
    (sampling raises for that row), a seed outside 64 bits (its generator raises at prefill) and an empty prompt
    (prefill raises). Each poisoned request gets an error; both streams complete with exactly the tokens they
    produce alone."""
    model, tok = model_and_tokenizer
    prompts = [tok.encode("The quick brown fox"), tok.encode("A much longer prompt than the other one")]
    scheduler = BatchScheduler(Decoder(model, tok.pad_token_id), set(), max_batch_size=8)
    good = [Collector(on_token=3) for _ in prompts]
    scheduler.start()
    try:
        for ids, c in zip(prompts, good, strict=True):
            scheduler.submit(GenerationRequest(ids, SamplingParams(LONG, temperature=0.0), c))
        assert all(c.started.wait(60) for c in good)
        assert not any(c.done.is_set() for c in good)  # the joiners below really join a running batch
        poisoned = [Collector() for _ in range(3)]
        scheduler.submit(
            GenerationRequest(tok.encode("nan"), SamplingParams(LONG, temperature=float("nan")), poisoned[0])
        )
        scheduler.submit(GenerationRequest(tok.encode("seed"), SamplingParams(LONG, seed=2**70), poisoned[1]))
        scheduler.submit(GenerationRequest([], SamplingParams(LONG, temperature=0.0), poisoned[2]))
        for c in [*good, *poisoned]:
            assert c.done.wait(60), "a request never finished"
        assert [c.finish.reason for c in good] == ["length", "length"]
        assert [c.tokens for c in good] == [alone(model, tok, ids, LONG) for ids in prompts]
        assert [c.finish.reason for c in poisoned] == ["error"] * 3
        assert all("failed" in c.finish.error for c in poisoned)  # our message, not torch's
        # the engine is still healthy and serves the next request
        (after,) = [Collector()]
        scheduler.submit(GenerationRequest(prompts[0], SamplingParams(3, temperature=0.0), after))
        assert after.done.wait(60) and after.finish.reason == "length"
        assert scheduler.healthy
    finally:
        scheduler.stop()


class FailingDecoder(Decoder):
    """A decode step that raises (as a CUDA out-of-memory would) once the batch has `rows` rows."""

    def __init__(self, model, pad: int, rows: int, error: BaseException) -> None:
        super().__init__(model, pad)
        self.rows, self.error, self.raised = rows, error, False

    def step(self, batch: DecodeBatch, tokens: torch.Tensor) -> None:
        if batch.rows >= self.rows and not self.raised:
            self.raised = True
            raise self.error
        super().step(batch, tokens)


@pytest.mark.parametrize(("policy", "rows"), [(BatchPolicy.CONTINUOUS, 3), (BatchPolicy.DYNAMIC, 2)])
def test_a_failed_decode_step_finishes_every_row_including_joiners(
    model_and_tokenizer, policy: BatchPolicy, rows: int
) -> None:
    model, tok = model_and_tokenizer
    decoder = FailingDecoder(model, tok.pad_token_id, rows=rows, error=RuntimeError("CUDA out of memory (simulated)"))
    scheduler = BatchScheduler(decoder, set(), max_batch_size=8, policy=policy)
    first = [Collector(on_token=1) for _ in range(2)]
    scheduler.start()
    try:
        for c in first:
            scheduler.submit(GenerationRequest(tok.encode("hello"), SamplingParams(LONG, temperature=0.0), c))
        assert all(c.started.wait(60) for c in first)
        joiners = [Collector() for _ in range(2)]
        for c in joiners:
            scheduler.submit(GenerationRequest(tok.encode("join"), SamplingParams(LONG, temperature=0.0), c))
        for c in [*first, *joiners]:
            assert c.done.wait(60), "a request never finished"
        assert decoder.raised
        if policy is BatchPolicy.CONTINUOUS:  # the joiners had joined the batch whose step failed
            assert [c.finish.reason for c in [*first, *joiners]] == ["error"] * 4
        else:  # batch by batch: the first batch fails, the waiting one runs after it
            assert [c.finish.reason for c in [*first, *joiners]] == ["error", "error", "length", "length"]
        # a step failure is not the engine's death: the next request is served
        after = Collector()
        scheduler.submit(GenerationRequest(tok.encode("after"), SamplingParams(4, temperature=0.0), after))
        assert after.done.wait(60) and after.finish.reason == "length" and len(after.tokens) == 4
    finally:
        scheduler.stop()


class _Fatal(BaseException):
    """Not an Exception: escapes the per-batch handler, as an interpreter-level failure would."""


def test_a_dead_engine_finishes_running_joining_and_queued_requests(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    decoder = FailingDecoder(model, tok.pad_token_id, rows=2, error=_Fatal("engine thread killed"))
    scheduler = BatchScheduler(decoder, set(), max_batch_size=2, max_queue=8)
    running = Collector(on_token=2)
    scheduler.start()
    try:
        scheduler.submit(GenerationRequest(tok.encode("run"), SamplingParams(LONG, temperature=0.0), running))
        assert running.started.wait(60)
        later = [Collector() for _ in range(4)]  # one joins (batch of 2 -> the step fails), the rest stay queued
        for c in later:
            scheduler.submit(GenerationRequest(tok.encode("q"), SamplingParams(LONG, temperature=0.0), c))
        for c in [running, *later]:
            assert c.done.wait(60), "a request never finished"
            assert c.finish.reason == "error"
        assert not scheduler.healthy
        with pytest.raises(EngineStoppedError):
            scheduler.submit(GenerationRequest(tok.encode("x"), SamplingParams(2), Collector()))
    finally:
        scheduler.stop(5)


def test_a_consumer_that_raises_is_dropped_and_the_others_continue(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    scheduler = BatchScheduler(Decoder(model, tok.pad_token_id), set(), max_batch_size=4)

    def broken(event: Event) -> None:
        raise RuntimeError("event loop is gone")

    ok = Collector()
    scheduler.start()
    try:
        scheduler.submit(GenerationRequest(tok.encode("broken"), SamplingParams(LONG, temperature=0.0), broken))
        scheduler.submit(GenerationRequest(tok.encode("fine"), SamplingParams(12, temperature=0.0), ok))
        assert ok.done.wait(60) and ok.finish.reason == "length" and len(ok.tokens) == 12
        assert scheduler.healthy
    finally:
        scheduler.stop()
