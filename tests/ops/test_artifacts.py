"""The commands of docs/first-deploy.md that make a stack's artifacts: the image tag from git, the push (dry run),
the model upload and the API-keys secret (against moto), and that what they write is what the preview-time checks
look for (the program then declares serving)."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

from facts import pulumi_types as tok
from infra.config import load_stack, load_stack_file
from infra.preflight import api_keys_secret_name, models_bucket_name, serving_repository_name
from ops import artifacts
from ops.mocks import Account
from ops.preview import preview
from tests.helpers import DOCS_DIR, REPO_ROOT

ACCOUNT = "123456789012"


def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    (repo / "f").write_text("1")
    subprocess.run(["git", "add", "f"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "one"], cwd=repo, check=True)
    return repo


def test_image_tag_names_the_commit_and_refuses_a_dirty_tree(tmp_path: Path) -> None:
    repo = git_repo(tmp_path)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    tag = artifacts.image_tag(repo)
    assert tag == f"git-{sha[:12]}"
    assert load_stack("dev", servingImageTag=tag).serving.image_tag == tag  # a valid, immutable tag for the config
    (repo / "f").write_text("2")
    with pytest.raises(artifacts.ArtifactError, match="uncommitted changes"):
        artifacts.image_tag(repo)


def test_push_image_dry_run_prints_the_login_build_and_push(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "image_tag", lambda: "git-0123456789ab")
    out = io.StringIO()
    argv = ["push-image", "--stack", "dev", "--image", "serving", "--account-id", ACCOUNT, "--dry-run"]
    assert artifacts.main(argv, out=out) == 0
    text = out.getvalue()
    ref = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/{serving_repository_name(load_stack('dev'))}:git-0123456789ab"
    assert f"would run: docker build --platform linux/amd64 -f containers/serving.Dockerfile -t {ref} ." in text
    assert f"would run: docker push {ref}" in text
    assert "aws ecr get-login-password --region us-east-1 | docker login" in text
    assert "then set llm-platform:servingImageTag: git-0123456789ab in stacks/Pulumi.dev.yaml" in text
    for dockerfile in artifacts.IMAGES.values():
        assert (REPO_ROOT / dockerfile).is_file()


def test_make_targets_run_these_commands() -> None:
    for target, expected in (
        (["push-image", "STACK=prod", "IMAGE=training"], "-m ops.artifacts push-image --stack prod --image training"),
        (
            ["upload-model", "STACK=dev", "MODEL_DIR=out/m", "MODEL=debug-llama"],
            "-m ops.artifacts upload-model --stack dev --model-dir out/m --name debug-llama",
        ),
    ):
        # `make -n` prints the recipe without running it (or the setup prerequisite).
        proc = subprocess.run(["make", "-n", *target], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        assert expected in proc.stdout


def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    return d


def test_upload_model_then_put_api_keys_make_the_dev_preview_declare_serving(tmp_path: Path) -> None:
    cfg = load_stack("dev")
    bucket = models_bucket_name(cfg, ACCOUNT)
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nteam-a sk-team-a-0123456789 rpm=60\n")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        out = io.StringIO()
        argv = ["upload-model", "--stack", "dev", "--model-dir", str(model_dir(tmp_path)), "--name", "debug-llama"]
        assert artifacts.main([*argv, "--account-id", ACCOUNT, "--dry-run"], out=out) == 0
        assert "KeyCount" not in s3.list_objects_v2(Bucket=bucket) or s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
        assert artifacts.main([*argv, "--account-id", ACCOUNT], out=out) == 0
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
        assert keys == {
            "debug-llama/config.json",
            "debug-llama/model.safetensors",
            "debug-llama/tokenizer/tokenizer.json",
        }
        assert "then set llm-platform:servingModelPrefix: debug-llama" in out.getvalue()

        argv = ["put-api-keys", "--stack", "dev", "--keys-file", str(keys_file), "--account-id", ACCOUNT]
        assert artifacts.main(argv, out=out) == 0
        assert artifacts.main([*argv, "--hash"], out=out) == 0  # a second run adds a version
        sm = boto3.client("secretsmanager", region_name="us-east-1")
        stored = sm.get_secret_value(SecretId=api_keys_secret_name(cfg))["SecretString"]
        assert re.fullmatch(r"team-a sha256:[0-9a-f]{64} rpm=60\n", stored)
        assert "created secret llmp-dev/serving-api-keys" in out.getvalue() and "updated secret" in out.getvalue()

    # What the commands wrote is what the program's preview-time checks look for.
    account = Account(
        images={(serving_repository_name(cfg), "git-0123456789ab")},
        objects={(bucket, k) for k in keys},
        secrets={api_keys_secret_name(cfg): stored},
    )
    values, _ = load_stack_file("dev")
    values["llm-platform:servingImageTag"] = "git-0123456789ab"
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump({"config": values}))
    _, run = preview("dev", path, account)
    assert run.one(tok.K8S_DEPLOYMENT, "serving-eks-deployment")


def test_upload_model_refuses_a_directory_without_a_model(tmp_path: Path) -> None:
    err = io.StringIO()
    argv = ["upload-model", "--stack", "dev", "--model-dir", str(tmp_path), "--name", "x", "--account-id", ACCOUNT]
    assert artifacts.main([*argv, "--dry-run"], err=err) == 2  # usage: not a model directory
    assert "is not a model directory (no config.json" in err.getvalue()


def test_put_api_keys_refuses_a_malformed_keys_file(tmp_path: Path) -> None:
    bad = tmp_path / "keys"
    bad.write_text("just-one-field\n")
    with pytest.raises(artifacts.ArtifactError, match="line 1: expected '<key-id> <key>"):
        artifacts.keys_file_text(bad, hash_keys=False)


RUNBOOK = DOCS_DIR / "first-deploy.md"


def _runbook_commands() -> list[str]:
    """The commands of docs/first-deploy.md that this repository owns (make targets, python -m ops.*)."""
    commands = []
    for line in RUNBOOK.read_text().splitlines():
        line = line.strip().split("  #", 1)[0].strip()
        if line.startswith(("make ", "python -m ops.")):
            commands.append(line)
    return commands


def test_every_owned_runbook_command_exists_and_its_dry_run_works(monkeypatch: pytest.MonkeyPatch) -> None:
    from ops import account
    from ops import preview as preview_cli

    monkeypatch.setattr(artifacts, "image_tag", lambda: "git-0123456789ab")
    commands = _runbook_commands()
    assert any(c.startswith("make push-image") for c in commands)
    assert any(c.startswith("make upload-model") for c in commands)
    assert any("put-api-keys" in c for c in commands) and any("activate-cost-allocation-tags" in c for c in commands)
    mains = {"ops.artifacts": artifacts.main, "ops.account": account.main, "ops.preview": preview_cli.main}
    for command in commands:
        argv = command.split()
        if argv[0] == "make":
            proc = subprocess.run(["make", "-n", *argv[1:]], cwd=REPO_ROOT, capture_output=True, text=True)
            assert proc.returncode == 0, (command, proc.stderr)
            continue
        module, args = argv[2], argv[3:]
        if module == "ops.teardown":  # destroys for real: check the documented arguments parse
            from ops import teardown

            assert teardown.parser().parse_args(args).stack == args[0]
            continue
        if "|" in args:
            args = args[: args.index("|")]
        if module == "ops.artifacts" and args[0] != "put-api-keys":
            args = [a for a in args if a not in ("--dry-run",)]
            args = [*args, "--dry-run", "--account-id", ACCOUNT] if args[0] == "push-image" else args
        if module == "ops.artifacts" and args[0] == "upload-model":
            continue  # needs a model directory: exercised with moto above
        if module == "ops.artifacts" and args[0] == "put-api-keys":
            with pytest.raises(SystemExit) as exc:  # the documented flags parse
                artifacts.main([*args, "--help"], out=io.StringIO())
            assert exc.value.code == 0
            assert "--dry-run" in args or any("put-api-keys" in c and "--dry-run" in c for c in commands)
            continue
        if module == "ops.account" and "--dry-run" not in args:
            args = [*args, "--dry-run"]  # the real call needs the payer account
        assert mains[module](args, **({} if module == "ops.preview" else {"out": io.StringIO()})) == 0, command
