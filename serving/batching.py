"""Batching for the built-in engine: a bounded queue and one engine thread that decodes many requests together.

Two policies share one loop (`BatchPolicy`):
- `continuous`: waiting requests join the running batch between decode steps (prefilled, then merged into the
  KV cache); finished rows leave at once.
- `dynamic`: a batch is formed from the queue, runs until every row is done, then the next batch forms.

Requests talk to the thread only through `GenerationRequest`: `emit` is called from the engine thread with
`TokenEvent` / `FinishEvent`, and `cancel()` (client gone, stop string seen) is honoured at the next step.
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


class BatchPolicy(StrEnum):
    CONTINUOUS = "continuous"
    DYNAMIC = "dynamic"


class QueueFullError(Exception):
    """The bounded queue is full: shed the request (503 + Retry-After) instead of buffering it."""


class EngineStoppedError(Exception):
    """The engine is draining or dead and accepts no new work."""


@dataclass(frozen=True)
class TokenEvent:
    token_id: int


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" (eos), "length" (max_tokens), "cancelled", "error"
    error: str = ""


Event = TokenEvent | FinishEvent


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    enqueued_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    finished: bool = False

    def finish(self, reason: str, error: str = "") -> None:
        if not self.finished:
            self.finished = True
            self.emit(FinishEvent(reason, error))

    def cancel(self) -> None:
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
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- called from the event loop -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
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
        return len(self._queue)

    @property
    def healthy(self) -> bool:
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
            self._failed = exc
            with self._cond:
                for req in self._queue:
                    req.finish("error", str(exc))
                self._queue.clear()

    def _prefill(self, requests: list[GenerationRequest]) -> tuple[DecodeBatch, list[torch.Generator | None]]:
        batch = self.decoder.prefill([r.prompt_ids for r in requests])
        generators: list[torch.Generator | None] = []
        for r in requests:
            gen = None
            if r.params.seed is not None:
                gen = torch.Generator().manual_seed(r.params.seed)
            generators.append(gen)
        return batch, generators

    def _generate(self, requests: list[GenerationRequest]) -> None:
        try:
            batch, generators = self._prefill(requests)
        except Exception as exc:
            log.exception("prefill failed")
            for r in requests:
                r.finish("error", str(exc))
            return
        try:
            self._decode(requests, batch, generators)
        except Exception as exc:  # fail this batch's requests, keep serving
            log.exception("decode failed")
            for r in requests:
                if not r.finished:
                    r.finish("error", str(exc))

    def _decode(
        self, requests: list[GenerationRequest], batch: DecodeBatch, generators: list[torch.Generator | None]
    ) -> None:
        requests = list(requests)
        while requests:
            self.observer.batch_size(len(requests))
            tokens = sample(batch.logits, [r.params for r in requests], generators)
            keep: list[int] = []
            for row, (req, token) in enumerate(zip(requests, tokens, strict=True)):
                if req.cancelled:
                    req.finish("cancelled")
                    continue
                if token in self.eos_token_ids:
                    req.finish("stop")
                    continue
                req.generated += 1
                req.emit(TokenEvent(token))
                if req.generated >= req.params.max_tokens:
                    req.finish("length")
                    continue
                keep.append(row)
            if len(keep) < len(requests):
                requests = [requests[i] for i in keep]
                generators = [generators[i] for i in keep]
                tokens = [tokens[i] for i in keep]
                if not requests:
                    break
                batch.keep(keep)
            self.decoder.step(batch, torch.tensor(tokens, dtype=torch.long))
            if self.policy is BatchPolicy.CONTINUOUS and len(requests) < self.max_batch_size and self._queue:
                joiners = self._take(self.max_batch_size - len(requests), wait=False)
                if joiners:
                    try:
                        new_batch, new_generators = self._prefill(joiners)
                    except Exception as exc:
                        log.exception("prefill failed")
                        for r in joiners:
                            r.finish("error", str(exc))
                        continue
                    batch.merge(new_batch)
                    requests += joiners
                    generators += new_generators
