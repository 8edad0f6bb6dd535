"""The demo's optional compression stage (`python -m ops.local_e2e --compress`, `make demo-compress`).

After the demo has fine-tuned the teacher and served it, on the same local S3:

1. prunes the fine-tuned export by Block Influence on the training chats (`python -m training.prune`, S3 in and out);
2. distils the pruned student from the fine-tuned teacher (`torchrun -m training --distill-from`, 2 ranks, FSDP2);
3. scores teacher and student on the held-out chats (real model only);
4. serves the student with `--quantization int8` and times the same answer from the teacher's server and the
   student's: held-out perplexity and decode speed side by side.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Write a Python function that returns the square of a number."


def _decode_speed(client: Any, model: str, max_tokens: int) -> float:
    """Completion tokens per second of one greedy answer (the decode dominates at this length)."""
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0
    )
    return r.usage.completion_tokens / (time.perf_counter() - t0)


def run_compression(
    *,
    env: dict[str, str],
    teacher: str,
    data: str,
    buckets: tuple[str, str],
    keep_layers: int,
    steps: int,
    debug: bool,
    workdir: Path,
    teacher_client: Any,
    keys_file: Path,
    cleanup: ExitStack,
    train: Callable[[dict[str, str], list[str], int, Path], dict[str, Any]],
) -> dict[str, Any]:
    """Prune `teacher` (an s3:// export) to `keep_layers`, distil `steps` steps, serve the student; the summary.
    `buckets`: (checkpoints, models); `train`: the demo's torchrun runner; the student's server is stopped by
    `cleanup`."""
    from openai import OpenAI

    from ops.local_e2e import stop
    from ops.net import free_port, wait_http

    checkpoints, models = buckets
    pruned, student = f"s3://{models}/demo-pruned", f"s3://{models}/demo-student"
    print(f"  pruning {teacher} to {keep_layers} layers (Block Influence on {data})", flush=True)
    prune = subprocess.run(
        [sys.executable, "-m", "training.prune", "--model", teacher, "--out", pruned, "--keep-layers",
         str(keep_layers), "--calib", data] + (["--seq-len", "64"] if debug else []),
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if prune.returncode != 0:
        raise RuntimeError(f"pruning failed:\n{prune.stderr[-3000:]}")
    print("\n".join(f"    {line}" for line in prune.stdout.splitlines()[-3:]), flush=True)

    print(f"  distilling {pruned} from {teacher}: torchrun, 2 processes, {steps} steps", flush=True)
    args = ["--preset", "debug"] if debug else []
    args += ["--model", pruned, "--distill-from", teacher, "--data", data, "--output",
             f"s3://{checkpoints}/runs/demo-student", "--export", student, "--max-steps", str(steps),
             "--save-every", str(max(steps // 2, 1))]  # fmt: skip
    metrics = train(env, args, steps, workdir / "distill.log")

    ppl: dict[str, float] = {}
    if not debug:
        from training.evaluate import perplexity
        from training.storage import S3Storage

        heldout = REPO / "training" / "assets" / "chat-heldout.jsonl"
        for name, uri in (("teacher", teacher), ("student", student)):
            local = workdir / f"eval-{name}"
            S3Storage(uri).download_dir("", local)
            ppl[name] = round(perplexity(local, heldout)["perplexity"], 2)

    port = free_port()
    log = (workdir / "serve-student.log").open("w")
    cleanup.callback(log.close)
    server = subprocess.Popen(
        [sys.executable, "-m", "serving", "--model", student, "--quantization", "int8", "--host", "127.0.0.1",
         "--port", str(port), "--api-keys-file", str(keys_file), "--model-cache-dir", str(workdir / "model-cache")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    cleanup.callback(stop, server)
    url = f"http://127.0.0.1:{port}/v1"
    wait_http(f"http://127.0.0.1:{port}/readyz", 180, server, "serving (student)")
    print(f"  student served (int8) at {url}", flush=True)
    student_client = OpenAI(base_url=url, api_key=teacher_client.api_key, max_retries=0, timeout=300)
    student_id = student_client.models.list().data[0].id
    teacher_id = teacher_client.models.list().data[0].id
    max_tokens = 24 if debug else 64
    speed = {
        "teacher": round(_decode_speed(teacher_client, teacher_id, max_tokens), 1),
        "student": round(_decode_speed(student_client, student_id, max_tokens), 1),
    }
    print(f"  {'':10s} {'held-out ppl':>12s} {'decode tok/s':>12s}")
    for name in ("teacher", "student"):
        print(f"  {name:10s} {ppl.get(name, float('nan')):>12.2f} {speed[name]:>12.1f}")
    return {
        "student": student,
        "served_as": student_id,
        "keep_layers": keep_layers,
        "distill_steps": metrics.get("step"),
        "heldout_perplexity_teacher_student": [ppl.get("teacher"), ppl.get("student")],
        "decode_tok_s_teacher_student": [speed["teacher"], speed["student"]],
    }
