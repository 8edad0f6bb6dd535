"""Constrained decoding for the built-in engine: per-row grammar matchers (llguidance) and their token masks.

A request that asks for structured output (`response_format`, a forced tool call) carries a `RowGrammar`: before each
of its tokens is sampled, the matcher's bitmask of allowed tokens is applied to that row's logits only (other rows of
the batch are untouched), the sampled token advances the matcher, and once the grammar is complete the only token
it allows is EOS, so the row ends with finish_reason "stop" and its text parses.

Why llguidance (bench/constrained.py, bench/RESULTS.md "Constrained decoding"): vLLM ships it as its `guidance`
structured-output backend (vllm/v1/structured_output/backend_guidance.py, which this module follows: a tokenizer
built once with `llguidance.hf.from_tokenizer`, `LLMatcher` per request, `fill_next_token_bitmask`, `consume_token`);
it has no dependencies (xgrammar 0.2.8 pulls triton and apache-tvm-ffi into a CPU stack); it bounds its own work
with `LLParserLimits` (lexer fuel per mask, grammar size), so a hostile grammar becomes an error state instead of a
stalled engine thread, and it never raises for a bad grammar (`is_error()` / `get_error()`).

Compilation is bounded before and around the library: `check_schema_size` refuses a schema by its size and depth
before anything compiles, `GrammarCompiler.compile` caches compiled grammars (LRU keyed on the canonical grammar
text) and checks each new one by computing its first mask; the API side (serving/backends/local.py) runs it off the
engine thread with a timeout.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

# Bounds on a client's grammar, checked before compiling (docs/serving.md "Limits").
MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema (or all tools' parameter schemas together), serialized
MAX_SCHEMA_DEPTH = 32  # nesting of objects / arrays in the schema document
GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (least recently used goes first)
# llguidance's own work limits (llguidance/_lib.pyi LLParserLimits; its defaults in parentheses): lexer fuel per
# token mask (200k, ~14k/ms: ~14 ms at most per row and token), Earley items per mask (50k), lexer states (250k),
# grammar symbols (500k). Smaller than the defaults: a request's mask runs on the engine thread, where every other
# row waits for it.
_LIMITS = dict(step_lexer_fuel=100_000, step_max_items=20_000, max_lexer_states=50_000, max_grammar_size=100_000)


class GrammarError(ValueError):
    """The client's grammar (schema, tool parameters) cannot be used; the message says why."""


def check_schema_size(schema: Any, what: str) -> None:
    """Refuse a schema by its size and nesting, before any compilation (a `GrammarError` naming `what`)."""
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise GrammarError(f"{what} is {size} bytes serialized; at most {MAX_SCHEMA_BYTES} are allowed")
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"{what} nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]


def json_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar of JSON values matching `schema`: compact JSON (no free whitespace, so a model cannot
    fill its max_tokens with spaces; vLLM's `disable_any_whitespace` option), unknown keywords refused."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"not a usable JSON schema: {exc}") from exc


def lark_grammar(lark: str) -> str:
    """The llguidance grammar of a Lark grammar (the tool-call formats, serving/tools.py, embed `%json{...}`)."""
    return llguidance.LLMatcher.grammar_from_lark(lark)


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: a pristine matcher that each request copies (`LLMatcher.deep_copy` is cheap)."""

    key: str
    _matcher: Any

    vocab_size: int

    def row(self) -> RowGrammar:
        return RowGrammar(self._matcher.deep_copy(), self.vocab_size)


class RowGrammar:
    """One row's matcher: fills that row's bitmask before sampling, and is advanced by each token it emits."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self.vocab_size = vocab_size

    def new_bitmask(self, rows: int) -> torch.Tensor:
        """An all-allowed bitmask for `rows` rows (int32 words, 32 tokens each)."""
        return llguidance.torch.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """The allowed tokens into `bitmask[index]` (EOS only once the grammar is complete)."""
        llguidance.torch.fill_next_token_bitmask(self._m, bitmask, index)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False when the grammar cannot take it (or failed on its limits)."""
        if self._m.is_stopped():
            return True  # EOS after a complete grammar: the row ends here
        return bool(self._m.consume_token(token)) and not self._m.is_error()

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""


class GrammarCompiler:
    """Compiles grammar text for one tokenizer, with an LRU cache keyed on the grammar text. Thread-safe."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        # ~1 s for a 49k vocabulary (llguidance.hf docs): once per server
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, max(vocab_size, len(tokenizer)), eos_token=sorted(eos_token_ids)
        )
        self.vocab_size = self.tokenizer.vocab_size
        self._limits = llguidance.LLParserLimits(**_LIMITS, verbose_errors=False)
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and the bench

    def compile(self, grammar: str) -> Grammar:
        """The compiled grammar (from the cache when seen before); `GrammarError` when it is unusable."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)
        if not matcher.is_error():
            # the first mask builds the lexer for the grammar's start: a pathological regex fails here, on this
            # (API-side) thread, and not on the engine thread later
            mask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        compiled = Grammar(grammar, matcher, self.vocab_size)
        with self._lock:
            self.compiled += 1
            self._cache[grammar] = compiled
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`logits` (rows x vocab) with row `rows[k]`'s disallowed tokens (`bitmask[k]`) at -inf; a copy, other rows as
    they were.

    On CPU in numpy, single-threaded: each torch op here is small, and on a busy CPU every intra-op-parallel torch op
    waits to wake the engine's other OpenMP threads (measured in the engine on 2 loaded cores: ~16 ms per op, 144 ms
    per mask, against 0.2 ms in numpy; bench/RESULTS.md "Constrained decoding"). llguidance's own
    `apply_token_bitmask_inplace` is a `torch.compile` kernel, which would compile on the engine thread."""
    vocab = logits.shape[-1]
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab].astype(bool)
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_DTYPES:
        out = logits.detach().numpy().copy()
        for k, row in enumerate(rows):
            out[row, ~allowed[k]] = -np.inf
        return torch.from_numpy(out)
    at = torch.tensor(rows, device=logits.device)
    banned = torch.from_numpy(~allowed).to(logits.device)
    return logits.index_copy(0, at, logits.index_select(0, at).masked_fill(banned, float("-inf")))


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)  # numpy has no bfloat16


def _short(error: str) -> str:
    return error.strip().splitlines()[0][:300] if error.strip() else "the grammar is invalid"
