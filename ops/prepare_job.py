"""Data preparation (`python -m training.prepare`) as a job on an existing engine: a Kubernetes Indexed Job or a
SageMaker Processing job, running the training image with the stack's data-preparation identity.

Kubernetes: one pod per worker (`completions = parallelism = workers`, completion mode Indexed). Each pod reads its
worker index from JOB_COMPLETION_INDEX (set by the Job controller, Kubernetes docs "Indexed Job"), tokenizes input
files i with i % workers == index, waits for the others through the output prefix, then packs its shards; pod 0
writes the manifest. Pods run on the stack's CPU batch pool (infra/cluster.py; exported as `batch_pool`): they
select its label and tolerate its taint, and the Cluster Autoscaler starts its nodes from zero for them (the ASG's
node-template tags, infra/cluster_autoscaler.py) and removes them once the Job is done. A failed pod is replaced and
the rerun skips whatever it had completed.

SageMaker: a Processing job whose input channel is `ShardedByS3Key`: each instance is given a disjoint subset of the
input objects (by key) in /opt/ml/processing/input/data and tokenizes exactly those; its worker index is its
position in /opt/ml/config/resourceconfig.json's host list (SageMaker Developer Guide, "How Amazon SageMaker
Processing Configures Your Processing Container").

Both write to `s3://<datasets bucket>/prepared/<name>/` (facts.cluster.PREPARED_PREFIX) as the data-preparation
identity, not the trainer's: on EKS the `data-prepare` service account (its Pod Identity role), on SageMaker the
Processing execution role. Both may read the datasets and the models' tokenizer files and write only under
`prepared/` of the datasets bucket (infra/identity.py PREPARE_ACCESS, PREPARE_WRITES): a preparation can neither
overwrite a model nor touch a checkpoint. Stack outputs from before these existed are refused with what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import yaml

from facts.cluster import PREPARED_PREFIX
from facts.tags import STACK_TAG
from infra import outputs as out
from ops.stack_outputs import StackError, require

CONTAINER = "prepare"
SAGEMAKER_INPUT = "/opt/ml/processing/input/data"


@dataclass
class PrepareJobSpec:
    name: str
    """Job name: a DNS label; also the prepared dataset's prefix (`prepared/<name>/`)."""
    data: str
    """s3:// URI, or a key in the stack's datasets bucket."""
    tokenizer: str
    """The model whose tokenizer to use: s3:// URI or a key in the stack's models bucket ("debug": the debug model)."""
    seq_len: int
    image_tag: str = "latest"
    workers: int = 4
    shard_mb: int = 64
    text_field: str = "text"
    max_bad_fraction: float = 0.0
    cpu: str = "1"
    """EKS: CPU per worker pod. A worker tokenizes on one core (training.prepare sets TOKENIZERS_PARALLELISM=false):
    scale with workers, not with cores per pod."""
    memory: str = "4Gi"
    scratch_gib: int = 50
    """EKS: node-local scratch per pod (one input file's tokens and one shard are staged there)."""
    instance_type: str = "ml.m5.xlarge"
    """SageMaker: one worker per instance."""
    volume_gb: int = 100
    max_runtime_s: int = 24 * 3600
    backoff_limit: int = 3

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", self.name):
            raise ValueError(f"job name {self.name!r} must be a DNS label of at most 52 characters")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.seq_len < 8:
            raise ValueError("--seq-len must be >= 8")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError("--max-bad-fraction must be in [0, 1]")


def locations(spec: PrepareJobSpec, outputs: dict[str, Any]) -> dict[str, str]:
    """Where the job reads and writes, inside the stack's buckets."""
    data = spec.data if spec.data.startswith("s3://") else f"s3://{require(outputs, out.DATASETS_BUCKET)}/{spec.data}"
    tokenizer = spec.tokenizer
    if not tokenizer.startswith("s3://") and tokenizer != "debug":
        tokenizer = f"s3://{require(outputs, out.MODELS_BUCKET)}/{tokenizer.lstrip('/')}"
    # The datasets bucket: the only place the preparation identity may write (and the trainer already reads).
    prepared = f"s3://{require(outputs, out.DATASETS_BUCKET)}/{PREPARED_PREFIX}/{spec.name}"
    return {"data": data.rstrip("/"), "tokenizer": tokenizer, "out": prepared, "manifest": f"{prepared}/manifest.json"}


PREDATES = (
    "the stack's outputs predate data preparation's own identity and CPU pool: run `pulumi up` on the stack (its AWS "
    "layer creates the roles, the Pod Identity association and the batch node group; its -cluster stack, the service "
    "account), then read its outputs again"
)


def prepare_output(outputs: dict[str, Any], key: str) -> Any:
    """A stack output only stacks with the data-preparation identity and batch pool have."""
    try:
        return require(outputs, key)
    except StackError:
        raise StackError(f"stack output {key!r} is missing: {PREDATES}") from None


def prepare_args(spec: PrepareJobSpec, loc: dict[str, str]) -> list[str]:
    return [
        *("--data", loc["data"], "--tokenizer", loc["tokenizer"], "--out", loc["out"]),
        *("--seq-len", str(spec.seq_len), "--shard-mb", str(spec.shard_mb), "--workers", str(spec.workers)),
        *("--text-field", spec.text_field, "--max-bad-fraction", f"{spec.max_bad_fraction:g}"),
    ]


def render_prepare_job(spec: PrepareJobSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    """The Indexed Job to apply."""
    loc = locations(spec, outputs)
    pool = prepare_output(outputs, out.BATCH_POOL)
    service_account = prepare_output(outputs, out.PREPARE_SERVICE_ACCOUNT)
    labels = {"app.kubernetes.io/name": "llm-data-prepare", "app.kubernetes.io/instance": spec.name}
    container = {
        "name": CONTAINER,
        "image": f"{require(outputs, out.TRAINING_REPOSITORY_URL)}:{spec.image_tag}",
        "imagePullPolicy": "IfNotPresent",
        # The worker index comes from JOB_COMPLETION_INDEX, which the Job controller sets in every pod.
        "command": ["python", "-m", "training.prepare", *prepare_args(spec, loc)],
        "env": [
            {"name": "AWS_REGION", "value": str(require(outputs, out.REGION))},
            # The root filesystem is read-only: staging, the tokenizer download and any cache go to scratch.
            {"name": "TMPDIR", "value": "/scratch"},
            {"name": "HOME", "value": "/scratch"},
            {"name": "HF_HOME", "value": "/scratch/hf"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        # Guaranteed-size memory: a worker holds one chunk of documents and one shard, whatever the corpus.
        "resources": {
            "requests": {"cpu": spec.cpu, "memory": spec.memory, "ephemeral-storage": f"{spec.scratch_gib}Gi"},
            "limits": {"memory": spec.memory, "ephemeral-storage": f"{spec.scratch_gib}Gi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": require(outputs, out.TRAINING_NAMESPACE), "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.workers,
            # All at once: the workers meet between the two phases, so none may wait for a slot.
            "parallelism": spec.workers,
            # An index failing past its retries fails the Job at once (maxFailedIndexes 0), which stops the other
            # pods: they would otherwise wait for its parts until their timeout.
            "backoffLimitPerIndex": spec.backoff_limit,
            "maxFailedIndexes": 0,
            "activeDeadlineSeconds": spec.max_runtime_s,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
            },
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": service_account,
                    "restartPolicy": "Never",
                    # The batch pool, and only it: its label to land there, its taint tolerated to be allowed there.
                    "nodeSelector": dict(pool["labels"]),
                    "tolerations": [
                        {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
                        for t in pool["taints"]
                    ],
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                    "containers": [container],
                    "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": f"{spec.scratch_gib}Gi"}}],
                },
            },
        },
    }


def request_tags(outputs: dict[str, Any]) -> list[dict[str, str]]:
    """The stack's tags on the create request. A team may create a Processing job only with this stack's
    STACK_TAG in the request (infra/teams.py, CreateProcessingJobsOfThisStack: aws:RequestTag): without it the call
    would fail as a bare AccessDenied, so say so first."""
    tags = outputs.get(out.TAGS) or {}
    if not tags.get(STACK_TAG):
        raise StackError(
            f"stack output {out.TAGS!r} has no {STACK_TAG!r} tag: team policies create SageMaker jobs only with this "
            "stack's tag in the request; run `pulumi up` for this stack, then read its outputs again"
        )
    return [{"Key": k, "Value": str(v)} for k, v in sorted(tags.items())]


def build_processing_job_request(spec: PrepareJobSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    """The `create_processing_job` request, as a plain dict (printed by --dry-run, validated by tests)."""
    loc = locations(spec, outputs)
    args = [*prepare_args(spec, loc), "--local-input", SAGEMAKER_INPUT]
    request: dict[str, Any] = {
        "ProcessingJobName": spec.name,
        "RoleArn": prepare_output(outputs, out.SAGEMAKER_PREPARE_ROLE_ARN),
        "AppSpecification": {
            "ImageUri": f"{require(outputs, out.TRAINING_REPOSITORY_URL)}:{spec.image_tag}",
            "ContainerEntrypoint": ["python", "-m", "training.prepare"],
            "ContainerArguments": args,
        },
        "ProcessingInputs": [
            {
                "InputName": "data",
                "S3Input": {
                    "S3Uri": loc["data"],
                    "LocalPath": SAGEMAKER_INPUT,
                    "S3DataType": "S3Prefix",
                    "S3InputMode": "File",
                    # Each instance gets a disjoint subset of the objects: the split by input file, done by SageMaker.
                    "S3DataDistributionType": "ShardedByS3Key",
                },
            }
        ],
        "ProcessingResources": {
            "ClusterConfig": {
                "InstanceCount": spec.workers,
                "InstanceType": spec.instance_type,
                "VolumeSizeInGB": spec.volume_gb,
            }
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_runtime_s},
        "Environment": {"PYTHONUNBUFFERED": "1"},
        "Tags": request_tags(outputs),
    }
    kms = outputs.get(out.KMS_KEY_ARN)
    if kms:
        request["ProcessingResources"]["ClusterConfig"]["VolumeKmsKeyId"] = kms
    if spec.workers > 1:
        request["NetworkConfig"] = {"EnableInterContainerTrafficEncryption": True}
    return request


def submit_processing_job(request: dict[str, Any], region: str | None) -> str:
    import boto3

    return boto3.client("sagemaker", region_name=region).create_processing_job(**request)["ProcessingJobArn"]


# -- `python -m ops.launch_training --job prepare` -------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The launcher's flags for `--job prepare` (the tokenizer is --model's; --data, --name, --image-tag shared)."""
    g = p.add_argument_group("--job prepare (python -m training.prepare as a job)")
    g.add_argument("--seq-len", type=int, help="prepare: tokens per sequence (the runs' data.seq_len)")
    g.add_argument("--workers", type=int, default=4, help="prepare: worker pods (eks) or instances (sagemaker)")
    g.add_argument("--shard-mb", type=int, default=64, help="prepare: target shard size in MiB")
    g.add_argument("--max-bad-fraction", type=float, default=0.0, help="prepare: fail past this share of bad records")
    g.add_argument("--cpu-instance-type", default="ml.m5.xlarge", help="prepare on sagemaker: instance type")


def launch_prepare(args: argparse.Namespace, outputs: dict[str, Any]) -> int:
    if not args.model or args.seq_len is None:
        raise ValueError("--job prepare needs --model (whose tokenizer to use) and --seq-len")
    spec = PrepareJobSpec(
        name=args.name,
        data=args.data,
        tokenizer=args.model,
        seq_len=args.seq_len,
        image_tag=args.image_tag,
        workers=args.workers,
        shard_mb=args.shard_mb,
        max_bad_fraction=args.max_bad_fraction,
        instance_type=args.cpu_instance_type,
    )
    manifest = locations(spec, outputs)["manifest"]
    if args.target == "sagemaker":
        request = build_processing_job_request(spec, outputs)
        if args.dry_run:
            print(json.dumps(request, indent=2))
            return 0
        print(submit_processing_job(request, region=outputs.get(out.REGION)))
    else:
        job = yaml.safe_dump(render_prepare_job(spec, outputs), sort_keys=False)
        if args.dry_run:
            print(job, end="")
            return 0
        rc = _kubectl_apply(job, outputs)
        if rc:
            return rc
    print(f"prepared data will be at {manifest}: train with --data {manifest} --set data.seq_len={spec.seq_len}")
    return 0


def _kubectl_apply(manifest: str, outputs: dict[str, Any]) -> int:
    cmd = ["kubectl", "apply", "-f", "-"]
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = outputs.get(out.KUBECONFIG)
        if kubeconfig:
            path = os.path.join(tmp, "kubeconfig")
            with open(path, "w", encoding="utf-8") as f:
                f.write(kubeconfig if isinstance(kubeconfig, str) else json.dumps(kubeconfig))
            cmd += ["--kubeconfig", path]
        return subprocess.run(cmd, input=manifest, text=True, check=False).returncode
