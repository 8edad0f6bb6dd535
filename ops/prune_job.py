"""Pruning (`python -m training.prune`) as a job: a Kubernetes Job on the EKS training pool, or a SageMaker training
job whose container runs the pruner instead of the trainer.

    python -m ops.launch_training --stack dev --target eks --job prune --name smol-20l --model ft/smollm2 \\
        --data chat/train.jsonl --keep-layers 20 --image-tag 2026-12-07 --dry-run
    python -m ops.launch_training --stack dev --target sagemaker --job prune --name smol-w75 --model ft/smollm2 \\
        --data chat/train.jsonl --mlp-keep-ratio 0.75 --instance-type ml.g5.2xlarge --image-tag 2026-12-07

The source model comes from the stack's models bucket (`--model KEY` or an s3:// URI), the calibration data from its
datasets bucket (`--data`), and the pruned model goes to `s3://<models bucket>/<name>/`, the key a training run of
that name would export to, where `--model <name>` (a distillation job) and the serving path read it.

One process on one node: the pruner is not distributed (one forward pass per calibration window, on one GPU when
the node has one: training/prune.py). EKS: a plain Job (one completion), one GPU of the training pool and that
GPU's share of the node's CPU and memory, the pool's taints tolerated and its labels selected. SageMaker:
CreateTrainingJob with `AlgorithmSpecification.ContainerEntrypoint` (the training image's `train` entry point
replaced by `python -m training.prune`) and no input channel: the pruner reads S3 itself, as on EKS.

Identity: the existing training identities (the EKS `trainer` service account's Pod Identity role and the SageMaker
execution role) carry `TRAINING_ACCESS` of infra/identity.py: datasets read, models read and write. That is exactly
what pruning does (read the calibration data and the source model, write the pruned model), so the job needs no new
grant (tests/ops/test_prune_job.py checks the job's locations against that table).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from facts.instance_types import GPU_INSTANCE_TYPES
from infra import outputs as out
from ops.stack_outputs import require, training_pool
from ops.training_k8s_job import CPU_SHARE, MEMORY_SHARE, scratch_gib, smallest_type

CONTAINER = "prune"
MODULE = "training.prune"


@dataclass
class PruneJobSpec:
    name: str
    """Job name: a DNS label (SageMaker: the training job's name); also the pruned model's key in the models bucket."""
    model: str
    """s3:// URI or a key in the stack's models bucket."""
    data: str
    """Calibration data: s3:// URI or a key in the stack's datasets bucket."""
    prune_args: tuple[str, ...]
    """The pruner's own flags (--drop-layers, --keep-layers, --intermediate-size, --mlp-keep-ratio, --seq-len)."""
    image_tag: str = "latest"
    instance_type: str = "ml.g5.2xlarge"
    """SageMaker: one instance (the launcher's --instance-type)."""
    volume_gb: int = 200
    max_runtime_s: int = 6 * 3600
    backoff_limit: int = 2

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", self.name):
            raise ValueError(f"--name {self.name!r} must be a DNS label of at most 52 characters")


def locations(spec: PruneJobSpec, outputs: dict[str, Any]) -> dict[str, str]:
    """Where the job reads (source model, calibration data) and writes (the pruned model), in the stack's buckets."""
    models = require(outputs, out.MODELS_BUCKET)

    def under(bucket: str, key: str) -> str:
        return key if key.startswith("s3://") or key == "debug" else f"s3://{bucket}/{key.strip('/')}"

    return {
        "model": under(models, spec.model),
        "calib": under(require(outputs, out.DATASETS_BUCKET), spec.data),
        "out": f"s3://{models}/{spec.name}",
    }


def prune_argv(spec: PruneJobSpec, loc: dict[str, str]) -> list[str]:
    """`python -m training.prune` flags."""
    return ["--model", loc["model"], "--out", loc["out"], "--calib", loc["calib"], *spec.prune_args]


def render_prune_job(spec: PruneJobSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    """The Job to apply: one pod on the training pool, one GPU when the pool has them."""
    pool_name, pool = training_pool(outputs)
    loc = locations(spec, outputs)
    gpus = int(pool.get("gpus_per_node", 0))
    node = GPU_INSTANCE_TYPES[smallest_type(pool)]
    share = max(gpus, 1)  # one GPU's share of the node: the other GPUs stay free for a training job
    limits = {"nvidia.com/gpu": "1"} if gpus else {}
    scratch = f"{scratch_gib(pool)}Gi"
    requests = {
        **limits,
        "cpu": str(max(1, int(node.vcpus * CPU_SHARE / share))),
        "memory": f"{max(1, int(node.memory_gib * MEMORY_SHARE / share))}Gi",
        "ephemeral-storage": scratch,
    }
    labels = {"app.kubernetes.io/name": "llm-prune", "app.kubernetes.io/instance": spec.name}
    tolerations = [
        {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
        if t.get("value") not in (None, "")
        else {"key": t["key"], "operator": "Exists", "effect": t["effect"]}
        for t in pool.get("taints", [])
    ]
    container = {
        "name": CONTAINER,
        "image": f"{require(outputs, out.TRAINING_REPOSITORY_URL)}:{spec.image_tag}",
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", MODULE, *prune_argv(spec, loc)],
        "env": [
            {"name": "AWS_REGION", "value": str(require(outputs, out.REGION))},
            # The root filesystem is read-only: the model download, staging and any cache go to scratch.
            {"name": "TMPDIR", "value": "/scratch"},
            {"name": "HOME", "value": "/scratch"},
            {"name": "HF_HOME", "value": "/scratch/hf"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": {"limits": limits, "requests": requests},
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
        "metadata": {
            "name": spec.name,
            "namespace": require(outputs, out.TRAINING_NAMESPACE),
            "labels": {**labels, "llm-platform/pool": pool_name},
        },
        "spec": {
            # Indexed with one index: its pod carries the completion-index label that `ops.jobs` (`--follow`,
            # `python -m ops.jobs wait|logs`) selects a job's pod 0 by, as for training jobs.
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": spec.backoff_limit,
            "activeDeadlineSeconds": spec.max_runtime_s,
            # A rerun starts from scratch and publishes the whole directory again: a replacement needs no state.
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
            },
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": require(outputs, out.TRAINING_SERVICE_ACCOUNT),
                    "restartPolicy": "Never",
                    "nodeSelector": dict(pool.get("labels", {})),
                    "tolerations": tolerations,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                    "containers": [container],
                    "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": scratch}}],
                },
            },
        },
    }


def build_prune_training_job_request(spec: PruneJobSpec, outputs: dict[str, Any]) -> dict[str, Any]:
    """The `create_training_job` request (printed by --dry-run, validated against botocore's model by tests)."""
    loc = locations(spec, outputs)
    request: dict[str, Any] = {
        "TrainingJobName": spec.name,
        "RoleArn": require(outputs, out.SAGEMAKER_EXECUTION_ROLE_ARN),
        "AlgorithmSpecification": {
            "TrainingImage": f"{require(outputs, out.TRAINING_REPOSITORY_URL)}:{spec.image_tag}",
            "TrainingInputMode": "File",
            # Replaces the image's `train` entry point (SageMaker API reference, AlgorithmSpecification:
            # ContainerEntrypoint / ContainerArguments, botocore's sagemaker service model).
            "ContainerEntrypoint": ["python", "-m", MODULE],
            "ContainerArguments": prune_argv(spec, loc),
        },
        # Required by the API; the pruner publishes to the models bucket itself and leaves /opt/ml/model empty.
        "OutputDataConfig": {"S3OutputPath": f"s3://{require(outputs, out.MODELS_BUCKET)}/sagemaker-output/"},
        "ResourceConfig": {"InstanceType": spec.instance_type, "InstanceCount": 1, "VolumeSizeInGB": spec.volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_runtime_s},
        "Environment": {"PYTHONUNBUFFERED": "1"},
        "Tags": [{"Key": k, "Value": str(v)} for k, v in sorted((outputs.get(out.TAGS) or {}).items())],
    }
    kms = outputs.get(out.KMS_KEY_ARN)
    if kms:
        request["OutputDataConfig"]["KmsKeyId"] = kms
        request["ResourceConfig"]["VolumeKmsKeyId"] = kms
    return request


# -- `python -m ops.launch_training --job prune` ---------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The launcher's flags for `--job prune` (--model, --data, --name, --image-tag, --instance-type shared)."""
    g = p.add_argument_group("--job prune (python -m training.prune as a job)")
    g.add_argument("--drop-layers", type=int, help="prune: remove this many decoder layers (Block Influence)")
    g.add_argument("--keep-layers", type=int, help="prune: keep this many decoder layers")
    g.add_argument("--intermediate-size", type=int, help="prune: MLP neurons each layer keeps (width)")
    g.add_argument("--mlp-keep-ratio", type=float, help="prune: share of MLP neurons each layer keeps (width)")
    g.add_argument("--calib-windows", type=int, help="prune: calibration windows scored (training.prune default 32)")


def spec_from_args(args: argparse.Namespace) -> PruneJobSpec:
    if not args.model:
        raise ValueError("--job prune needs --model (the model to prune: a key in the models bucket or s3:// URI)")
    flags: list[str] = []
    for flag, value in (
        ("--drop-layers", args.drop_layers),
        ("--keep-layers", args.keep_layers),
        ("--intermediate-size", args.intermediate_size),
        ("--mlp-keep-ratio", args.mlp_keep_ratio),
        ("--calib-windows", args.calib_windows),
        ("--seq-len", args.seq_len),
    ):
        if value is not None:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return PruneJobSpec(
        name=args.name,
        model=args.model,
        data=args.data,
        prune_args=tuple(flags),
        image_tag=args.image_tag,
        instance_type=args.instance_type,
    )


def launch_prune(args: argparse.Namespace, outputs: dict[str, Any], validate: Callable[[list[str], bool], Any]) -> int:
    """Validate with the pruner's own checks (`validate`: training.prune.validate_argv; the model's config.json is
    read unless --dry-run), then print (--dry-run) or submit. Raises ValueError for what it refuses (exit 2)."""
    spec = spec_from_args(args)
    loc = locations(spec, outputs)
    validate(prune_argv(spec, loc), not args.dry_run)
    if args.target == "sagemaker":
        request = build_prune_training_job_request(spec, outputs)
        if args.dry_run:
            print(json.dumps(request, indent=2))
            return 0
        import boto3

        sm = boto3.client("sagemaker", region_name=outputs.get(out.REGION))
        print(sm.create_training_job(**request)["TrainingJobArn"])
    else:
        manifest = yaml.safe_dump(render_prune_job(spec, outputs), sort_keys=False)
        if args.dry_run:
            print(manifest, end="")
            return 0
        rc = _kubectl_apply(manifest, outputs)
        if rc:
            return rc
    print(f"the pruned model will be at {loc['out']}: distil it with --model {spec.name} --distill-from {spec.model}")
    if args.follow:
        from ops import jobs

        job = jobs.open_job(args.target, args.name, outputs)
        return jobs.follow(job, outputs, args.stack, sys.stdout, poll_s=args.poll)
    return 0


def _kubectl_apply(manifest: str, outputs: dict[str, Any]) -> int:
    cmd = ["kubectl", "apply", "-f", "-"]
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = outputs.get(out.KUBECONFIG)
        if kubeconfig:
            # The stack's kubeconfig authenticates with `aws eks get-token` under the caller's AWS identity.
            path = os.path.join(tmp, "kubeconfig")
            with open(path, "w", encoding="utf-8") as f:
                f.write(kubeconfig if isinstance(kubeconfig, str) else json.dumps(kubeconfig))
            cmd += ["--kubeconfig", path]
        return subprocess.run(cmd, input=manifest, text=True, check=False).returncode
