"""Training data at scale: prepare once on W workers, train from shards vs raw text, resume on another world size.

    .venv/bin/python bench/data_scale.py [--mb 40] [--small-mb 10] [--steps 20]

In one run, on a generated corpus of `--mb` MB of text (16 files, text and JSONL) and a `--small-mb` one:
1. `python -m training.prepare` with 1 and with 2 workers on the large corpus: MB/s of input, the speed-up, and
   whether the shards are byte-identical (their sha256s and bytes), and the CPU seconds each run used (workers
   included): CPU / wall is the cores the machine actually gave it.
2. `python -m training` (debug model, one process, same seed) for `--steps` steps from the shards and from the raw
   text, on both corpus sizes: the trainer's peak RSS (the child's own rusage, `os.wait4`), the time from process
   start to the first step's record, and whether the per-step losses are equal.
3. The loader over the shards, stopped mid-epoch on 2 ranks (4 sequences each) and resumed on 1 rank (8): whether
   its next micro-batches are exactly the ones the 2 ranks would have read (through the epoch boundary).
Prints one JSON object per measurement and a summary with the ratios. Not a test: timings depend on the machine's
load, so both sides run in this one process's run and only ratios are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def generate_corpus(root: Path, mb: float, files: int = 16, seed: int = 0) -> int:
    """`files` files (every fourth JSONL) of random documents over the debug tokenizer's corpus words; bytes."""
    words = (REPO_ROOT / "training" / "assets" / "corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_file = int(mb * 1e6 / files)
    total = 0
    for f in range(files):
        docs, size = [], 0
        while size < per_file:
            doc = " ".join(rng.choice(words) for _ in range(rng.randint(30, 300)))
            docs.append(doc)
            size += len(doc) + 2
        if f % 4 == 3:
            text = "\n".join(json.dumps({"text": d}) for d in docs) + "\n"
            path = root / f"part-{f:03d}.jsonl"
        else:
            text = "\n\n".join(docs)
            path = root / f"part-{f:03d}.txt"
        path.write_text(text, encoding="utf-8")
        total += path.stat().st_size
    return total


def run_prepare(src: Path, out: Path, workers: int, seq_len: int) -> dict:
    cmd = [sys.executable, "-m", "training.prepare", "--data", str(src), "--tokenizer", "debug", "--out", str(out),
           "--seq-len", str(seq_len), "--shard-mb", "8", "--workers", str(workers)]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the worker processes the command waited for
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"workers": workers, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "manifest": manifest}


def run_training(data: str, out: Path, steps: int, seq_len: int) -> dict:
    """The trainer as users run it; peak RSS from the child's own rusage, time to the first step's record."""
    cmd = [sys.executable, "-m", "training", "--preset", "debug", "--data", data, "--output", str(out),
           "--max-steps", str(steps), "--save-every", "0", "--set", f"data.seq_len={seq_len}"]  # fmt: skip
    env = dict(os.environ, TRAINING_LOCAL_DIR=str(out / "scratch"))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    stderr = open(out / "stderr.txt", "w", encoding="utf-8")  # noqa: SIM115 (closed after the wait below)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    assert proc.stdout is not None
    first_step_s = None
    losses: dict[int, float] = {}
    for line in proc.stdout:
        if line.startswith("{"):
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
                if first_step_s is None:
                    first_step_s = time.perf_counter() - started
    _, status, usage = os.wait4(proc.pid, 0)
    stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out / "stderr.txt").read_text(encoding="utf-8")[-3000:]
        raise SystemExit(f"training from {data} failed with {proc.returncode}:\n{tail}")
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "first_step_s": round(first_step_s or 0.0, 2),
        "total_s": round(time.perf_counter() - started, 2),
        "losses": losses,
    }


def resume_check(manifest: Path, cache: Path) -> dict:
    import torch

    from training.data import PackedLoader
    from training.shards import open_prepared

    _, seqs = open_prepared(str(manifest), cache, 0, cache_mb=64)
    two = [PackedLoader(seqs, 4, r, 2, seed=3) for r in range(2)]
    per_epoch = len(seqs) // 8
    stop = per_epoch - 3  # mid-epoch, 3 micro-batches before its end
    for _ in range(stop):
        for loader in two:
            loader.next_batch()
    one = PackedLoader(seqs, 8, 0, 1, seed=3)
    one.load_state_dict(two[0].state_dict())
    checked, equal = 0, True
    for _ in range(6):  # through the epoch boundary
        got = one.next_batch()[0]
        want = torch.cat([loader.next_batch()[0] for loader in two])
        equal &= torch.equal(got, want)
        checked += 1
    return {"stopped_at_micro_batch": stop, "checked_micro_batches": checked, "identical": bool(equal)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=40.0, help="large corpus size, MB of text")
    p.add_argument("--small-mb", type=float, default=10.0, help="small corpus size, MB of text")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()
    results: dict = {"load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        root = Path(tmp)
        sizes = {
            "small": generate_corpus(root / "small", args.small_mb, seed=1),
            "large": generate_corpus(root / "large", args.mb, seed=2),
        }
        print(json.dumps({"corpus_bytes": sizes}), flush=True)

        one = run_prepare(root / "large", root / "prep-1", 1, args.seq_len)
        two = run_prepare(root / "large", root / "prep-2", 2, args.seq_len)
        shards_1 = {p.name: p.read_bytes() for p in sorted((root / "prep-1" / "shards").glob("*.bin"))}
        shards_2 = {p.name: p.read_bytes() for p in sorted((root / "prep-2" / "shards").glob("*.bin"))}
        prep = {
            "corpus_mb": round(sizes["large"] / 1e6, 1),
            "tokens": one["manifest"]["tokens"],
            "sequences": one["manifest"]["sequences"],
            "shards": len(shards_1),
            "w1_s": one["seconds"],
            "w2_s": two["seconds"],
            "w1_mb_per_s": round(sizes["large"] / 1e6 / one["seconds"], 2),
            "w2_mb_per_s": round(sizes["large"] / 1e6 / two["seconds"], 2),
            "speedup_w2": round(one["seconds"] / two["seconds"], 2),
            # CPU seconds used, and cores obtained on average (cpu / wall): what the machine gave each run.
            "w1_cpu_s": one["cpu_s"],
            "w2_cpu_s": two["cpu_s"],
            "w1_cores": round(one["cpu_s"] / one["seconds"], 2),
            "w2_cores": round(two["cpu_s"] / two["seconds"], 2),
            "shards_identical": shards_1 == shards_2
            and [s["sha256"] for s in one["manifest"]["shards"]] == [s["sha256"] for s in two["manifest"]["shards"]],
        }
        print(json.dumps({"prepare": prep}), flush=True)
        run_prepare(root / "small", root / "prep-small", 1, args.seq_len)

        train = {}
        for size, raw, manifest in (
            ("small", root / "small", root / "prep-small" / "manifest.json"),
            ("large", root / "large", root / "prep-1" / "manifest.json"),
        ):
            from_raw = run_training(str(raw), root / f"run-raw-{size}", args.steps, args.seq_len)
            from_shards = run_training(str(manifest), root / f"run-shards-{size}", args.steps, args.seq_len)
            train[size] = {
                "raw": {k: v for k, v in from_raw.items() if k != "losses"},
                "shards": {k: v for k, v in from_shards.items() if k != "losses"},
                "losses_equal": from_raw["losses"] == from_shards["losses"] and len(from_raw["losses"]) == args.steps,
                "losses": from_shards["losses"],
            }
            print(json.dumps({"train": {size: train[size]}}), flush=True)

        resume = resume_check(root / "prep-1" / "manifest.json", root / "cache")
        print(json.dumps({"resume_2_to_1_ranks": resume}), flush=True)

    s, l_ = train["small"], train["large"]
    summary = {
        "prepare_speedup_2_workers": prep["speedup_w2"],
        "prepare_cores_obtained_w1_w2": [prep["w1_cores"], prep["w2_cores"]],
        "shards_identical_1_vs_2_workers": prep["shards_identical"],
        "peak_rss_mb_shards_small_large": [s["shards"]["peak_rss_mb"], l_["shards"]["peak_rss_mb"]],
        "peak_rss_mb_raw_small_large": [s["raw"]["peak_rss_mb"], l_["raw"]["peak_rss_mb"]],
        "first_step_s_shards_small_large": [s["shards"]["first_step_s"], l_["shards"]["first_step_s"]],
        "first_step_s_raw_small_large": [s["raw"]["first_step_s"], l_["raw"]["first_step_s"]],
        "losses_equal_small_large": [s["losses_equal"], l_["losses_equal"]],
        "resume_identical": resume["identical"],
        "load_avg_start": [round(x, 1) for x in results["load_avg_start"]],
        "load_avg_end": [round(x, 1) for x in os.getloadavg()],
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
