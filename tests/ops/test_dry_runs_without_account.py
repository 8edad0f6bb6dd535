"""Dry runs need no AWS account: run as a new user would, with no credentials anywhere, each `--dry-run` says what it
would do and exits 0; the real commands fail with one line (exit 2), never a botocore traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, STACK_OUTPUTS_DEV


@pytest.fixture
def no_credentials(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin",  # no `pulumi` CLI either
    )
    return env


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "debug-llama"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def artifacts(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.artifacts", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_upload_model_dry_run_takes_the_account_from_the_stack_outputs(
    no_credentials: dict[str, str], model_dir: Path
) -> None:
    args = ["upload-model", "--stack", "dev", "--model-dir", str(model_dir), "--name", "debug-llama", "--dry-run"]
    proc = artifacts(no_credentials, *args, "--outputs", str(STACK_OUTPUTS_DEV))
    assert proc.returncode == 0, proc.stderr
    assert "would upload" in proc.stdout and "s3://llmp-dev-models-123456789012-us-east-1/debug-llama/" in proc.stdout
    # Neither --account-id nor outputs: a placeholder, and a note saying how to get real names.
    proc = artifacts(no_credentials, *args)
    assert proc.returncode == 0, proc.stderr
    assert "s3://llmp-dev-models-<ACCOUNT_ID>-us-east-1/debug-llama/config.json" in proc.stdout
    assert "pass --account-id" in proc.stderr and "Traceback" not in proc.stderr
    proc = artifacts(no_credentials, *args, "--account-id", "210987654321")
    assert "llmp-dev-models-210987654321-us-east-1" in proc.stdout


def test_put_api_keys_has_a_dry_run_that_prints_no_key(no_credentials: dict[str, str], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("team-a s3cr3t-value rpm=60\nteam-b other-secret\n")
    proc = artifacts(no_credentials, "put-api-keys", "--stack", "dev", "--keys-file", str(keys), "--hash", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert (
        "would create or update secret llmp-dev/serving-api-keys in us-east-1 with sha256 digests of 2" in proc.stdout
    )
    assert "s3cr3t" not in proc.stdout + proc.stderr


def test_push_image_dry_run_needs_no_credentials(no_credentials: dict[str, str]) -> None:
    proc = artifacts(no_credentials, "push-image", "--stack", "dev", "--image", "serving", "--dry-run")
    # The worktree may be dirty while developing: then the tag is refused, with one line and exit 2.
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        push = next(line for line in proc.stdout.splitlines() if line.startswith("would run: docker push"))
        assert "<ACCOUNT_ID>.dkr.ecr.us-east-1.amazonaws.com/" in push
    else:
        assert "uncommitted changes" in proc.stderr


@pytest.mark.parametrize("command", ["upload-model", "put-api-keys"])
def test_real_commands_without_credentials_say_so_in_one_line(
    no_credentials: dict[str, str], model_dir: Path, command: str
) -> None:
    keys = model_dir / "keys"
    keys.write_text("a b\n")
    args = (
        ["--model-dir", str(model_dir), "--name", "m", "--account-id", "123456789012"]
        if command == "upload-model"
        else ["--keys-file", str(keys)]
    )
    proc = artifacts(no_credentials, command, "--stack", "dev", *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no AWS credentials") and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
