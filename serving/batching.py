"""Batching for the built-in engine: one engine thread that runs the scheduler's decisions on the model.

Each iteration: `Scheduler.schedule()` (serving/scheduler.py) decides which rows decode and which prompt chunks
prefill; this thread runs them (one decode step over the running batch, one batched prefill of the whole prompts
admitted, one chunk per long prompt), samples a token for every row that has logits, and hands the results to
`Scheduler.update_from_output()`; then it makes the KV batch match the scheduler's running rows (finished rows leave,
fully prefilled ones are merged in). Two policies:
- `continuous`: waiting requests join the running batch between decode steps, long prompts in chunks of the
  per-iteration token budget (chunked prefill), so no decode step waits on a whole long prompt.
- `dynamic`: a batch is formed from the queue, runs until every row is done, then the next batch forms.

Requests talk to the thread only through `GenerationRequest`: `emit` is called from the engine thread with
`TokenEvent` / `FinishEvent`, and `cancel()` (client gone, stop string seen) is honoured at the next step.

Failure isolation: every request the engine accepted gets exactly one `FinishEvent`, whatever fails. An error that
belongs to one row (its seed, its sampling, its prefill, its consumer) finishes that row with an error and the batch
goes on; an error that belongs to no row (a decode step, e.g. out of memory) finishes every admitted row (decoding or
prefilling), and the engine goes on with the queue; if the engine thread itself dies, every admitted and queued
request is finished with an error and new requests are refused.
"""

from __future__ import annotations

import logging
import threading
import time
from enum import StrEnum
from typing import Protocol

import torch

from serving.decode import DecodeBatch, Decoder
from serving.grammar import apply_bitmask
from serving.sampling import logprobs, sample
from serving.scheduler import (
    NO_KEY,
    Event,
    FinishEvent,
    GenerationRequest,
    ModelOutput,
    QueueFullError,
    RowState,
    Scheduler,
    SchedulerOutput,
    TokenEvent,
)

__all__ = [
    "NO_KEY",
    "BatchObserver",
    "BatchPolicy",
    "BatchScheduler",
    "EngineStoppedError",
    "Event",
    "FinishEvent",
    "GenerationRequest",
    "QueueFullError",
    "TokenEvent",
]

log = logging.getLogger("serving.batching")

# What a failed request is told (details go to the server log only: they may name internals, never another tenant's
# data, but a client has no use for a torch stack message)
REQUEST_FAILED = "generation failed for this request"
ENGINE_FAILED = "the engine failed while decoding this request's batch"

# Prompt tokens (plus one per decoding row) the engine computes per iteration when driven directly; the server's
# default (--max-batched-tokens, serving/config.py) says how it is chosen per device.
DEFAULT_TOKEN_BUDGET = 128
DEFAULT_KEY_PREFILL_TOKENS = 4096


class BatchPolicy(StrEnum):
    """How requests join a batch: between decode steps (continuous) or only when a new batch forms (dynamic)."""

    CONTINUOUS = "continuous"
    DYNAMIC = "dynamic"


class EngineStoppedError(Exception):
    """The engine is draining or dead and accepts no new work."""


class BatchObserver(Protocol):
    """Metrics hooks (kept abstract so this module does not depend on Prometheus)."""

    def queue_depth(self, depth: int) -> None: ...
    def batch_size(self, rows: int) -> None: ...
    def key_queue(self, key_id: str, depth: int, waited_s: float | None) -> None: ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_size(self, rows: int) -> None:
        pass

    def key_queue(self, key_id: str, depth: int, waited_s: float | None) -> None:
        pass


class BatchScheduler:
    """The engine thread: runs a `Scheduler`'s iterations on a `Decoder`."""

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
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        key_prefill_tokens: int = DEFAULT_KEY_PREFILL_TOKENS,
    ) -> None:
        """`token_budget` 0 = no budget (whole prompts between two steps, as before chunked prefill)."""
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
        self.sched = Scheduler(
            max_rows=max_batch_size,
            max_queue=max_queue,
            token_budget=token_budget,
            key_prefill_tokens=key_prefill_tokens,
            eos_token_ids=eos_token_ids,
            dynamic=policy is BatchPolicy.DYNAMIC,
            observer=self.observer,
        )
        self.batch: DecodeBatch | None = None  # the decoding rows' KV cache, row i = `sched.running[i]`
        self._cond = threading.Condition()
        self._stopping = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- called from the event loop -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request (`QueueFullError` when the queue is full, `EngineStoppedError` when stopping or dead)."""
        self.submit_all([request])

    def submit_all(self, requests: list[GenerationRequest]) -> None:
        """Queue several requests (a prompt list) all or none: `QueueFullError` when they do not all fit."""
        with self._cond:
            if self._stopping or not self.healthy:
                raise EngineStoppedError("engine is not accepting requests")
            if len(requests) > 1 and self.sched.queued + len(requests) > self.max_queue:
                raise QueueFullError(f"queue is full ({self.max_queue} waiting)")
            for request in requests:
                self.sched.add(request)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return self.sched.queued

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

    def _next(self) -> SchedulerOutput | None:
        """The next iteration's decision; when idle, block for the first request and give the batch `batch_wait_s`
        to fill. None: stopping with nothing left."""
        with self._cond:
            if not self.sched.rows:
                while not self.sched.queued and not self._stopping:
                    self._cond.wait()
                if not self.sched.queued:
                    return None
                deadline = time.monotonic() + self.batch_wait_s
                while self.sched.queued < self.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self.sched.schedule()

    def _run(self) -> None:
        try:
            while (out := self._next()) is not None:
                if not out.empty:
                    self._iterate(out)
        except BaseException as exc:  # the engine is dead: fail loudly, readiness turns false
            log.exception("engine thread failed")
            with self._cond:
                self._failed = exc
                queued = self.sched.drain_waiting()
            # every request the engine holds (decoding, prefilling or queued) gets an error: none may hang
            for req in [*(r.request for r in self.sched.rows), *queued]:
                req.finish("error", ENGINE_FAILED)

    def _iterate(self, out: SchedulerOutput) -> None:
        result = ModelOutput()
        try:
            logits, group, live, completed = self._execute(out, result)
        except Exception:  # not attributable to one row (e.g. out of memory in a decode step): fail every row
            log.exception("decode failed; failing the %d admitted requests", len(self.sched.rows))
            with self._cond:
                self.sched.fail_all(ENGINE_FAILED)
            self.batch = None
            return
        self._sample(logits, result)
        with self._cond:
            self.sched.update_from_output(out, result)
        self._sync_batch(out.decode, group, live, completed)

    def _execute(
        self, out: SchedulerOutput, result: ModelOutput
    ) -> tuple[
        list[tuple[list[RowState], torch.Tensor]],
        DecodeBatch | None,
        list[RowState],
        list[tuple[list[RowState], DecodeBatch]],
    ]:
        """Run the decision: the decode step, then the prefill of whole prompts, then one chunk per long prompt."""
        logits: list[tuple[list[RowState], torch.Tensor]] = []
        if out.decode:
            assert self.batch is not None and self.batch.rows == len(out.decode)
            self.observer.batch_size(len(out.decode))
            self.decoder.step(self.batch, torch.tensor([r.next_token for r in out.decode], dtype=torch.long))
            logits.append((out.decode, self.batch.logits))
        for chunk in out.prefill:
            self._start(chunk.row, result)
        whole = [c.row for c in out.prefill if c.whole and c.row not in result.failed]
        live, group = self._prefill_isolated(whole, result) if whole else ([], None)
        if group is not None:
            for row in live:
                result.computed[row] = row.prompt_len
            live = self._fork(live, group, result)
            logits.append((live, group.logits))
        completed: list[tuple[list[RowState], DecodeBatch]] = []
        for chunk in out.prefill:
            row = chunk.row
            if chunk.whole or row in result.failed:
                continue
            req = row.request
            try:
                if row.pending is None:
                    row.pending = self.decoder.prefill_begin(req.prompt_ids, chunk.tokens, req.cache_salt)
                else:
                    self.decoder.prefill_more(row.pending, req.prompt_ids, chunk.tokens, req.cache_salt)
            except Exception:
                log.exception("prefill chunk failed for one request")
                result.failed[row] = REQUEST_FAILED
                continue
            result.computed[row] = int(row.pending.positions[0])
            if result.computed[row] >= row.prompt_len:
                rows = self._fork([row], row.pending, result)
                completed.append((rows, row.pending))
                row.pending = None
                logits.append((rows, completed[-1][1].logits))
        return logits, group, live, completed

    def _fork(self, rows: list[RowState], batch: DecodeBatch, result: ModelOutput) -> list[RowState]:
        """`n > 1`: each prompt just prefilled gets a row per extra choice, right after it, holding a copy of its KV
        rows and logits (`DecodeBatch.keep` with repeated indices), so the prompt was computed once for all of them.
        Returns the rows in the batch's new order; `result.forks` tells the scheduler where they join."""
        if not any(r.request.forks for r in rows):
            return rows
        index: list[int] = []
        out: list[RowState] = []
        for i, row in enumerate(rows):
            forks, row.request.forks = row.request.forks, []
            index += [i] * (1 + len(forks))
            out.append(row)
            for request in forks:
                fork = RowState(request, computed=row.computed)
                self._start(fork, result)  # its own generator from its own seed
                result.computed[fork] = row.computed
                result.forks.setdefault(row, []).append(fork)
                out.append(fork)
        batch.keep(index)
        return out

    def _start(self, row: RowState, result: ModelOutput) -> None:
        """Checks and a seeded request's own generator, once at its first prefill (a bad one fails that row only)."""
        if not row.request.prompt_ids:  # nothing to compute logits from, whatever it is batched with
            log.error("empty prompt for one request")
            result.failed[row] = REQUEST_FAILED
            return
        seed = row.request.params.seed
        if seed is None or row.generator is not None:
            return
        try:
            row.generator = torch.Generator().manual_seed(seed)
        except Exception:
            log.exception("bad seed for one request")
            result.failed[row] = REQUEST_FAILED

    def _prefill_isolated(self, rows: list[RowState], result: ModelOutput) -> tuple[list[RowState], DecodeBatch | None]:
        """Prefill together; if that fails, find the rows that fail on their own, fail only those, and prefill the
        rest together again (an error from the second try is not attributable to one row and propagates)."""

        def prefill(group: list[RowState]) -> DecodeBatch:
            return self.decoder.prefill([r.request.prompt_ids for r in group], [r.request.cache_salt for r in group])

        try:
            return rows, prefill(rows)
        except Exception:
            if len(rows) == 1:
                log.exception("prefill failed for one request")
                result.failed[rows[0]] = REQUEST_FAILED
                return [], None
            log.exception("prefill of %d requests failed; retrying them one by one", len(rows))
        good: list[RowState] = []
        for r in rows:
            try:
                prefill([r])
                good.append(r)
            except Exception:
                log.exception("prefill failed for one request")
                result.failed[r] = REQUEST_FAILED
        if not good:
            return [], None
        return good, prefill(good)

    def _sample(self, parts: list[tuple[list[RowState], torch.Tensor]], result: ModelOutput) -> None:
        """One token for every row that has logits, each decided by that row alone (serving/sampling.py)."""
        rows = [r for part_rows, _ in parts for r in part_rows]
        if not rows:
            return
        logits = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts])
        failed: dict[int, Exception] = {}
        history = [(r.request.prompt_ids, r.request.output_ids) for r in rows]
        params = [r.request.params for r in rows]
        grammar_failed: dict[int, str] = {}
        masked = self._constrained(logits, rows, grammar_failed)
        tokens = sample(masked, params, [r.generator for r in rows], failed, history)
        for i, row in enumerate(rows):
            grammar = row.request.grammar
            if grammar is not None and i not in failed and i not in grammar_failed and not grammar.accept(tokens[i]):
                grammar_failed[i] = f"the token does not continue the grammar ({grammar.error or 'rejected'})"
        for i, error in grammar_failed.items():
            failed[i] = ValueError(error)
        if any(p.logprobs is not None for p in params):
            for i, entry in logprobs(logits, tokens, params).items():
                if i not in failed:
                    result.logprobs[rows[i]] = entry
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if i in failed:  # this row alone could not be sampled: it leaves, the others go on
                log.error("sampling failed for one request: %r", failed[i])
                result.failed[row] = REQUEST_FAILED
            else:
                result.tokens[row] = token

    @staticmethod
    def _constrained(logits: torch.Tensor, rows: list[RowState], failed: dict[int, str]) -> torch.Tensor:
        """The logits with each constrained row's grammar mask applied to that row alone (serving/grammar.py); the
        raw logits stay what logprobs report (vLLM's default "raw_logprobs"). A row whose grammar failed on its
        limits is recorded in `failed`."""
        index = [i for i, r in enumerate(rows) if r.request.grammar is not None]
        if not index:
            return logits
        grammars = [rows[i].request.grammar for i in index]
        bitmask = grammars[0].new_bitmask(len(index))
        for k, (i, grammar) in enumerate(zip(index, grammars, strict=True)):
            grammar.fill(bitmask, k)
            if grammar.error:
                failed[i] = f"the response grammar failed: {grammar.error}"
        return apply_bitmask(logits, bitmask, index)

    def _sync_batch(
        self,
        decoded: list[RowState],
        group: DecodeBatch | None,
        live: list[RowState],
        completed: list[tuple[list[RowState], DecodeBatch]],
    ) -> None:
        """Make the KV batch's rows the scheduler's running rows: finished rows leave, joiners are merged in the
        order `update_from_output` appended them (whole prompts first, then completed chunked ones)."""
        alive = set(self.sched.running)
        if self.batch is not None:
            keep = [i for i, r in enumerate(decoded) if r in alive]
            if not keep:
                self.batch = None
            elif len(keep) < len(decoded):
                self.batch.keep(keep)
        joiners: list[tuple[list[RowState], DecodeBatch]] = []
        if group is not None:
            joiners.append((live, group))
        joiners += completed
        joining: list[DecodeBatch] = []
        for rows, batch in joiners:
            keep = [i for i, r in enumerate(rows) if r in alive]
            if not keep:
                continue
            if len(keep) < len(rows):
                batch.keep(keep)
            joining.append(batch)
        if joining:  # one merge for all of them: each merge copies the whole cache
            if self.batch is None:
                self.batch = joining.pop(0)
            if joining:
                self.batch.merge(*joining)
        assert (self.batch.rows if self.batch is not None else 0) == len(self.sched.running)
