"""Per-token cost of constrained decoding (issue 26), two measurements in one run:

1. the grammar libraries alone, on SmolLM2's tokenizer (vocabulary 49152): one token mask plus one advance per row and
   token, walking a fixed JSON document that matches the schema, at 1 and 16 rows (llguidance, which the engine uses;
   xgrammar and outlines-core too when importable: they are not in requirements.txt, install them aside to compare);
2. the engine (serving/batching.py) on SmolLM2-135M-Instruct: the same greedy decode of N rows x T tokens without a
   grammar and with a JSON-schema grammar on every row (a schema that cannot close within T tokens, so both runs
   produce exactly N x T tokens), at N = 1 and 16, interleaved, best of `--repeats`; it prints ms per token and the
   ratio constrained / unconstrained.

    python -m bench.constrained                  # ~1-2 minutes on 2 CPU cores
    python -m bench.constrained --tokens 16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ops.smollm2 import ensure as smollm2_dir
from serving.batching import BatchScheduler, Event, FinishEvent, GenerationRequest
from serving.decode import Decoder, SamplingParams
from serving.grammar import GrammarCompiler, json_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "population", "tags", "capital"],
    "additionalProperties": False,
}
DOC = json.dumps(
    {"city": "Paris", "population": 2148000, "tags": ["france", "europe", "seine", "art"], "capital": True},
    separators=(",", ":"),  # compact, as the grammars are compiled (no free whitespace)
)
# the engine run: an answer that cannot end within the measured tokens (at least 64 items), so every row decodes T
LONG = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64}


def _walk(name: str, make: Callable[[], Any], fill: Callable, consume: Callable, ids: list[int], vocab: int) -> None:
    for rows in (1, 16):
        matchers = [make() for _ in range(rows)]
        mask = torch.zeros((rows, (vocab + 31) // 32), dtype=torch.int32)
        started = time.perf_counter()
        for token in ids:
            for i, m in enumerate(matchers):
                fill(m, mask, i)
                assert consume(m, token) is not False, f"{name} refused the document's token {token}"
        step = (time.perf_counter() - started) / len(ids)
        print(f"  {name:14s} {rows:2d} rows: {step * 1e3:7.3f} ms per step, {step / rows * 1e3:6.3f} ms per row-token")


def libraries(tok: Any) -> None:
    vocab = len(tok)
    ids = tok.encode(DOC, add_special_tokens=False)
    print(f"grammar libraries alone (mask + advance), vocabulary {vocab}, {len(ids)}-token JSON document:")
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lt = llguidance.hf.from_tokenizer(tok, vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    _walk(
        "llguidance",
        lambda: llguidance.LLMatcher(lt, grammar),
        lambda m, mask, i: llguidance.torch.fill_next_token_bitmask(m, mask, i),
        lambda m, t: m.consume_token(t),
        ids,
        vocab,
    )
    try:
        import xgrammar  # not pinned: compared when installed aside
    except ImportError:
        print("  xgrammar       not installed")
    else:
        compiled = xgrammar.GrammarCompiler(
            xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        ).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
        _walk(
            "xgrammar",
            lambda: xgrammar.GrammarMatcher(compiled),
            lambda m, mask, i: m.fill_next_token_bitmask(mask, i),
            lambda m, t: m.accept_token(t),
            ids,
            vocab,
        )
    try:
        import outlines_core  # not pinned: compared when installed aside
    except ImportError:
        print("  outlines-core  not installed")
    else:
        index = outlines_core.Index(
            outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r""), _outlines_vocabulary(tok)
        )
        _walk(
            "outlines-core",
            lambda: outlines_core.Guide(index),
            lambda m, mask, i: m.write_mask_into(mask[i].data_ptr(), mask[i].numel(), 4),
            lambda m, t: m.advance(t),
            ids,
            vocab,
        )


def _outlines_vocabulary(tok: Any) -> Any:
    """outlines-core's Vocabulary from a byte-level BPE tokenizer: each token's bytes (GPT-2's byte-to-unicode map)."""
    import outlines_core

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    to_byte = {chr(c): b for b, c in zip(printable, chars, strict=True)}
    tokens: dict[bytes, list[int]] = {}
    special = set(tok.all_special_ids)
    for i in range(len(tok)):
        if i not in special:
            tokens.setdefault(bytes(to_byte[c] for c in tok.convert_ids_to_tokens(i)), []).append(i)
    return outlines_core.Vocabulary(tok.eos_token_id, tokens)


class _TimedScheduler(BatchScheduler):
    """Times each sampling step (grammar masks, sampling, matcher advance: all that constrained decoding adds) apart
    from the model's forward, which dominates and is noisy on shared cores; the median step is reported, so a step
    that the neighbours' load preempted does not count as grammar cost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample_s: list[float] = []

    def _sample(self, parts: Any, result: Any) -> None:
        started = time.perf_counter()
        super()._sample(parts, result)
        self.sample_s.append(time.perf_counter() - started)


class _Done:
    def __init__(self) -> None:
        self.tokens = 0
        self.event = threading.Event()

    def __call__(self, event: Event) -> None:
        if isinstance(event, FinishEvent):
            self.event.set()
        else:
            self.tokens += 1


def engine(model: Any, tok: Any, rows: int, tokens: int, compiler: GrammarCompiler | None) -> tuple[float, float, int]:
    """Seconds in all, the median sampling step (seconds) and tokens, for `rows` greedy rows of `tokens` tokens."""
    scheduler = _TimedScheduler(Decoder(model, tok.pad_token_id), set(), max_batch_size=rows, token_budget=0)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "List 64 city names as a JSON array."}], add_generation_prompt=True
    )["input_ids"]
    grammar = compiler.compile(json_grammar(LONG)) if compiler is not None else None
    done = [_Done() for _ in range(rows)]
    scheduler.start()
    try:
        started = time.perf_counter()
        for d in done:
            request = GenerationRequest(list(prompt), SamplingParams(tokens, temperature=0.0), d)
            request.grammar = grammar.row() if grammar is not None else None
            scheduler.submit(request)
        for d in done:
            assert d.event.wait(600)
        return time.perf_counter() - started, statistics.median(scheduler.sample_s), sum(d.tokens for d in done)
    finally:
        scheduler.stop(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens per row in the engine run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (best is kept)")
    args = parser.parse_args(argv)
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    libraries(tok)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    compiler = GrammarCompiler(tok, model.config.vocab_size, {tok.eos_token_id})
    print(f"\nengine, SmolLM2-135M-Instruct fp32, {torch.get_num_threads()} threads, greedy, {args.tokens} tokens/row:")
    for rows in (1, 16):
        best: dict[str, float] = {}
        sampling: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, c in (("unconstrained", None), ("constrained", compiler)):
                seconds, sample_s, n = engine(model, tok, rows, args.tokens, c)
                assert n == rows * args.tokens, (name, n)
                best[name] = min(best.get(name, float("inf")), seconds / n)
                sampling[name] = min(sampling.get(name, float("inf")), sample_s)
        added = sampling["constrained"] - sampling["unconstrained"]
        print(
            f"  {rows:2d} rows: wall per token: unconstrained {best['unconstrained'] * 1e3:7.2f} ms, constrained "
            f"{best['constrained'] * 1e3:7.2f} ms, ratio {best['constrained'] / best['unconstrained']:.3f}; "
            f"median sampling step: unconstrained {sampling['unconstrained'] * 1e3:6.3f} ms, constrained "
            f"{sampling['constrained'] * 1e3:6.3f} ms (grammar adds {added * 1e3:.3f} ms per step, "
            f"{added / rows * 1e3:.3f} ms per row-token)"
        )


if __name__ == "__main__":
    main()
