"""Training data at scale: prepare once on W workers, train from shards vs raw text, resume on another world size.

    .venv/bin/python bench/data_scale.py [--big-mb 2000] [--mb 16] [--small-mb 4] [--steps 20]

In one run, on generated corpora (16 files each, every fourth JSONL) of `--small-mb`, `--mb` and `--big-mb` MB:
1. `python -m training.prepare` with 1 and with 2 workers on the big corpus: MB/s of input, the speed-up, and
   whether the shards are byte-identical (their sha256s, compared file by file without loading them whole), and
   the CPU seconds each run used (workers included): CPU / wall is the cores the machine actually gave it. The
   load average (/proc/loadavg) before and after each preparation is printed with it.
2. `python -m training` (debug model, one process, same seed) for `--steps` steps: from the shards on all three
   sizes and from the raw text on the small and the medium one (the raw path holds the tokenized corpus in memory,
   roughly 30 MB of RSS per MB of text, so the big corpus does not fit it on this machine; the two raw sizes show
   it growing). Reported: the trainer's peak RSS (the child's own rusage, `os.wait4`), the time from process start
   to the first step's record, and whether the per-step losses of shards and raw text are equal.
3. The loader over the medium shards, stopped mid-epoch on 2 ranks (4 sequences each) and resumed on 1 rank (8):
   whether its next micro-batches are exactly the ones the 2 ranks would have read (through the epoch boundary).
Prints one JSON object per measurement and a summary with the ratios. Not a test: timings depend on the machine's
load, so both sides run in this one process's run and only ratios are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def generate_corpus(root: Path, mb: float, files: int = 16, seed: int = 0) -> int:
    """`files` files (every fourth JSONL) of random documents over the debug tokenizer's corpus words; bytes.

    Written in chunks of documents (numpy draws the words), so 2 GB takes minutes and little memory."""
    import numpy as np

    words = np.array((REPO_ROOT / "training" / "assets" / "corpus.txt").read_text(encoding="utf-8").split())
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    per_file = int(mb * 1e6 / files)
    total = 0
    for f in range(files):
        jsonl = f % 4 == 3
        path = root / f"part-{f:03d}.{'jsonl' if jsonl else 'txt'}"
        size, first = 0, True
        with path.open("w", encoding="utf-8") as out:
            while size < per_file:
                lengths = rng.integers(30, 301, size=32)
                picks = words[rng.integers(0, len(words), size=int(lengths.sum()))]
                cuts = np.cumsum(lengths)[:-1]
                docs = [" ".join(d) for d in np.split(picks, cuts)]
                if jsonl:
                    text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
                else:
                    text = ("" if first else "\n\n") + "\n\n".join(docs)
                first = False
                out.write(text)
                size += len(text)
        total += path.stat().st_size
    return total


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def same_files(a: Path, b: Path) -> bool:
    """Whether two shard directories hold the same files, byte for byte (streamed: shards may be GBs)."""
    names_a = sorted(p.name for p in a.glob("*.bin"))
    if names_a != sorted(p.name for p in b.glob("*.bin")):
        return False
    for name in names_a:
        with (a / name).open("rb") as fa, (b / name).open("rb") as fb:
            while True:
                ca, cb = fa.read(1 << 22), fb.read(1 << 22)
                if ca != cb:
                    return False
                if not ca:
                    break
    return True


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
    p.add_argument("--big-mb", type=float, default=2000.0, help="big corpus (prepare 1 vs 2 workers; shards), MB")
    p.add_argument("--mb", type=float, default=16.0, help="medium corpus (raw and shards), MB of text")
    p.add_argument("--small-mb", type=float, default=4.0, help="small corpus (raw and shards), MB of text")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--work-dir", default=None, help="where corpora and shards go (default: a temporary directory)")
    args = p.parse_args()
    started = time.perf_counter()
    print(json.dumps({"loadavg_start": loadavg()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="data-scale-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        sizes = {
            "small": generate_corpus(root / "small", args.small_mb, seed=1),
            "medium": generate_corpus(root / "medium", args.mb, seed=2),
            "big": generate_corpus(root / "big", args.big_mb, seed=3),
        }
        print(json.dumps({"corpus_bytes": sizes, "generated_s": round(time.perf_counter() - started, 1)}), flush=True)

        load_before_w1 = loadavg()
        one = run_prepare(root / "big", root / "prep-1", 1, args.seq_len)
        load_after_w1 = loadavg()
        two = run_prepare(root / "big", root / "prep-2", 2, args.seq_len)
        load_after_w2 = loadavg()
        prep = {
            "corpus_mb": round(sizes["big"] / 1e6, 1),
            "tokens": one["manifest"]["tokens"],
            "sequences": one["manifest"]["sequences"],
            "shards": len(one["manifest"]["shards"]),
            "w1_s": one["seconds"],
            "w2_s": two["seconds"],
            "w1_mb_per_s": round(sizes["big"] / 1e6 / one["seconds"], 2),
            "w2_mb_per_s": round(sizes["big"] / 1e6 / two["seconds"], 2),
            "speedup_w2": round(one["seconds"] / two["seconds"], 2),
            # CPU seconds used, and cores obtained on average (cpu / wall): what the machine gave each run.
            "w1_cpu_s": one["cpu_s"],
            "w2_cpu_s": two["cpu_s"],
            "w1_cores": round(one["cpu_s"] / one["seconds"], 2),
            "w2_cores": round(two["cpu_s"] / two["seconds"], 2),
            "shards_identical": same_files(root / "prep-1" / "shards", root / "prep-2" / "shards")
            and [s["sha256"] for s in one["manifest"]["shards"]] == [s["sha256"] for s in two["manifest"]["shards"]],
            "loadavg_before_w1": load_before_w1,
            "loadavg_after_w1": load_after_w1,
            "loadavg_after_w2": load_after_w2,
        }
        print(json.dumps({"prepare": prep}), flush=True)
        shutil.rmtree(root / "prep-2")  # identical to prep-1: free the disk
        for size in ("small", "medium"):
            run_prepare(root / size, root / f"prep-{size}", 1, args.seq_len)

        train: dict = {}
        for size, manifest in (
            ("small", root / "prep-small" / "manifest.json"),
            ("medium", root / "prep-medium" / "manifest.json"),
            ("big", root / "prep-1" / "manifest.json"),
        ):
            from_shards = run_training(str(manifest), root / f"run-shards-{size}", args.steps, args.seq_len)
            train[size] = {"shards": {k: v for k, v in from_shards.items() if k != "losses"}}
            if size != "big":  # the raw path tokenizes the whole corpus into memory: see the docstring
                from_raw = run_training(str(root / size), root / f"run-raw-{size}", args.steps, args.seq_len)
                train[size]["raw"] = {k: v for k, v in from_raw.items() if k != "losses"}
                train[size]["losses_equal"] = (
                    from_raw["losses"] == from_shards["losses"] and len(from_raw["losses"]) == args.steps
                )
            train[size]["losses"] = from_shards["losses"]
            print(json.dumps({"train": {size: train[size]}}), flush=True)

        resume = resume_check(root / "prep-medium" / "manifest.json", root / "cache")
        print(json.dumps({"resume_2_to_1_ranks": resume}), flush=True)

    t = train
    summary = {
        "corpus_mb_small_medium_big": [round(sizes[k] / 1e6, 1) for k in ("small", "medium", "big")],
        "prepare_big_mb_per_s_w1_w2": [prep["w1_mb_per_s"], prep["w2_mb_per_s"]],
        "prepare_speedup_2_workers": prep["speedup_w2"],
        "prepare_cores_obtained_w1_w2": [prep["w1_cores"], prep["w2_cores"]],
        "shards_identical_1_vs_2_workers": prep["shards_identical"],
        "peak_rss_mb_shards_small_medium_big": [t[k]["shards"]["peak_rss_mb"] for k in ("small", "medium", "big")],
        "peak_rss_mb_raw_small_medium": [t[k]["raw"]["peak_rss_mb"] for k in ("small", "medium")],
        "first_step_s_shards_small_medium_big": [t[k]["shards"]["first_step_s"] for k in ("small", "medium", "big")],
        "first_step_s_raw_small_medium": [t[k]["raw"]["first_step_s"] for k in ("small", "medium")],
        "losses_equal_small_medium": [t[k]["losses_equal"] for k in ("small", "medium")],
        "resume_identical": resume["identical"],
        "loadavg_end": loadavg(),
        "total_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
