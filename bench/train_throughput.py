"""Training throughput: our trainer vs the Hugging Face `Trainer`, same model, data, batch and steps, same run.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--rounds 2]
    .venv/bin/python bench/train_throughput.py --model smollm2 --batch 4 --steps 6 --warmup 2 --rounds 2

`--model smollm2` trains the real SmolLM2-135M-Instruct (ops/smollm2.py) instead of the debug Llama; any
Hugging Face model directory works too.

Both train the debug Llama (training/debug_model.py) on the same packed sequences of the same corpus, one process,
same micro-batch, sequence length, optimizer (AdamW), clipping and cosine schedule. Ours runs as users run it
(`python -m training`, a subprocess); the HF Trainer runs in this process. Throughput counts only the optimizer
steps after a warm-up, timed the same way for both (wall time between step ends), so start-up, checkpointing and
export do not count.

Noise: on a shared machine, other processes' load changes step times by up to 10x within a minute. So the two sides
alternate in many short rounds, each side's step times are pooled over its rounds, and throughput is computed from
the median step time (robust to the spikes that hit one round). Both use the same number of intra-op threads
(`--threads`, default 1: with 2 threads on 2 busy cores, thread barrier stalls dominate and measure the neighbours,
not the trainer). The last line is `ratio: X` (ours / HF; > 1 means ours is faster). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a checkpoint is complete when the marker is written.",
    "every rank reads its own share of the data.",
    "the platform trains and serves language models on a cluster of machines.",
]


def write_corpus(path: Path, n: int = 4000) -> None:
    import random

    rng = random.Random(0)
    path.write_text("\n\n".join(rng.choice(SENTENCES) for _ in range(n)), encoding="utf-8")


MODEL = "debug"
"""`--model`: "debug", or a Hugging Face model directory (set by main())."""


def ours(corpus: Path, steps: int, batch: int, seq_len: int, warmup: int, threads: int) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "-m", "training", "--preset", "debug", "--model", MODEL, "--data", str(corpus),
             "--output", out,
             "--max-steps", str(steps), "--save-every", "0", "--strategy", "ddp",
             "--set", f"parallel.micro_batch_size={batch}", "--set", f"data.seq_len={seq_len}",
             "--set", "optim.weight_decay=0.0"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
            env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
        )  # fmt: skip
    times = [json.loads(x)["step_time_s"] for x in proc.stdout.splitlines() if x.startswith('{"step"')]
    return times[warmup:]


def hf_trainer(corpus: Path, steps: int, batch: int, seq_len: int, warmup: int, threads: int) -> list[float]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from training.config import preset
    from training.data import build_sequences
    from training.debug_model import build_model, build_tokenizer

    torch.set_num_threads(threads)
    cfg = preset("debug")
    if MODEL == "debug":
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(MODEL)
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.config.use_cache = False
    seqs = build_sequences(corpus, tokenizer, seq_len, "text")
    # Same tokens per step as ours: seq_len inputs per row; HF shifts labels inside the model.
    dataset = [{"input_ids": s[:seq_len], "labels": s[:seq_len]} for s in seqs]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.ends.append(time.perf_counter())

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=cfg.optim.lr,
            warmup_steps=cfg.optim.warmup_steps,
            lr_scheduler_type="cosine",
            weight_decay=0.0,
            adam_beta1=cfg.optim.beta1,
            adam_beta2=cfg.optim.beta2,
            max_grad_norm=cfg.optim.grad_clip,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, callbacks=[clock]
        )
        trainer.train()
    # Step i's duration is ends[i] - ends[i-1]; skipping `warmup` steps matches ours.
    return [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)][warmup - 1 :]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--model", default="debug", help="debug, smollm2, or a Hugging Face model directory")
    a = p.parse_args()
    global MODEL
    if a.model == "smollm2":
        from ops.smollm2 import ensure

        MODEL = str(ensure())
    else:
        MODEL = a.model

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(corpus)
        step_times: dict[str, list[float]] = {"ours": [], "hf": []}
        for r in range(a.rounds):
            # Alternate who goes first so a slow phase of the machine does not always hit the same side.
            order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
            for name in order:
                fn = ours if name == "ours" else hf_trainer
                times = fn(corpus, a.steps, a.batch, a.seq_len, a.warmup, a.threads)
                step_times[name] += times
                tps = a.batch * a.seq_len / statistics.median(times)
                print(f"round {r + 1} {name:>4}: {tps:8.0f} tokens/s", flush=True)
    tokens = a.batch * a.seq_len
    name = "debug Llama" if MODEL == "debug" else Path(MODEL).name
    o = tokens / statistics.median(step_times["ours"])
    h = tokens / statistics.median(step_times["hf"])
    print(
        f"model: {name}, batch {a.batch} x {a.seq_len} tokens, {a.steps} steps ({a.warmup} warm-up) x {a.rounds}"
        f" rounds, 1 process, {a.threads} thread(s)"
    )
    print(f"ours (python -m training): {o:.0f} tokens/s (median step time over {len(step_times['ours'])} steps)")
    print(f"hf Trainer:                {h:.0f} tokens/s (median step time over {len(step_times['hf'])} steps)")
    print(f"ratio: {o / h:.3f}")


if __name__ == "__main__":
    main()
