"""Batching for the built-in engine: a bounded queue and one engine thread that decodes many requests together.

Two policies share one loop (`BatchPolicy`):
- `continuous`: waiting requests join the running batch between decode steps (prefilled, then merged into the
  KV cache); finished rows leave at once.
- `dynamic`: a batch is formed from the queue, runs until every row is done, then the next batch forms.

Requests talk to the thread only through `GenerationRequest`: `emit` is called from the engine thread with
`TokenEvent` / `FinishEvent`, and `cancel()` (client gone, stop string seen) is honoured at the next step.

Failure isolation: every request the engine accepted gets exactly one `FinishEvent`, whatever fails. An error that
belongs to one row (its seed, its sampling, its prefill, its consumer) finishes that row with an error and the batch
goes on; an error that belongs to no row (a decode step, e.g. out of memory) finishes every row of that batch,
joiners included, and the engine goes on with the queue; if the engine thread itself dies, every running and queued
request is finished with an error and new requests are refused.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import torch

from serving.decode import DecodeBatch, Decoder, SamplingParams, sample

log = logging.getLogger("serving.batching")

# What a failed request is told (details go to the server log only: they may name internals, never another tenant's
# data, but a client has no use for a torch stack message)
REQUEST_FAILED = "generation failed for this request"
ENGINE_FAILED = "the engine failed while decoding this request's batch"


class BatchPolicy(StrEnum):
    """How requests join a batch: between decode steps (continuous) or only when a new batch forms (dynamic)."""

    CONTINUOUS = "continuous"
    DYNAMIC = "dynamic"


class QueueFullError(Exception):
    """The bounded queue is full: shed the request (503 + Retry-After) instead of buffering it."""


class EngineStoppedError(Exception):
    """The engine is draining or dead and accepts no new work."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request."""

    token_id: int


@dataclass(frozen=True)
class FinishEvent:
    """A request's last event: why it ended."""

    reason: str  # "stop" (eos), "length" (max_tokens), "cancelled", "error"
    error: str = ""


Event = TokenEvent | FinishEvent


@dataclass
class GenerationRequest:
    """A request as the engine thread sees it: prompt ids, sampling, and where its events go."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    enqueued_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    finished: bool = False

    def send(self, event: Event) -> bool:
        """Emit an event; False (and the request counts as finished) when the consumer raised."""
        try:
            self.emit(event)
            return True
        except Exception:
            log.exception("request consumer failed; dropping the request")
            self.finished = True
            return False

    def finish(self, reason: str, error: str = "") -> None:
        """Send the final event once."""
        if not self.finished:
            self.finished = True
            self.send(FinishEvent(reason, error))

    def cancel(self) -> None:
        """Ask the engine thread to drop this request (safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class BatchObserver(Protocol):
    """Metrics hooks (kept abstract so this module does not depend on Prometheus)."""

    def queue_depth(self, depth: int) -> None: ...
    def batch_size(self, rows: int) -> None: ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_size(self, rows: int) -> None:
        pass


class BatchScheduler:
    """The engine thread: a bounded queue of requests decoded together in batches by a `Decoder`."""

    def __init__(
        self,
        decoder: Decoder,
        eos_token_ids: set[int],
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        batch_wait_s: float = 0.005,
        policy: BatchPolicy = BatchPolicy.CONTINUOUS,
        observer: BatchObserver | None = None,
    ) -> None:
        if policy is BatchPolicy.CONTINUOUS and not decoder.supports_merge:
            log.warning("model cache does not support merging rows; falling back to dynamic batching")
            policy = BatchPolicy.DYNAMIC
        self.decoder = decoder
        self.eos_token_ids = eos_token_ids
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.policy = policy
        self.observer: BatchObserver = observer or _NullObserver()
        self._queue: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._failed: BaseException | None = None
        self._active: list[GenerationRequest] = []  # the rows the engine thread is decoding (or prefilling) now
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- called from the event loop -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request (`QueueFullError` when the queue is full, `EngineStoppedError` when stopping or dead)."""
        with self._cond:
            if self._stopping or not self.healthy:
                raise EngineStoppedError("engine is not accepting requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"queue is full ({self.max_queue} waiting)")
            self._queue.append(request)
            self.observer.queue_depth(len(self._queue))
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def healthy(self) -> bool:
        """False once the engine thread has failed or died."""
        return self._failed is None and (self._thread.is_alive() or not self._thread.ident)

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything already accepted, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.ident:
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------------------

    def _take(self, n: int, wait: bool) -> list[GenerationRequest]:
        """Up to n queued requests; with `wait`, block for the first and give the batch `batch_wait_s` to fill."""
        with self._cond:
            if wait:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while self._queue and len(self._queue) < n and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            taken: list[GenerationRequest] = []
            while self._queue and len(taken) < n:
                req = self._queue.popleft()
                if req.cancelled:
                    req.finish("cancelled")
                else:
                    taken.append(req)
            self.observer.queue_depth(len(self._queue))
            return taken

    def _run(self) -> None:
        try:
            while True:
                batch = self._take(self.max_batch_size, wait=True)
                if not batch:
                    if self._stopping and not self._queue:
                        return
                    continue
                self._generate(batch)
        except BaseException as exc:  # the engine is dead: fail loudly, readiness turns false
            log.exception("engine thread failed")
            with self._cond:
                self._failed = exc
                queued = list(self._queue)
                self._queue.clear()
            # every request the engine holds (running, joining or queued) gets an error: none may hang
            for req in [*self._active, *queued]:
                req.finish("error", ENGINE_FAILED)

    def _prefill(self, requests: list[GenerationRequest]) -> tuple[DecodeBatch, list[torch.Generator | None]]:
        generators: list[torch.Generator | None] = []
        for r in requests:
            gen = None
            if r.params.seed is not None:
                gen = torch.Generator().manual_seed(r.params.seed)
            generators.append(gen)
        return self.decoder.prefill([r.prompt_ids for r in requests]), generators

    def _prefill_isolated(
        self, requests: list[GenerationRequest]
    ) -> tuple[list[GenerationRequest], DecodeBatch | None, list[torch.Generator | None]]:
        """Prefill together; if that fails, find the rows that fail on their own, fail only those, and prefill the
        rest together again (an error from the second try is not attributable to one row and propagates)."""
        try:
            batch, generators = self._prefill(requests)
            return requests, batch, generators
        except Exception:
            if len(requests) == 1:
                log.exception("prefill failed for one request")
                requests[0].finish("error", REQUEST_FAILED)
                return [], None, []
            log.exception("prefill of %d requests failed; retrying them one by one", len(requests))
        good: list[GenerationRequest] = []
        for r in requests:
            try:
                self._prefill([r])
                good.append(r)
            except Exception:
                log.exception("prefill failed for one request")
                r.finish("error", REQUEST_FAILED)
        if not good:
            return [], None, []
        batch, generators = self._prefill(good)
        return good, batch, generators

    def _generate(self, requests: list[GenerationRequest]) -> None:
        # `_active` always holds every request this thread owns (joiners as soon as they are taken), so a failure
        # anywhere below finishes all of them with an error instead of leaving a stream without a finish event
        self._active = list(requests)
        try:
            live, batch, generators = self._prefill_isolated(requests)
            if batch is not None:
                self._active = live
                self._decode(batch, generators)
        except Exception:  # not attributable to one row (e.g. out of memory in a decode step): fail this batch only
            log.exception("decode failed; failing the %d requests in the batch", len(self._active))
            for r in self._active:
                r.finish("error", ENGINE_FAILED)
        self._active = []

    def _decode(self, batch: DecodeBatch, generators: list[torch.Generator | None]) -> None:
        requests = self._active
        while requests:
            self.observer.batch_size(len(requests))
            failed: dict[int, Exception] = {}
            tokens = sample(batch.logits, [r.params for r in requests], generators, failed)
            keep: list[int] = []
            for row, (req, token) in enumerate(zip(requests, tokens, strict=True)):
                if row in failed:  # this row alone could not be sampled: it leaves, the others go on
                    log.error("sampling failed for one request: %r", failed[row])
                    req.finish("error", REQUEST_FAILED)
                    continue
                if req.cancelled:
                    req.finish("cancelled")
                    continue
                if token in self.eos_token_ids:
                    req.finish("stop")
                    continue
                req.generated += 1
                if not req.send(TokenEvent(token)):
                    continue  # its consumer is broken: drop the row
                if req.generated >= req.params.max_tokens:
                    req.finish("length")
                    continue
                keep.append(row)
            if len(keep) < len(requests):
                requests = [requests[i] for i in keep]
                generators = [generators[i] for i in keep]
                tokens = [tokens[i] for i in keep]
                self._active = requests
                if not requests:
                    break
                batch.keep(keep)
            self.decoder.step(batch, torch.tensor(tokens, dtype=torch.long))
            if self.policy is BatchPolicy.CONTINUOUS and len(requests) < self.max_batch_size and self._queue:
                joiners = self._take(self.max_batch_size - len(requests), wait=False)
                if joiners:
                    self._active = requests = [*requests, *joiners]
                    live, new_batch, new_generators = self._prefill_isolated(joiners)
                    requests = [*requests[: len(requests) - len(joiners)], *live]
                    self._active = requests
                    if new_batch is not None:
                        batch.merge(new_batch)
                        generators = [*generators, *new_generators]
