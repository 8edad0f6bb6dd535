"""`ops.launch_training --job prepare`: the Indexed Job (strict Kubernetes schema, CPU nodes, one index per worker)
and the SageMaker Processing request (botocore's service model), both running what `training.prepare` parses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import botocore.session
import kubernetes_validate
import pytest
import yaml
from botocore.model import ListShape, MapShape, Shape, StructureShape
from botocore.stub import Stubber

from facts.cluster import BATCH_POOL, BATCH_TAINT, POOL_LABEL, PREPARE_SERVICE_ACCOUNT
from facts.tags import STACK_TAG
from infra import outputs as out
from infra.config import load_stack
from ops.prepare_job import PrepareJobSpec, build_processing_job_request
from ops.stack_outputs import StackError, load_outputs
from tests.helpers import REPO_ROOT, STACK_OUTPUTS_DEV
from training import prepare

K8S_VERSION = "1.33"
COMMON = ("--job", "prepare", "--name", "c4-prep", "--data", "corpora/c4", "--model", "base/llama-3.2-1b",
          "--seq-len", "4096", "--workers", "3", "--image-tag", "v1", "--dry-run")  # fmt: skip


def launch(*args: str, outputs: Path = STACK_OUTPUTS_DEV) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.launch_training", "--stack", "dev", "--outputs", str(outputs), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_eks_prepare_is_a_valid_indexed_job_on_cpu_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = load_outputs("dev", str(STACK_OUTPUTS_DEV))
    proc = launch("--target", "eks", *COMMON)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3, "one index per worker, all running together"
    pod = spec["template"]["spec"]
    # The CPU batch pool (scales from zero), not the system pool nor a GPU pool: its label, and its taint tolerated.
    assert pod["nodeSelector"] == {POOL_LABEL: BATCH_POOL}
    assert pod["tolerations"] == [{**BATCH_TAINT, "operator": "Equal"}]
    # Its own identity: the data-preparation service account (datasets read, prepared/ write), not the trainer's.
    assert pod["serviceAccountName"] == outputs[out.PREPARE_SERVICE_ACCOUNT] == PREPARE_SERVICE_ACCOUNT
    assert pod["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] > 0
    (container,) = pod["containers"]
    assert container["image"] == f"{outputs[out.TRAINING_REPOSITORY_URL]}:v1", "the training image"
    assert not any("gpu" in k or "efa" in k for k in container["resources"]["requests"])

    # The other end of the contract: training.prepare parses the command, and the Job controller's index is the
    # worker index.
    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "training.prepare"]
    args = prepare.build_parser().parse_args(cmd[3:])
    assert args.data == f"s3://{outputs[out.DATASETS_BUCKET]}/corpora/c4"
    assert args.tokenizer == f"s3://{outputs[out.MODELS_BUCKET]}/base/llama-3.2-1b"
    assert args.out == f"s3://{outputs[out.DATASETS_BUCKET]}/prepared/c4-prep", "the one prefix its role may write"
    assert (args.seq_len, args.workers) == (4096, 3)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert prepare.worker_index(args) == 2
    assert f"--data s3://{outputs[out.DATASETS_BUCKET]}/prepared/c4-prep/manifest.json" not in proc.stdout
    assert "prepared data will be at" not in proc.stdout, "a dry run prints only the object"


def test_sagemaker_prepare_is_a_valid_processing_request_sharded_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = load_outputs("dev", str(STACK_OUTPUTS_DEV))
    proc = launch("--target", "sagemaker", *COMMON)
    assert proc.returncode == 0, proc.stderr
    request = json.loads(proc.stdout)

    # The request shape, checked by botocore against SageMaker's service model (the Stubber validates the
    # parameters of every call: names, types, required members, lengths), and the enums, which botocore leaves
    # to the service.
    client = botocore.session.get_session().create_client("sagemaker", region_name="us-east-1")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:processing-job/c4-prep"
    with Stubber(client) as stub:
        stub.add_response("create_processing_job", {"ProcessingJobArn": arn}, expected_params=request)
        assert client.create_processing_job(**request)["ProcessingJobArn"] == arn
    shape = client.meta.service_model.operation_model("CreateProcessingJob").input_shape
    assert _enum_errors(request, shape) == []
    bad = json.loads(proc.stdout)
    bad["ProcessingInputs"][0]["S3Input"]["S3DataDistributionType"] = "ByFile"
    assert _enum_errors(bad, shape) == ["ProcessingInputs.0.S3Input.S3DataDistributionType: 'ByFile'"]

    (data,) = request["ProcessingInputs"]
    assert data["S3Input"]["S3DataDistributionType"] == "ShardedByS3Key"
    assert request["ProcessingResources"]["ClusterConfig"]["InstanceCount"] == 3
    assert request["RoleArn"] == outputs[out.SAGEMAKER_PREPARE_ROLE_ARN], "the Processing role, not the trainer's"
    assert request["RoleArn"] != outputs[out.SAGEMAKER_EXECUTION_ROLE_ARN]
    assert request["AppSpecification"]["ImageUri"] == f"{outputs[out.TRAINING_REPOSITORY_URL]}:v1"
    # The stack tag is in the request: the team policy conditions CreateProcessingJob on it (infra/teams.py).
    assert {"Key": STACK_TAG, "Value": load_stack("dev").stack} in request["Tags"]

    # training.prepare parses the arguments; on instance algo-2 of 3 it is worker 1 and reads the local copy.
    app = request["AppSpecification"]
    args = prepare.build_parser().parse_args(app["ContainerArguments"])
    assert app["ContainerEntrypoint"] == ["python", "-m", "training.prepare"]
    assert args.local_input == data["S3Input"]["LocalPath"] and args.workers == 3
    config = tmp_path / "resourceconfig.json"
    config.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-3", "algo-1", "algo-2"]}))
    monkeypatch.setattr(prepare, "SAGEMAKER_RESOURCE_CONFIG", config)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert prepare.worker_index(args) == 1


def test_prepare_without_tokenizer_model_or_seq_len_is_a_usage_error() -> None:
    proc = launch("--target", "eks", "--job", "prepare", "--name", "p", "--data", "d", "--image-tag", "v1")
    assert proc.returncode == 2
    assert "--model" in proc.stderr and "--seq-len" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="DNS label"):
        PrepareJobSpec(name="Bad_Name", data="d", tokenizer="t", seq_len=64)
    # KMS on the instance volume when the stack has a key; in-transit encryption between several instances.
    request = build_processing_job_request(
        PrepareJobSpec(name="p", data="d", tokenizer="t", seq_len=64, workers=2),
        load_outputs("dev", str(STACK_OUTPUTS_DEV)),
    )
    assert request["NetworkConfig"] == {"EnableInterContainerTrafficEncryption": True}


def test_a_processing_request_without_the_stack_tag_is_refused_before_aws_would() -> None:
    """Team policies allow CreateProcessingJob only with this stack's tag in the request: outputs without it (a stack
    from before its tags were exported) stop with what to do, not with AccessDenied from SageMaker."""
    spec = PrepareJobSpec(name="p", data="d", tokenizer="t", seq_len=64)
    outputs = load_outputs("dev", str(STACK_OUTPUTS_DEV))
    assert {"Key": STACK_TAG, "Value": "dev"} in build_processing_job_request(spec, outputs)["Tags"]
    for tags in ({}, {k: v for k, v in outputs[out.TAGS].items() if k != STACK_TAG}):
        with pytest.raises(StackError, match=f"no '{STACK_TAG}' tag"):
            build_processing_job_request(spec, {**outputs, out.TAGS: tags})


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


def test_the_job_selects_and_tolerates_exactly_what_the_stack_exports_for_its_batch_pool() -> None:
    """Both ends of the contract: the outputs the launcher reads are what the program exports for the dev stack
    (infra.config.BatchPool.describe, from stacks/Pulumi.dev.yaml), so the pods fit the node group's label and
    taint, which the Cluster Autoscaler's node-template tags repeat (tests/infra/test_batch_pool.py)."""
    outputs = load_outputs("dev", str(STACK_OUTPUTS_DEV))
    assert outputs[out.BATCH_POOL] == load_stack("dev").cluster.batch_pool.describe()


@pytest.mark.parametrize(
    ("target", "missing"),
    [
        ("eks", out.BATCH_POOL),
        ("eks", out.PREPARE_SERVICE_ACCOUNT),
        ("sagemaker", out.SAGEMAKER_PREPARE_ROLE_ARN),
    ],
)
def test_outputs_from_before_the_preparation_identity_are_refused_with_what_to_do(
    tmp_path: Path, target: str, missing: str
) -> None:
    doc = json.loads(STACK_OUTPUTS_DEV.read_text())
    del doc["outputs"][missing]
    old = tmp_path / "outputs.json"
    old.write_text(json.dumps(doc))
    proc = launch("--target", target, *COMMON, outputs=old)
    assert proc.returncode == 2, proc.stderr
    assert repr(missing) in proc.stderr and "pulumi up" in proc.stderr and "predate" in proc.stderr
    assert "Traceback" not in proc.stderr
