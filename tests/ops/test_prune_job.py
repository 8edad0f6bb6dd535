"""`ops.launch_training --job prune`: the Kubernetes Job (strict schema, one GPU of the training pool) and the SageMaker
training job (botocore's service model) run what `training.prune` parses, read the model from the models bucket and
write the pruned one there under the job's name; bad flags are exit 2 before anything is submitted."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import kubernetes_validate
import pytest
import yaml
from botocore.model import ListShape, MapShape, Shape, StructureShape
from botocore.stub import Stubber

from infra import outputs as out
from infra.identity import READ, TRAINING_ACCESS, WRITE
from ops import launch_training
from ops.stack_outputs import load_outputs, training_pool
from tests.helpers import REPO_ROOT, STACK_OUTPUTS_DEV
from training import prune
from training.debug_model import write_debug_model
from training.storage import S3Storage

K8S_VERSION = "1.33"
FIXTURE = ("--stack", "dev", "--outputs", str(STACK_OUTPUTS_DEV))


@pytest.fixture
def outputs() -> dict[str, Any]:
    return load_outputs("dev", str(STACK_OUTPUTS_DEV))


def launch(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = launch_training.main([*FIXTURE, "--job", "prune", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_eks_prune_is_a_valid_one_gpu_job_running_the_pruner(
    capsys: pytest.CaptureFixture[str], outputs: dict[str, Any]
) -> None:
    rc, stdout, err = launch(capsys, "--target", "eks", "--name", "smol-20l", "--model", "ft/smollm2",
                             "--data", "chat/train.jsonl", "--keep-layers", "20", "--mlp-keep-ratio", "0.75",
                             "--image-tag", "v1", "--dry-run")  # fmt: skip
    assert rc == 0, err
    (job,) = list(yaml.safe_load_all(stdout))
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["kind"] == "Job" and job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    # One index: ops.jobs (--follow, wait, logs) finds the pod by its completion-index label, as for training.
    assert job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    _, pool = training_pool(outputs)
    assert pod["nodeSelector"] == pool["labels"]
    assert {t["key"] for t in pod["tolerations"]} == {t["key"] for t in pool["taints"]}
    assert pod["serviceAccountName"] == outputs[out.TRAINING_SERVICE_ACCOUNT]
    (container,) = pod["containers"]
    # One of the node's four GPUs, and a quarter of the node's CPU and memory shares.
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert container["resources"]["requests"]["cpu"] == "10"  # g6e.12xlarge: 48 vCPUs * 0.85 / 4
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "training.prune"]
    args = prune.build_parser().parse_args(cmd[3:])
    models, datasets = outputs[out.MODELS_BUCKET], outputs[out.DATASETS_BUCKET]
    assert args.model == f"s3://{models}/ft/smollm2"
    assert args.calib == f"s3://{datasets}/chat/train.jsonl"
    assert args.out == f"s3://{models}/smol-20l"
    assert (args.keep_layers, args.mlp_keep_ratio, args.drop_layers) == (20, 0.75, None)


def test_sagemaker_prune_is_a_valid_training_job_whose_entry_is_the_pruner(
    capsys: pytest.CaptureFixture[str], outputs: dict[str, Any]
) -> None:
    rc, stdout, err = launch(capsys, "--target", "sagemaker", "--name", "smol-w", "--model", "s3://other/m",
                             "--data", "chat", "--intermediate-size", "1024", "--instance-type", "ml.g5.2xlarge",
                             "--image-tag", "v1", "--dry-run")  # fmt: skip
    assert rc == 0, err
    request = json.loads(stdout)
    # botocore validates every parameter against SageMaker's service model (names, types, required members);
    # the enums it leaves to the service are checked here.
    client = botocore.session.get_session().create_client("sagemaker", region_name="us-east-1")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:training-job/smol-w"
    with Stubber(client) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": arn}, expected_params=request)
        assert client.create_training_job(**request)["TrainingJobArn"] == arn
    shape = client.meta.service_model.operation_model("CreateTrainingJob").input_shape
    assert _enum_errors(request, shape) == []

    algo = request["AlgorithmSpecification"]
    assert algo["ContainerEntrypoint"] == ["python", "-m", "training.prune"]
    assert algo["TrainingImage"] == f"{outputs[out.TRAINING_REPOSITORY_URL]}:v1"
    args = prune.build_parser().parse_args(algo["ContainerArguments"])
    assert args.model == "s3://other/m" and args.intermediate_size == 1024
    assert args.out == f"s3://{outputs[out.MODELS_BUCKET]}/smol-w"
    assert request["RoleArn"] == outputs[out.SAGEMAKER_EXECUTION_ROLE_ARN]
    assert request["ResourceConfig"] == {**request["ResourceConfig"], "InstanceType": "ml.g5.2xlarge",
                                         "InstanceCount": 1}  # fmt: skip
    assert "InputDataConfig" not in request and "HyperParameters" not in request


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--drop-layers", "2", "--keep-layers", "2"], "--drop-layers and --keep-layers: pass one of them"),
        # The debug model's shape is known offline: 4 layers.
        (["--drop-layers", "4"], "--drop-layers 4: the model has 4 decoder layers"),
        (["--keep-layers", "4"], "--keep-layers 4: the model has 4 decoder layers"),
        (["--intermediate-size", "345"], "--intermediate-size 345: the model's intermediate_size is 344"),
        (["--mlp-keep-ratio", "1.5"], "--mlp-keep-ratio 1.5: must be in (0, 1]"),
        ([], "nothing to prune"),
    ],
)
def test_bad_flags_are_exit_2_naming_the_flag_before_anything_is_submitted(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a dry run: a kubectl on PATH records whether anything was applied.
    applied = tmp_path / "applied"
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(f"#!/bin/sh\ncat > {applied}\n")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{kubectl.parent}{os.pathsep}{os.environ['PATH']}")
    rc, stdout, err = launch(capsys, "--target", "eks", "--name", "p", "--model", "debug", "--data", "d",
                             "--image-tag", "v1", *flags)  # fmt: skip
    assert rc == 2 and message in err and "Traceback" not in err
    assert not applied.exists() and stdout == ""


def test_prune_without_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = launch(capsys, "--target", "eks", "--name", "p", "--data", "d", "--image-tag", "v1", "--keep-layers",
                        "2", "--dry-run")  # fmt: skip
    assert rc == 2 and "--job prune needs --model" in err


def test_real_launch_reads_the_models_config_and_refuses_too_many_layers(
    aws_env: str, capsys: pytest.CaptureFixture[str], outputs: dict[str, Any], tmp_path: Path
) -> None:
    """Without --dry-run the model's config.json is read from the models bucket: the layer count it gives is
    checked before CreateTrainingJob; a good request is then created (moto)."""
    s3 = boto3.client("s3", region_name="us-east-1")
    models = outputs[out.MODELS_BUCKET]
    s3.create_bucket(Bucket=models)
    S3Storage(f"s3://{models}/ft/tiny").upload_dir(write_debug_model(tmp_path / "tiny"), "")
    common = ["--target", "sagemaker", "--model", "ft/tiny", "--data", "chat", "--image-tag", "v1",
              "--instance-type", "ml.p3.2xlarge"]  # fmt: skip
    rc, _, err = launch(capsys, *common, "--name", "too-deep", "--drop-layers", "9")
    assert rc == 2 and "--drop-layers 9: the model has 4 decoder layers" in err
    sm = boto3.client("sagemaker", region_name="us-east-1")
    names = [j["TrainingJobName"] for j in sm.list_training_jobs()["TrainingJobSummaries"]]
    assert "too-deep" not in names
    rc, stdout, err = launch(capsys, *common, "--name", "tiny-3l", "--keep-layers", "3")
    assert rc == 0, err
    assert stdout.splitlines()[0].endswith(":training-job/tiny-3l")
    assert f"s3://{models}/tiny-3l" in stdout


def test_dry_run_needs_no_credentials() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    proc = subprocess.run(
        [sys.executable, "-m", "ops.launch_training", *FIXTURE, "--job", "prune", "--target", "sagemaker",
         "--name", "dry", "--model", "ft/model", "--data", "chat", "--drop-layers", "10", "--image-tag", "v1",
         "--dry-run"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["AlgorithmSpecification"]["ContainerEntrypoint"][-1] == "training.prune"


def test_training_identity_grants_exactly_what_pruning_uses(outputs: dict[str, Any]) -> None:
    """The job runs as the training identities (Pod Identity `trainer`, SageMaker execution role), whose S3 grants are
    infra/identity.py TRAINING_ACCESS: it reads the source model and the calibration data and writes the pruned
    model, all of which that table allows; nothing new is granted for it."""
    from ops.prune_job import PruneJobSpec, locations

    loc = locations(PruneJobSpec(name="p", model="ft/m", data="chat", prune_args=()), outputs)
    bucket_kind = {outputs[out.MODELS_BUCKET]: "models", outputs[out.DATASETS_BUCKET]: "datasets"}

    def kind(uri: str) -> str:
        return bucket_kind[uri.removeprefix("s3://").split("/", 1)[0]]

    assert set(READ) <= set(TRAINING_ACCESS[kind(loc["model"])])
    assert set(READ) <= set(TRAINING_ACCESS[kind(loc["calib"])])
    assert set(WRITE) <= set(TRAINING_ACCESS[kind(loc["out"])])
    assert kind(loc["out"]) == "models" and "s3:DeleteObject" not in TRAINING_ACCESS["models"]


def _enum_errors(value: object, shape: Shape, where: str = "") -> list[str]:
    """Members of `value` whose string is not one of its shape's enum values (recursively)."""
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        return [e for k, v in value.items() for e in _enum_errors(v, shape.members[k], f"{where}{k}.")]
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _enum_errors(v, shape.member, f"{where}{i}.")]
    if isinstance(shape, MapShape) and isinstance(value, dict):
        return [e for k, v in value.items() for e in _enum_errors(v, shape.value, f"{where}{k}.")]
    enum = getattr(shape, "enum", None)
    return [f"{where[:-1]}: {value!r}"] if enum and value not in enum else []
