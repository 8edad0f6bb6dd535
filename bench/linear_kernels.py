"""The CPU kernels behind the built-in engine's projections, per SmolLM2-135M shape: `F.linear` (MKL sgemm), float32
in oneDNN's packed layout (`PackedLinear`, what `--quantization none` uses on CPU), and `Int8Linear` with one and two
activation digits (what `--quantization int8` uses); median milliseconds per call, configurations alternating.

    .venv/bin/python bench/linear_kernels.py [--threads 1] [--rows 1,5,16,64] [--rounds 5]

Prints one line per rows x shape, and the packed layout's largest difference from F.linear (relative to the output's
largest magnitude). Compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# SmolLM2-135M: (in, out) of q/k/v fused, o, gate/up fused, down, lm_head
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate/up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,5,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from torch import nn

    from serving.quantize import Int8Linear, PackedLinear

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); ms per call, median of {args.rounds} x {args.calls}")
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (k, n) in SHAPES.items():
            torch.manual_seed(0)
            linear = nn.Linear(k, n, bias=False)
            x = torch.randn(rows, k)
            packed = PackedLinear(linear)
            one, two = Int8Linear.from_linear(linear, digits=1), Int8Linear.from_linear(linear, digits=2)
            calls = {
                "F.linear": lambda x=x, w=linear.weight: F.linear(x, w),
                "packed fp32": lambda x=x, m=packed: m(x),
                "int8 1 digit": lambda x=x, m=one: m(x),
                "int8 2 digits": lambda x=x, m=two: m(x),
            }
            times: dict[str, list[float]] = {c: [] for c in calls}
            with torch.inference_mode():
                ref = F.linear(x, linear.weight)
                diff = float((packed(x) - ref).abs().max() / ref.abs().max())
                for _ in range(args.rounds):
                    for label, call in calls.items():
                        call()
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            call()
                        times[label].append((time.perf_counter() - t0) / args.calls * 1000)
            cells = "  ".join(f"{label} {statistics.median(t):7.3f}" for label, t in times.items())
            print(f"rows {rows:3d} {name:8s} {k:5d}->{n:<5d}  {cells}  packed diff {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
