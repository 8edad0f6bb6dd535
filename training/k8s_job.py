"""Render the multi-node training job for the EKS training pool: an Indexed Job plus a headless Service.

Each of the N pods runs `torchrun --nnodes=N` with c10d rendezvous hosted by pod 0. The headless Service gives pod
i the stable DNS name `<job>-<i>.<job>` (Indexed Job hostname + `subdomain`), so pod 0 is reachable before any
pod is Ready and again after it is replaced. Placement comes from the stack's training pool, never from literals:
the node selector is the pool's labels and the tolerations are its taints, so the two cannot drift apart.

Restarts: a failed or evicted pod is recreated by the Job (same index, same hostname); torchrun's elastic agent
restarts the workers on every node, and the trainer resumes from the latest complete checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra import outputs as out
from training.stack import require, training_pool
from training.torchrun import shutdown_timeout

RDZV_PORT = 29500
METRICS_PORT = 9400
"""The trainer's Prometheus endpoint (`metrics_port`, training/metrics.py); the pods are annotated for the stack's
`training` scrape job and `llm-training`'s network policy admits the monitoring namespace on it."""
CONTAINER = "trainer"


@dataclass
class TrainingJobSpec:
    name: str
    """Job name: a DNS label (lowercase alphanumerics and '-'), also the rendezvous id and the run's S3 prefix."""
    image_tag: str = "latest"
    nodes: int = 1
    efa_devices: int = 1
    """EFA devices requested per pod when the pool has EFA: all the node has (g6e.12xlarge 1, p4d 4, p5 32)."""
    preset: str = "debug"
    data: str = ""
    """s3:// URI, or a key inside the stack's datasets bucket."""
    max_steps: int | None = None
    save_every: int | None = None
    overrides: list[str] = field(default_factory=list)
    max_restarts: int = 3
    """torchrun restarts of the whole worker group (e.g. after a node is replaced) before the pod fails."""
    backoff_limit: int = 10
    """Pod failures the Job tolerates; each costs at most one checkpoint interval."""
    termination_grace_s: int = 120
    """Time between SIGTERM and SIGKILL: the trainer finishes its step and writes a checkpoint in it; torchrun's
    --shutdown-timeout is derived from it. 120 s matches EC2's spot interruption notice, the most a spot node
    gives (docs/training.md, "Preemption", has the measured save times)."""
    shm_size: str = "16Gi"

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", self.name):
            raise ValueError(f"job name {self.name!r} must be a DNS label of at most 52 characters")
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")


def run_locations(outputs: dict[str, Any], name: str, data: str) -> dict[str, str]:
    """Where a run reads and writes, all inside the stack's buckets."""
    if not data:
        raise ValueError("no training data: pass --data (an s3:// URI or a key in the datasets bucket)")
    data_uri = data if data.startswith("s3://") else f"s3://{require(outputs, out.DATASETS_BUCKET)}/{data.lstrip('/')}"
    return {
        "data": data_uri,
        "output": f"s3://{require(outputs, out.CHECKPOINTS_BUCKET)}/{name}",
        "export": f"s3://{require(outputs, out.MODELS_BUCKET)}/{name}",
    }


def trainer_args(spec: TrainingJobSpec, locations: dict[str, str]) -> list[str]:
    # No preset: the trainer picks (finetune for a real model, sized to it; debug otherwise).
    args = ["--preset", spec.preset] if spec.preset else []
    args += ["--data", locations["data"], "--output", locations["output"]]
    args += ["--export", locations["export"]]
    if spec.max_steps is not None:
        args += ["--max-steps", str(spec.max_steps)]
    if spec.save_every is not None:
        args += ["--save-every", str(spec.save_every)]
    for item in spec.overrides:
        args += ["--set", item]
    # Last, so that the port the pod annotations and network policy name is the one the trainer serves.
    args += ["--set", f"metrics_port={METRICS_PORT}"]
    return args


def render_training_job(spec: TrainingJobSpec, outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """The Kubernetes objects to apply, in order: [headless Service, Indexed Job]."""
    namespace = require(outputs, out.TRAINING_NAMESPACE)
    pool_name, pool = training_pool(outputs)
    gpus = int(pool.get("gpus_per_node", 0))
    efa = bool(pool.get("efa", False))
    image = f"{require(outputs, out.TRAINING_REPOSITORY_URL)}:{spec.image_tag}"
    locations = run_locations(outputs, spec.name, spec.data)
    labels = {"app.kubernetes.io/name": "llm-training", "app.kubernetes.io/instance": spec.name}

    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.name, "namespace": namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is Ready: publish addresses as soon as pods have IPs.
            "publishNotReadyAddresses": True,
            "selector": labels,
            "ports": [{"name": "c10d", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }

    torchrun = [
        # torchrun that exits 143 on SIGTERM (training/torchrun.py); its workers get the pod's grace period.
        *("python", "-m", "training.torchrun", f"--shutdown-timeout={shutdown_timeout(spec.termination_grace_s)}"),
        f"--nnodes={spec.nodes}",
        f"--nproc_per_node={max(gpus, 1)}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={spec.name}-0.{spec.name}.{namespace}.svc.cluster.local:{RDZV_PORT}",
        f"--rdzv_id={spec.name}",
        f"--max_restarts={spec.max_restarts}",
        "-m",
        "training",
        *trainer_args(spec, locations),
    ]
    env = [
        {"name": "AWS_REGION", "value": str(require(outputs, out.REGION))},
        {"name": "TRAINING_LOCAL_DIR", "value": "/scratch"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    limits: dict[str, str] = {}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    if efa:
        # aws-ofi-nccl carries NCCL over EFA; one pod per node, so the pod takes all of the node's EFA devices.
        limits["vpc.amazonaws.com/efa"] = str(spec.efa_devices)
        env += [{"name": "FI_PROVIDER", "value": "efa"}, {"name": "FI_EFA_USE_DEVICE_RDMA", "value": "1"}]
    tolerations = [
        {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
        if t.get("value") not in (None, "")
        else {"key": t["key"], "operator": "Exists", "effect": t["effect"]}
        for t in pool.get("taints", [])
    ]

    pod_spec: dict[str, Any] = {
        "serviceAccountName": require(outputs, out.TRAINING_SERVICE_ACCOUNT),
        "subdomain": spec.name,
        # OnFailure restarts the container in place (same pod, same IP, warm local scratch); the Job replaces
        # pods that are evicted or lose their node.
        "restartPolicy": "OnFailure",
        "terminationGracePeriodSeconds": spec.termination_grace_s,
        "nodeSelector": dict(pool.get("labels", {})),
        "tolerations": tolerations,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        "containers": [
            {
                "name": CONTAINER,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": torchrun,
                "env": env,
                "ports": [
                    {"name": "c10d", "containerPort": RDZV_PORT, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                ],
                "resources": {"limits": limits, "requests": dict(limits)},
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "scratch", "mountPath": "/scratch"},
                ],
            }
        ],
        "volumes": [
            # NCCL and DataLoader workers share memory through /dev/shm; the container default (64 MiB) is too small.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": spec.name,
            "namespace": namespace,
            "labels": {**labels, "llm-platform/pool": pool_name},
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,
            "backoffLimit": spec.backoff_limit,
            "template": {
                "metadata": {
                    "labels": labels,
                    # Global rank 0 (pod 0) serves the run's values; the other pods answer with an empty page.
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
    return [service, job]
