"""The engine's scheduler: decides what runs each iteration, then records what came of it (vLLM `v1/core/sched`).

No tensors and no model here: `schedule()` returns a `SchedulerOutput` (which rows decode, which prompt chunks
prefill), the engine thread (serving/batching.py) runs it, and `update_from_output()` applies the sampled tokens and
prefill progress to the rows. One `RowState` per admitted request (nanochat's RowState), not parallel lists.

The order, each iteration (docs/serving.md "Scheduling"):
1. every running row decodes one token; each costs one token of the budget (`token_budget`, as vLLM's
   `max_num_batched_tokens`);
2. waiting requests are admitted round-robin across API keys (one request per key per turn, keys in the order they
   first queued, the turn passing on after each admission), while a row is free (`max_rows`) and budget is left; a
   key already prefilling `key_prefill_tokens` prompt tokens waits its turn (a key may always prefill one request,
   however long). Admitted prompts are prefilled whole this iteration (all together, one batched prefill) while
   they fit what is left of the budget; a prompt that does not is prefilled in chunks. While no prompt is being
   prefilled in chunks, whole prompts get an allowance of WHOLE_PROMPT_BUDGETS budgets (less the decoding rows)
   instead: a burst of short prompts (16 clients whose answers ended together) is admitted at once, as without
   chunking, instead of a few per iteration;
3. prompts being prefilled in chunks share the budget, the one with the fewest tokens left first
   (so a short prompt never waits behind a long one's chunks), and always get at least a quarter of it (the rest
   of the budget after the decode tokens), so a stream of short requests cannot stall a long prompt forever. A
   prompt whose last chunk ran samples its first token in the same iteration and joins the decoding rows.

So a long prompt costs every other row at most one chunk of extra latency per iteration instead of its whole
prefill, and a key with many queued requests gets one admission per turn like a key with one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serving.sampling import SamplingParams

log = logging.getLogger("serving.scheduler")

# The key id of requests that carry none (unauthenticated servers, direct engine use).
NO_KEY = "-"

WHOLE_PROMPT_BUDGETS = 8
"""While no prompt is being prefilled in chunks, whole prompts admitted in one iteration may take this many token
budgets (CPU default: 8 x 64 = 512 tokens).
Measured at the issue's full size (bench/serve_mixed.py, fp32, 16 short tenants, bench/RESULTS.md): with whole
prompts bounded by the budget itself, 16 clients without a long tenant got 0.83x the tokens/s of whole-prompt
prefill (bursts of 16 short prompts admitted two or three per iteration); the budget is for prompts too long to
run whole, whose chunks are what stalls the decoding rows."""


class QueueFullError(Exception):
    """The bounded queue is full: shed the request (503 + Retry-After) instead of buffering it."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request."""

    token_id: int
    # with `SamplingParams.logprobs`: the token's log-probability and the most likely (token id, log-probability)
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class FinishEvent:
    """A request's last event: why it ended."""

    reason: str  # "stop" (eos), "length" (max_tokens), "cancelled", "error"
    error: str = ""


Event = TokenEvent | FinishEvent


@dataclass
class GenerationRequest:
    """A request as the engine thread sees it: prompt ids, sampling, who sent it, and where its events go.

    `key_id` is the API key's id (never its secret): the scheduler's fairness unit and metrics label. `cache_salt`
    decides which prefix-cache blocks the request may reuse (serving/prefix_cache.py); "" shares with every other
    unsalted request.
    """

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    key_id: str = NO_KEY
    cache_salt: str = ""
    enqueued_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    # the generated tokens so far, for the samplers that look at them (presence / frequency / repetition penalties)
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    # `n > 1`: the other choices of this prompt. They are queued and admitted with this request (as one unit of
    # `width` rows), and start from its prefill: the engine copies its KV rows once the prompt is computed
    # (`BatchScheduler._fork`), so a prompt is prefilled once for all of its choices. Empty once forked.
    forks: list[GenerationRequest] = field(default_factory=list)

    @property
    def width(self) -> int:
        """Engine rows this request takes once prefilled: itself and its forks."""
        return 1 + len(self.forks)

    # structured output: the row's grammar matcher (serving/grammar.py `RowGrammar`), None when unconstrained
    grammar: Any = None

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
        """Send the final event once (to the forks too while they are not forked yet: they share its fate)."""
        if not self.finished:
            self.finished = True
            self.send(FinishEvent(reason, error))
        for fork in self.forks:
            fork.finish(reason, error)

    def cancel(self) -> None:
        """Ask the engine thread to drop this request (safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class RowState:
    """One admitted request: how much of its prompt is in the KV cache, and the token it feeds next."""

    request: GenerationRequest
    generator: Any = None  # the request's torch.Generator when it is seeded
    computed: int = 0  # prompt tokens in the KV cache
    pending: Any = None  # while prefilling in chunks: the row's own DecodeBatch (serving/decode.py)
    next_token: int | None = None  # sampled, not yet fed to the model

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.prompt_len


@dataclass(frozen=True)
class PrefillChunk:
    """Up to `tokens` more prompt tokens of `row` this iteration; `whole` = its entire prompt in one go (batched
    with the other whole prompts of the iteration)."""

    row: RowState
    tokens: int
    whole: bool


@dataclass
class SchedulerOutput:
    """What runs this iteration."""

    decode: list[RowState]  # the running rows, in the engine batch's row order: each feeds `next_token`
    prefill: list[PrefillChunk]

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


@dataclass
class ModelOutput:
    """What came of a `SchedulerOutput`: sampled tokens of the rows that have logits (decoded rows and prompts
    whose last chunk ran), prompt tokens now cached per prefilling row, and rows that failed on their own."""

    tokens: dict[RowState, int] = field(default_factory=dict)
    computed: dict[RowState, int] = field(default_factory=dict)
    failed: dict[RowState, str] = field(default_factory=dict)
    logprobs: dict[RowState, tuple[float, tuple[tuple[int, float], ...]]] = field(default_factory=dict)
    # rows forked from a prompt that completed its prefill this iteration (`n > 1`): they join right after it
    forks: dict[RowState, list[RowState]] = field(default_factory=dict)


class SchedulerObserver(Protocol):
    """Metrics hooks (abstract: this module does not depend on Prometheus)."""

    def queue_depth(self, depth: int) -> None: ...
    def key_queue(self, key_id: str, depth: int, waited_s: float | None) -> None: ...


class Scheduler:
    """Waiting requests per key, admitted rows, and the per-iteration decision. Thread-safety is the caller's: the
    engine thread holds its lock around `add`, `schedule` and `update_from_output`."""

    def __init__(
        self,
        *,
        max_rows: int,
        max_queue: int,
        token_budget: int = 0,
        key_prefill_tokens: int = 0,
        eos_token_ids: set[int] | None = None,
        dynamic: bool = False,
        observer: SchedulerObserver | None = None,
    ) -> None:
        """`token_budget` 0 = unlimited (whole prompts, never chunked); `key_prefill_tokens` 0 = no per-key cap;
        `dynamic`: admit only when no row is running (batch by batch), whole prompts only."""
        self.max_rows = max_rows
        self.max_queue = max_queue
        self.token_budget = token_budget
        self.key_prefill_tokens = key_prefill_tokens
        self.eos_token_ids = eos_token_ids or set()
        self.dynamic = dynamic
        self.observer = observer
        self.waiting: collections.OrderedDict[str, collections.deque[GenerationRequest]] = collections.OrderedDict()
        self.running: list[RowState] = []  # decoding rows, in the engine batch's row order
        self.prefilling: list[RowState] = []  # admitted rows whose prompt is not all cached yet, oldest first
        self._queued = 0

    # -- queue --------------------------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def rows(self) -> list[RowState]:
        """Every admitted row (decoding or prefilling)."""
        return [*self.running, *self.prefilling]

    def add(self, request: GenerationRequest) -> None:
        """Queue a request behind its key's earlier ones (`QueueFullError` beyond `max_queue` in all)."""
        if self._queued >= self.max_queue:
            raise QueueFullError(f"queue is full ({self.max_queue} waiting)")
        if request.width > self.max_rows:
            raise ValueError(f"a request of {request.width} rows can never run in a batch of {self.max_rows}")
        queue = self.waiting.get(request.key_id)
        if queue is None:
            queue = self.waiting[request.key_id] = collections.deque()
        queue.append(request)
        self._queued += 1
        self._observe(request.key_id, None)

    def drain_waiting(self) -> list[GenerationRequest]:
        """Remove and return every waiting request (the engine is dying or stopping)."""
        out = [r for q in self.waiting.values() for r in q]
        self.waiting.clear()
        self._queued = 0
        return out

    def _observe(self, key_id: str, waited_s: float | None) -> None:
        if self.observer is not None:
            self.observer.queue_depth(self._queued)
            self.observer.key_queue(key_id, len(self.waiting.get(key_id, ())), waited_s)

    def _pop(self, key_id: str) -> GenerationRequest:
        queue = self.waiting[key_id]
        request = queue.popleft()
        self._queued -= 1
        # the key's turn is over: it goes to the back of the rotation (or leaves it when it has nothing queued)
        del self.waiting[key_id]
        if queue:
            self.waiting[key_id] = queue
        self._observe(key_id, time.monotonic() - request.enqueued_at)
        return request

    # -- decide -------------------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """What runs this iteration (see the module docstring for the order)."""
        self._drop_cancelled()
        decode = list(self.running)
        budget = self.token_budget - len(decode) if self.token_budget else None
        if budget is not None and budget <= 0:
            budget = 1  # rows beyond the budget still decode; waiting prompts still move, one token at a time
        chunks: list[PrefillChunk] = []
        if self.dynamic:
            if not self.running and not self.prefilling:
                while self.waiting:
                    key_id = next(iter(self.waiting))
                    if self._rows_taken() + self.waiting[key_id][0].width > self.max_rows:
                        break
                    row = RowState(self._pop(key_id))
                    self.prefilling.append(row)
                    chunks.append(PrefillChunk(row, row.prompt_len, whole=True))
            return SchedulerOutput(decode, chunks)
        # a quarter of the budget stays for prompts already being prefilled in chunks
        reserved = 0
        if budget is not None and self.prefilling:
            reserved = min(sum(r.prompt_len - r.computed for r in self.prefilling), max(1, budget // 4))
        free = None if budget is None else budget - reserved
        # whole prompts get their allowance only while no prompt is being prefilled in chunks: with a long prompt in
        # flight, its chunk and a burst of whole prompts in one iteration would stall the decoding rows for both
        chunking = bool(self.prefilling)
        allowance = free
        if budget is not None and not chunking:
            allowance = max(1, WHOLE_PROMPT_BUDGETS * self.token_budget - len(decode))
        admitted, after = self._admit(allowance)
        if chunking:
            free = after  # whole prompts took their tokens from the budget, as chunks do
        chunks += [PrefillChunk(row, row.prompt_len, whole=True) for row in admitted]
        left = None if free is None else free + reserved
        # shortest remaining first: a short prompt that missed the whole-prompt budget finishes in this iteration or
        # the next instead of queueing behind a long prompt's every chunk (its first token is what its client waits
        # for); the long prompt gets the rest, and at least the reserve once the short ones are done
        for row in sorted(self.prefilling, key=lambda r: r.prompt_len - r.computed):
            if any(c.row is row for c in chunks):
                continue
            if left is not None and left <= 0:
                break
            need = row.prompt_len - row.computed
            tokens = need if left is None else min(need, left)
            chunks.append(PrefillChunk(row, tokens, whole=False))
            if left is not None:
                left -= tokens
        return SchedulerOutput(decode, chunks)

    def _admit(self, free: int | None) -> tuple[list[RowState], int | None]:
        """Admit waiting requests round-robin across keys while a row is free: the prompts that fit the `free` budget
        (returned, with the budget they leave) run whole this iteration; a longer one joins the prompts prefilled in
        chunks and takes no budget here, so the keys after it still get their turn."""
        whole: list[RowState] = []
        skipped: set[str] = set()
        while self.waiting and self._rows_taken() < self.max_rows:
            key_id = next((k for k in self.waiting if k not in skipped), None)
            if key_id is None:
                break
            head = self.waiting[key_id][0]
            if self._rows_taken() + head.width > self.max_rows:
                skipped.add(key_id)  # its choices do not all fit yet: its turn passes, narrower requests go on
                continue
            busy = sum(r.prompt_len - r.computed for r in self.prefilling if r.request.key_id == key_id)
            if busy and self.key_prefill_tokens and busy + len(head.prompt_ids) > self.key_prefill_tokens:
                skipped.add(key_id)  # over its prompt-token cap: its turn passes, others go on
                continue
            if free is not None and free <= 0:
                break
            row = RowState(self._pop(key_id))
            self.prefilling.append(row)
            if free is None or row.prompt_len <= free:
                whole.append(row)
                if free is not None:
                    free -= row.prompt_len
        return whole, free

    def _rows_taken(self) -> int:
        """Rows admitted, counting the forks a prefilling prompt will need."""
        return len(self.running) + sum(r.request.width for r in self.prefilling)

    def _drop_cancelled(self) -> None:
        for key_id in list(self.waiting):
            queue = self.waiting[key_id]
            for request in [r for r in queue if r.cancelled]:
                queue.remove(request)
                self._queued -= 1
                request.finish("cancelled")
            if not queue:
                del self.waiting[key_id]
        for row in [r for r in self.prefilling if r.request.cancelled]:
            self.prefilling.remove(row)
            row.request.finish("cancelled")

    # -- record -------------------------------------------------------------------------------------------------------

    def update_from_output(self, out: SchedulerOutput, result: ModelOutput) -> None:
        """Apply an iteration's results: emit tokens, finish rows, move fully prefilled rows to the running ones
        (appended in the order of `out.prefill`, which is the order the engine merges their caches in)."""
        for row, error in result.failed.items():
            row.request.finish("error", error)
        for row, computed in result.computed.items():
            row.computed = computed
        running: list[RowState] = []
        joined = [c.row for c in out.prefill if c.row.prefilled and c.row not in result.failed]
        joined = [r for row in joined for r in (row, *result.forks.get(row, ()))]
        for row in [*out.decode, *joined]:
            if row in result.failed or row.request.finished:
                continue
            token = result.tokens.get(row)
            if token is None:  # no logits this iteration (cannot happen for decoded or joined rows)
                row.request.finish("error", "the engine produced no token for this request")
                continue
            if self._record(row, token, result.logprobs.get(row)):
                running.append(row)
        self.running = running
        self.prefilling = [r for r in self.prefilling if not r.prefilled and not r.request.finished]

    def _record(self, row: RowState, token: int, logprobs: tuple[float, tuple[tuple[int, float], ...]] | None) -> bool:
        """One sampled token: True while the row goes on decoding."""
        req = row.request
        if req.cancelled:
            req.finish("cancelled")
            return False
        if token in self.eos_token_ids:
            req.finish("stop")
            return False
        req.generated += 1
        req.output_ids.append(token)
        event = TokenEvent(token) if logprobs is None else TokenEvent(token, logprobs[0], logprobs[1])
        if not req.send(event):
            return False  # its consumer is broken: drop the row
        if req.generated >= req.params.max_tokens:
            req.finish("length")
            return False
        row.next_token = token
        return True

    def fail_all(self, error: str) -> None:
        """A failure that belongs to no row: every admitted row ends with `error`."""
        for row in self.rows:
            row.request.finish("error", error)
        self.running, self.prefilling = [], []
