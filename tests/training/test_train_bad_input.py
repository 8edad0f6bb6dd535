"""Bad input fails fast with a clear message and a non-zero status, and never touches existing checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


@pytest.fixture
def output_with_checkpoint(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    for name, body in (("__0_0.distcp", b"weights"), (".metadata", b"meta"), ("COMPLETE", b'{"step": 5}')):
        (ckpt / name).write_bytes(body)
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/nope.txt"], "data path does not exist"),
        (["--data", "{tmp}/empty.txt"], "is empty"),
        (["--data", "{tmp}/bad.jsonl"], "not valid JSON"),
        (["--preset", "llama-70b", "--data", "{tmp}/empty.txt"], "unknown preset 'llama-70b'"),
        (["--data", "{tmp}/empty.txt", "--set", "optim.lr=fast"], "bad override optim.lr='fast'"),
        (["--data", "{tmp}/ok.txt", "--set", "checkpoint.resume=false"], "already has complete checkpoints"),
    ],
)
def test_bad_input_exits_2_and_keeps_checkpoints(
    args: list[str], message: str, output_with_checkpoint: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "ok.txt").write_text("the quick brown fox jumps over the lazy dog.\n\n" * 200)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    before = _snapshot(output_with_checkpoint)
    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--output", str(output_with_checkpoint), *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(output_with_checkpoint) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "optim.nosuch=1"], "has no field 'nosuch'"),
        (["--set", "nosection.x=1"], "no section 'nosection'"),
        (["--set", "optim.lr"], "expected section.field=value"),
        (["--set", "parallel.strategy=zero9"], "expected one of"),
        (["--set", "model.bf16=maybe"], "expected a boolean"),
        (["--max-steps", "0"], "max_steps must be >= 1"),
        (["--set", "data.seq_len=4"], "data.seq_len must be >= 8"),
        ([], "no training data: pass --data"),
        (["--preset", "llama-1b", "--data", "corpus.txt"], "needs a model: pass --model"),
    ],
)
def test_bad_config_is_rejected_before_training(
    args: list[str], message: str, output_with_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.__main__ import main

    before = _snapshot(output_with_checkpoint)
    assert main(["--output", str(output_with_checkpoint), *args]) == 2
    assert message in capsys.readouterr().err
    assert _snapshot(output_with_checkpoint) == before
