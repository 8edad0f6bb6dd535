"""The decode cache's room to grow (serving/decode.py `_append_kv`) against concatenating the whole cache every step:
SmolLM2-135M decode steps at 16 rows through the engine's own `Decoder`, fp32 and int8, at short and long context
(the measurement behind `KV_ROOM_FROM`).

    .venv/bin/python bench/kv_room.py [--contexts 100,800] [--rounds 4] [--steps 16] [--threads 1]

Each (model, context) is prefilled once; every configuration then runs `--steps` greedy steps on its own copy of that
batch, configurations alternating within a round (so they see the same machine load), and the median of the rounds
is printed with the ratio room / cat (> 1: the room is faster). Compare within one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="100,800", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    import serving.decode as decode
    from bench.quantize_step import load_smollm2
    from serving.quantize import quantize_model

    tok, fp32 = load_smollm2(args.threads)
    int8 = copy.deepcopy(fp32)
    quantize_model(int8, "int8", "cpu", tok)
    thresholds = {"cat": 10**9, "room": 0}
    print(f"SmolLM2-135M, {args.rows} rows, {args.threads} thread(s), {args.steps} steps, median of {args.rounds}")
    for context in (int(c) for c in args.contexts.split(",")):
        gen = torch.Generator().manual_seed(context)
        prompts = [torch.randint(100, 10000, (context,), generator=gen).tolist() for _ in range(args.rows)]
        for name, model in (("fp32", fp32), ("int8", int8)):
            decoder = decode.Decoder(model, tok.pad_token_id)
            batch = decoder.prefill(prompts)
            times: dict[str, list[float]] = {}
            for r in range(args.rounds):
                for mode in thresholds if r % 2 == 0 else list(thresholds)[::-1]:
                    decode.KV_ROOM_FROM = thresholds[mode]
                    run = copy.deepcopy(batch)
                    with torch.inference_mode():
                        started = time.perf_counter()
                        for _ in range(args.steps):
                            decoder.step(run, run.logits.argmax(-1))
                    times.setdefault(mode, []).append((time.perf_counter() - started) / args.steps * 1000)
            cat, room = statistics.median(times["cat"]), statistics.median(times["room"])
            print(f"context {context:5d} {name}: cat {cat:7.1f} ms/step  room {room:7.1f} ms/step  room speed-up "
                  f"{cat / room:.2f}x", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
