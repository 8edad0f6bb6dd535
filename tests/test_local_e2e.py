"""The README's main job, end to end: preview, torchrun training on local S3, export, serve, openai chat."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_local_end_to_end_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tools.local_e2e", "--steps", "20", "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for marker in ("[1/6]", "policy: pass", "cost: idle $", "[3/6]", "step   20/20", "[5/6]", "answered (", "Done:"):
        assert marker in out, marker
    # Checkpoints and the exported model went through S3, and the server answered with tokens.
    assert "checkpoint_objects" in out and "exported" in out
    assert (tmp_path / "train.log").exists() and (tmp_path / "serve.log").exists()
    # Nothing it started is left running: the S3 and serving ports it printed no longer accept connections.
    ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", out)]
    assert len(set(ports)) >= 2
    for port in set(ports):
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
