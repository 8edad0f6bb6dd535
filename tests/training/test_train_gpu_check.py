"""bench/gpu_check.sh, the first-contact GPU check, in its CPU smoke mode (what CI runs): every part runs in its own
process and prints its JSON line; a failing part is reported as an error line and fails the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.sh"


def _run(python: str, timeout: int) -> tuple[int, list[dict], str]:
    env = dict(os.environ, GPU_CHECK_CPU_SMOKE="1", PYTHON=python)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    return proc.returncode, [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def test_cpu_smoke_runs_every_part() -> None:
    rc, records, stderr = _run(sys.executable, timeout=900)
    assert rc == 0, stderr[-4000:]
    assert not [r for r in records if "error" in r], records
    parts = [r["part"] for r in records]
    assert parts == ["env", "train", "train", "decode", "decode", "sampler", "sampler", "prefill"], parts
    env = records[0]
    assert env["torch"] and env["transformers"] and "c_compiler" in env and "python_headers" in env
    train = [r for r in records if r["part"] == "train"]
    assert {(r["loss_impl"], r["activation_checkpointing"], r["compiled"]) for r in train} == {
        ("reference", True, False),
        ("chunked", False, True),
    }
    assert all(r["tokens_per_s"] > 0 and 0 < r["final_loss"] < 20 for r in train)
    decode = [r for r in records if r["part"] == "decode"]
    # the llama3-rope model takes the fast decode path, quantized or not
    assert [(r["rows"], r["quant"], r["fast_path"]) for r in decode] == [(1, "none", True), (16, "int8", True)]
    assert all(r["decode_tokens_per_s"] > 0 for r in decode)


def test_a_failing_part_is_an_error_line_and_a_failed_run() -> None:
    """The other parts still run; nothing is swallowed (here every part fails: the interpreter is `false`)."""
    rc, records, _ = _run("false", timeout=60)
    assert rc == 1
    assert [r["part"] for r in records] == ["env", "train", "train", "decode", "decode", "serve-kernels"]
    assert all(r["error"].startswith("exit 1") for r in records)
