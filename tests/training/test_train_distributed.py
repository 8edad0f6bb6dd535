"""2-rank gloo runs under torchrun: DDP and FSDP2 learn, and a SIGTERM'd run resumes on the same data order."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from train_helpers import Run, parse_records, run_training, train_cmd

from tests.helpers import REPO_ROOT

STEPS = 16
COMMON = ("--max-steps", str(STEPS), "--save-every", "4", "--set", "data.seq_len=32")


@pytest.fixture(scope="module")
def fsdp_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("fsdp")
    return run_training("--data", str(corpus), "--output", str(out), "--strategy", "fsdp", *COMMON)


def _assert_learns(run: Run) -> None:
    assert run.returncode == 0, run.stderr[-3000:]
    losses = run.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = losses[1], losses[STEPS]
    assert last < 0.6 * first, f"loss did not fall: {first} -> {last}"
    start = run.events("start")[0]
    assert start["world_size"] == 2


def test_fsdp2_two_ranks_loss_falls(fsdp_run: Run) -> None:
    _assert_learns(fsdp_run)
    assert fsdp_run.events("start")[0]["strategy"] == "fsdp"


def test_ddp_two_ranks_loss_falls_and_matches_fsdp(corpus: Path, tmp_path: Path, fsdp_run: Run) -> None:
    ddp = run_training("--data", str(corpus), "--output", str(tmp_path), "--strategy", "ddp", *COMMON)
    _assert_learns(ddp)
    # Same data, same seed, same global batch: the two strategies compute the same updates.
    for step, loss in fsdp_run.losses.items():
        assert ddp.losses[step] == pytest.approx(loss, rel=1e-3, abs=1e-3)


def test_sigterm_checkpoints_and_restart_resumes_same_data_order(corpus: Path, tmp_path: Path, fsdp_run: Run) -> None:
    args = ("--data", str(corpus), "--output", str(tmp_path), "--strategy", "fsdp", *COMMON)
    proc = subprocess.Popen(train_cmd(*args), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    seen = []
    for line in proc.stdout:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if seen[-1].get("step", 0) >= 6 and "loss" in seen[-1]:
                # What a spot interruption or `kubectl delete pod` does to PID 1 (torchrun).
                proc.send_signal(signal.SIGTERM)
                break
    seen += parse_records(proc.stdout.read())
    stderr = proc.stderr.read()
    # The documented status of a preempted run, from the process the kubelet signals, and no traceback.
    assert proc.wait(timeout=120) == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    preempted = [r for r in seen if r.get("event") == "preempted"]
    assert preempted, stderr[-3000:]
    stopped_at = preempted[0]["checkpoint_step"]
    assert 6 <= stopped_at < STEPS
    ckpt = tmp_path / "checkpoints" / f"step_{stopped_at:08d}"
    assert (ckpt / "COMPLETE").is_file()
    state = json.loads((ckpt / "train_state.json").read_text())
    # The full resolved config travels with the checkpoint, and so does the data position.
    assert state["config"]["parallel"]["strategy"] == "fsdp" and state["config"]["data"]["seq_len"] == 32
    assert state["step"] == stopped_at
    # The data position is the checkpoint's "loader" entry (a Stateful, in the DCP shards), readable offline.
    loader = {"loader": {"epoch": -1, "position": -1}}
    dcp.load(loader, checkpoint_id=str(ckpt))
    assert loader["loader"]["position"] > 0 and loader["loader"]["epoch"] >= 0
    assert not (tmp_path / "model").exists(), "an interrupted run must not export"

    resumed = run_training(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.events("resumed")[0]["step"] == stopped_at
    assert sorted(resumed.losses) == list(range(stopped_at + 1, STEPS + 1))
    # Identical data order and optimizer state: the tail matches the uninterrupted run step for step.
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(fsdp_run.losses[step], rel=1e-4, abs=1e-5), step
    # keep_last=2 for the debug preset: older complete checkpoints were rotated away.
    complete = sorted({*range(4, STEPS + 1, 4), stopped_at})
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == [f"step_{s:08d}" for s in complete[-2:]]
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_gradient_accumulation_fsdp_reduces_every_micro_batch_and_matches_ddp(corpus: Path, tmp_path: Path) -> None:
    """FSDP2 reduce-scatters after each micro-batch (its unsharded gradients never outlive one backward) while DDP
    all-reduces once per step; both must apply the same update."""
    accum = ("--max-steps", "6", "--set", "data.seq_len=32", "--set", "parallel.grad_accum_steps=2",
             "--set", "parallel.micro_batch_size=4", "--save-every", "0")  # fmt: skip
    fsdp = run_training("--data", str(corpus), "--output", str(tmp_path / "f"), "--strategy", "fsdp", *accum)
    ddp = run_training("--data", str(corpus), "--output", str(tmp_path / "d"), "--strategy", "ddp", *accum)
    for run in (fsdp, ddp):
        assert run.returncode == 0, run.stderr[-3000:]
        assert sorted(run.losses) == list(range(1, 7))
    for step, loss in fsdp.losses.items():
        assert ddp.losses[step] == pytest.approx(loss, rel=1e-3, abs=1e-3)
    assert fsdp.losses[6] < fsdp.losses[1]
