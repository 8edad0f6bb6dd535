"""Which int8 recipe for the built-in engine on CPU: one decode step of SmolLM2-135M at batch 1 and 16 through the
engine's own `Decoder`, and held-out perplexity, for fp32 and each candidate (the measurement behind
serving/quantize.py's choice).

    .venv/bin/python bench/quantize_step.py [--threads 1] [--steps 12]

Candidates: our `Int8Linear` (what `--quantization int8` does: serving/quantize.py), `torch.ao` dynamic quantization
(per-tensor activations, fbgemm), torchao `Int8WeightOnlyConfig` and `Int8DynamicActivationInt8WeightConfig`
(skipped when torchao is not installed). Step times are medians; compare within one run.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# a held-out text (written for this benchmark, so in no training set): plain prose about an unrelated topic
HELD_OUT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a tin of oil and a cloth for the "
    "lens. From the gallery he could see the fishing boats turning for the harbour, their lamps swinging as the swell "
    "rose under them. In winter the storms came from the north-east and the spray reached the lantern room, so he kept "
    "a log of the wind, the sea state and the ships that passed. His daughter learned to read the barometer before she "
    "could read books, and by the age of ten she could tell from the colour of the clouds whether the mail boat would "
    "come. When the light was finally automated, the keeper moved to a cottage in the village, but he still woke at "
    "dusk, looked out towards the headland and waited until he saw the beam sweep across the water before he slept."
)


def candidates(base, tok) -> Iterator[tuple[str, object]]:
    import torch

    from serving.quantize import quantize_model

    yield "fp32", base
    m = copy.deepcopy(base)
    quantize_model(m, "int8", "cpu", tok)
    yield "Int8Linear (as --quantization int8)", m
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8)
    yield "torch.ao quantize_dynamic (per-tensor)", m
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return
    for config in (Int8WeightOnlyConfig(), Int8DynamicActivationInt8WeightConfig()):
        m = copy.deepcopy(base)
        quantize_(m, config)
        yield f"torchao {type(config).__name__}", m


def step_ms(model, pad: int, rows: int, steps: int) -> float:
    import torch

    from serving.decode import Decoder

    decoder = Decoder(model, pad)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 10000, (48,), generator=gen).tolist() for _ in range(rows)]
    with torch.inference_mode():
        batch = decoder.prefill(prompts)
        times = []
        for _ in range(steps):
            tokens = batch.logits.argmax(-1)
            t0 = time.perf_counter()
            decoder.step(batch, tokens)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def perplexity(model, ids) -> float:
    import torch

    with torch.inference_mode():
        return math.exp(float(model(input_ids=ids, labels=ids).loss))


def load_smollm2(threads: int):
    """(tokenizer, float32 model in eval mode) of SmolLM2-135M-Instruct, with torch on `threads` threads: what the
    step benchmarks start from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ops.smollm2 import ensure as smollm2_dir

    torch.set_num_threads(threads)
    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    import torch

    tok, base = load_smollm2(args.threads)
    ids = torch.tensor([tok.encode(HELD_OUT)])
    print(f"SmolLM2-135M, {args.threads} thread(s), torch {torch.__version__}; step = median of {args.steps}")
    report: Callable[[str], None] = print
    for name, model in candidates(base, tok):
        b1 = step_ms(model, tok.pad_token_id, 1, args.steps)
        b16 = step_ms(model, tok.pad_token_id, 16, args.steps)
        report(f"{name:45s} step b1 {b1:6.1f} ms  b16 {b16:6.1f} ms  perplexity {perplexity(model, ids):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
