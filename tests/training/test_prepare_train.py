"""The trainer on prepared data (`--data .../manifest.json`): the same losses as from the raw text, streamed from S3
through the rank's cache; a tokenizer or seq_len mismatch is an error before the first step; a 2-rank run resumes
on 1 rank and continues exactly as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from train_helpers import run_training

from training import prepare as prep
from training.debug_model import build_tokenizer
from training.storage import S3Storage

SEQ = ("--set", "data.seq_len=32")


@pytest.fixture(scope="module")
def prepared(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    assert prep.main(["--data", str(corpus), "--tokenizer", "debug", "--out", str(out), "--seq-len", "32"]) == 0
    return out / "manifest.json"


def test_losses_from_s3_shards_equal_losses_from_raw_text(
    aws_env: str, corpus: Path, prepared: Path, tmp_path: Path
) -> None:
    boto3.client("s3").create_bucket(Bucket="t-prepared")
    S3Storage("s3://t-prepared/c").upload_dir(prepared.parent, "")
    args = ("--max-steps", "6", "--save-every", "0", *SEQ)
    raw = run_training("--data", str(corpus), "--output", str(tmp_path / "raw"), *args, ranks=1)
    # A 1 MiB cache: far smaller than one block of rows, so the cache evicts while the run reads.
    shards = run_training("--data", "s3://t-prepared/c/manifest.json", "--output", str(tmp_path / "shards"), *args,
                          "--set", "data.cache_mb=1", ranks=1)  # fmt: skip
    assert raw.returncode == 0, raw.stderr[-3000:]
    assert shards.returncode == 0, shards.stderr[-3000:]
    assert sorted(shards.losses) == list(range(1, 7))
    assert shards.losses == raw.losses, "same seed, same sequences, same order: the same losses"
    assert shards.events("start")[0]["sequences"] == raw.events("start")[0]["sequences"]
    assert "prepared sequences" in shards.stderr


def test_tokenizer_or_seq_len_mismatch_is_an_error_before_the_first_step(corpus: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-tokenizer"
    build_tokenizer(vocab_size=400).save_pretrained(other)
    out = tmp_path / "prepared-other"
    assert prep.main(["--data", str(corpus), "--tokenizer", str(other), "--out", str(out), "--seq-len", "32"]) == 0

    run = run_training("--data", str(out / "manifest.json"), "--output", str(tmp_path / "run"), *SEQ, ranks=1)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "tokenizer mismatch" in run.stderr and str(other) in run.stderr
    assert "Traceback" not in run.stderr
    assert not run.records, "no step, no event"
    assert not (tmp_path / "run" / "checkpoints").exists()

    wrong_len = run_training("--data", str(out / "manifest.json"), "--output", str(tmp_path / "run2"), ranks=1)
    assert wrong_len.returncode == 2
    assert "prepared with seq_len 32" in wrong_len.stderr and "data.seq_len=32" in wrong_len.stderr


def test_two_rank_run_resumes_on_one_rank_as_if_never_stopped(prepared: Path, tmp_path: Path) -> None:
    """2 ranks x 4 sequences and 1 rank x 8 read the same global micro-batches (the loader's state is global), so
    the run stopped on 2 ranks at step 4 and resumed on 1 rank matches the uninterrupted 1-rank run."""
    # A constant learning rate: the stopped run's schedule ends at step 4, the others' at 8.
    constant_lr = ("--set", "optim.warmup_steps=0", "--set", "optim.min_lr_ratio=1")
    data = ("--data", str(prepared), *SEQ, *constant_lr, "--save-every", "4", "--strategy", "ddp")
    whole = run_training(*data, "--output", str(tmp_path / "whole"), "--max-steps", "8",
                         "--set", "parallel.micro_batch_size=8", ranks=1)  # fmt: skip
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = str(tmp_path / "elastic")
    first = run_training(*data, "--output", out, "--max-steps", "4", "--set", "parallel.micro_batch_size=4", ranks=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.events("start")[0]["world_size"] == 2
    second = run_training(*data, "--output", out, "--max-steps", "8", "--set", "parallel.micro_batch_size=8", ranks=1)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.events("resumed")[0]["step"] == 4
    assert second.events("start")[0]["world_size"] == 1

    elastic = {**first.losses, **second.losses}
    assert sorted(elastic) == list(range(1, 9))
    for step, loss in whole.losses.items():
        # The same sequences; only the reduction order differs (a mean over 2 ranks vs one batch).
        assert elastic[step] == pytest.approx(loss, rel=1e-4, abs=1e-4), step
