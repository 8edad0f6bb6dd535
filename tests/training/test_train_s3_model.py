"""A model on S3 with several ranks per node: one download per node, the others wait, and a crash mid-download
never leaves a directory that looks complete."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import boto3
import pytest
from train_helpers import TORCHRUN, parse_records

from tests.helpers import REPO_ROOT
from training.debug_model import write_debug_model
from training.storage import COMPLETE_MARKER, S3Storage, fetch_dir_atomic


def test_two_ranks_on_a_fresh_node_share_one_model_download(aws_env: str, corpus: Path, tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    for bucket in ("m2-datasets", "m2-ckpts", "m2-models"):
        s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(corpus), "m2-datasets", "c/corpus.txt")
    S3Storage("s3://m2-models/base/debug").upload_dir(write_debug_model(tmp_path / "base"), "")
    scratch = tmp_path / "scratch"  # a fresh node: nothing downloaded yet
    env = dict(os.environ, TRAINING_LOCAL_DIR=str(scratch))
    cmd = [*TORCHRUN, "-m", "training", "--model", "s3://m2-models/base/debug", "--preset", "debug",
           "--data", "s3://m2-datasets/c/", "--output", "s3://m2-ckpts/run", "--max-steps", "2",
           "--save-every", "0", "--set", "data.seq_len=32"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in parse_records(proc.stdout) if "loss" in r] == [1, 2]
    # Exactly one copy on the node, complete, and no partial download left behind.
    models = [p.parent for p in scratch.rglob("config.json") if "model" in p.parts]
    assert len(models) == 1 and (models[0] / COMPLETE_MARKER).is_file()
    assert not list(scratch.rglob(".*.partial-*"))


def test_a_crash_mid_download_leaves_no_complete_looking_directory(
    aws_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3.client("s3").create_bucket(Bucket="m2-crash")
    S3Storage("s3://m2-crash/m").upload_dir(write_debug_model(tmp_path / "base"), "")
    dest = tmp_path / "node" / "model"
    real = S3Storage.download_dir

    def dies_halfway(self: S3Storage, rel: str, local: Path) -> None:
        local.mkdir(parents=True)
        (local / "config.json").write_text("{}")  # the first file arrived, then the pod was killed
        raise ConnectionError("connection reset mid-download")

    monkeypatch.setattr(S3Storage, "download_dir", dies_halfway)
    with pytest.raises(ConnectionError):
        fetch_dir_atomic("s3://m2-crash/m", dest)
    assert not dest.exists(), "a partial download must never appear under the model's name"
    monkeypatch.setattr(S3Storage, "download_dir", real)
    assert fetch_dir_atomic("s3://m2-crash/m", dest) == dest
    assert (dest / "model.safetensors").is_file() and (dest / COMPLETE_MARKER).is_file()
    assert [p.name for p in dest.parent.iterdir()] == ["model"]
