"""Render the multi-node training job for the EKS training pool: an Indexed Job plus a headless Service.

Each of the N pods runs `torchrun --nnodes=N` with c10d rendezvous hosted by pod 0. The headless Service gives pod
i the stable DNS name `<job>-<i>.<job>` (Indexed Job hostname + `subdomain`), so pod 0 is reachable before any
pod is Ready and again after it is replaced. Placement comes from the stack's training pool, never from literals:
the node selector is the pool's labels and the tolerations are its taints, so the two cannot drift apart.

Restarts: a failed or evicted pod is recreated by the Job (same index, same hostname); torchrun's elastic agent
restarts the workers on every node, and the trainer resumes from the latest complete checkpoint. Pods are never
restarted in place (`restartPolicy: Never`): only then does the Job's `podFailurePolicy` apply, which does not count
disruptions (spot interruption, node drain, preemption: the `DisruptionTarget` pod condition) as failures, and
each index has its own retry budget (`backoffLimitPerIndex`), so one flaky node cannot spend the others' retries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from facts.cluster import TRAINING_METRICS_PORT
from facts.instance_types import GPU_INSTANCE_TYPES, NVME_INSTANCE_STORE_GB, efa_interfaces, has_gpudirect_rdma
from infra import outputs as out
from ops.stack_outputs import require, training_pool
from training.torchrun import shutdown_timeout

RDZV_PORT = 29500
CONTAINER = "trainer"
RDZV_READ_TIMEOUT_S = 900
"""c10d's store timeout (default 60 s). Pods start as their nodes arrive: from zero, pod 0's node (which hosts the
store) can come minutes after the others', and its image pull adds more. Past this, torchrun fails the pod."""
RDZV_JOIN_TIMEOUT_S = 1800
"""How long a rendezvous waits for all nodes (default 600 s): a cold scale-up of GPU nodes plus a 10 GB image pull
on each can take longer than ten minutes, and a spot replacement longer still."""
DEFAULT_SCRATCH_GB = 200
"""Types without an instance store keep scratch on the root volume (gpuNodeDiskGb, 200 GiB by default)."""
CPU_SHARE = 0.85
MEMORY_SHARE = 0.8
"""Requested share of the smallest node type's vCPUs and memory: below EKS's allocatable (kubelet and system
reservations, ~1-8 GiB by type) less the pool's DaemonSets, so the pod always fits a fresh node."""


@dataclass
class TrainingJobSpec:
    name: str
    """Job name: a DNS label (lowercase alphanumerics and '-'), also the rendezvous id and the run's S3 prefix."""
    image_tag: str = "latest"
    nodes: int = 1
    efa_devices: int | None = None
    """EFA devices requested per pod when the pool has EFA. Default: all the node has, the pool's
    `efa_interfaces_per_node` from the stack outputs (facts.instance_types: g6e.12xlarge 1, p4d 4, p5 32)."""
    preset: str = "debug"
    data: str = ""
    """s3:// URI, or a key inside the stack's datasets bucket."""
    max_steps: int | None = None
    save_every: int | None = None
    overrides: list[str] = field(default_factory=list)
    max_restarts: int = 3
    """torchrun restarts of the whole worker group (e.g. after a node is replaced) before the pod fails."""
    backoff_limit: int = 3
    """Failures of one index (node) the Job tolerates before it fails; each costs at most one checkpoint interval.
    Disruptions (spot, drains, preemption) do not count; torchrun restarts within a pod do not either."""
    scratch_gib: int | None = None
    """Node-local scratch (dataset and model downloads, checkpoint staging): the emptyDir's size limit and the pod's
    ephemeral-storage request, so the scheduler places it on a node with that much room. None: half the instance
    store of the pool's smallest type. GPU nodes put the kubelet's directories on their NVMe instance store
    (infra/cluster.py LOCAL_NVME_NODE_CONFIG), so this scratch is local NVMe, not the gp3 root volume."""
    termination_grace_s: int = 120
    """Time between SIGTERM and SIGKILL: the trainer finishes its step and writes a checkpoint in it; torchrun's
    --shutdown-timeout is derived from it. 120 s matches EC2's spot interruption notice, the most a spot node
    gives (docs/training.md, "Preemption", has the measured save times)."""
    shm_size: str = "16Gi"
    module: str = "training"
    """The Python module the pods run under torchrun (`-m MODULE`): the launcher's job kind."""

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", self.name):
            raise ValueError(f"job name {self.name!r} must be a DNS label of at most 52 characters")
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        if self.efa_devices is not None and self.efa_devices < 1:
            raise ValueError("efa_devices must be >= 1 (or None: all the instance type has)")
        if self.scratch_gib is not None and self.scratch_gib < 1:
            raise ValueError("scratch_gib must be >= 1")


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
    args += ["--set", f"metrics_port={TRAINING_METRICS_PORT}"]
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
        f"--rdzv_conf=join_timeout={RDZV_JOIN_TIMEOUT_S},read_timeout={RDZV_READ_TIMEOUT_S}",
        f"--max_restarts={spec.max_restarts}",
        "-m",
        spec.module,
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
        limits["vpc.amazonaws.com/efa"] = str(spec.efa_devices or efa_devices(pool))
        env += efa_env(pool)
    scratch = f"{spec.scratch_gib or scratch_gib(pool)}Gi"
    requests = {**limits, **node_share(pool), "ephemeral-storage": scratch}
    tolerations = [
        {"key": t["key"], "operator": "Equal", "value": t["value"], "effect": t["effect"]}
        if t.get("value") not in (None, "")
        else {"key": t["key"], "operator": "Exists", "effect": t["effect"]}
        for t in pool.get("taints", [])
    ]

    pod_spec: dict[str, Any] = {
        "serviceAccountName": require(outputs, out.TRAINING_SERVICE_ACCOUNT),
        "subdomain": spec.name,
        # Never: a failed pod is replaced by the Job (same index and hostname), and only then does podFailurePolicy
        # see it. torchrun already restarts failed workers inside the pod (--max_restarts).
        "restartPolicy": "Never",
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
                    {"name": "metrics", "containerPort": TRAINING_METRICS_PORT, "protocol": "TCP"},
                ],
                # Burstable: CPU, memory and scratch requested (the scheduler reserves them; under node pressure the
                # kubelet evicts BestEffort pods and pods above their requests first). No memory limit: one
                # pod per node, and a cap below the node would OOM-kill a checkpoint save for memory that is free.
                "resources": {"limits": limits, "requests": requests},
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
            {"name": "scratch", "emptyDir": {"sizeLimit": scratch}},
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
            # Per node: an index that fails more often than this fails the Job at once (maxFailedIndexes 0: the
            # other nodes cannot train without it). GA in Kubernetes 1.33, on by default since 1.29.
            "backoffLimitPerIndex": spec.backoff_limit,
            "maxFailedIndexes": 0,
            # A replacement starts only once the old pod is gone: two pods with one hostname would split the
            # rendezvous, and the old one may still be writing its checkpoint (the only value podFailurePolicy allows).
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [
                    # Spot interruption, node drain, eviction, preemption, node loss: the pod is replaced without
                    # counting against the retry budget (the trainer saved a checkpoint on SIGTERM).
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    # Global rank 0 (pod 0) serves the run's values; the other pods answer with an empty page.
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(TRAINING_METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }
    return [service, job]


def smallest_type(pool: dict[str, Any]) -> str:
    types = [t for t in pool.get("instance_types", []) if t in GPU_INSTANCE_TYPES]
    if not types:
        raise ValueError(f"training pool has no known GPU instance type: {pool.get('instance_types')}")
    return min(types, key=lambda t: (GPU_INSTANCE_TYPES[t].memory_gib, GPU_INSTANCE_TYPES[t].vcpus))


def node_share(pool: dict[str, Any]) -> dict[str, str]:
    """CPU and memory requests: most of the pool's smallest node (one training pod per node)."""
    t = GPU_INSTANCE_TYPES[smallest_type(pool)]
    return {"cpu": str(max(1, int(t.vcpus * CPU_SHARE))), "memory": f"{max(1, int(t.memory_gib * MEMORY_SHARE))}Gi"}


def scratch_gib(pool: dict[str, Any]) -> int:
    """Half the NVMe instance store of the pool's smallest type, in GiB: the rest is for images and the node."""
    sizes = [NVME_INSTANCE_STORE_GB.get(t, 0) for t in pool.get("instance_types", [])]
    smallest_gb = min(sizes) if sizes and min(sizes) else DEFAULT_SCRATCH_GB
    return max(1, int(smallest_gb * 1e9 / 2**30 / 2))


def efa_devices(pool: dict[str, Any]) -> int:
    """All the EFA interfaces the pool's instance types have (the fewest, if they differ)."""
    if "efa_interfaces_per_node" in pool:  # what the stack's launch template attaches (infra/cluster.py)
        return int(pool["efa_interfaces_per_node"])
    return efa_interfaces(pool["instance_types"]) if pool.get("instance_types") else 1


def efa_env(pool: dict[str, Any]) -> list[dict[str, str]]:
    """libfabric settings for the pool's family. FI_EFA_USE_DEVICE_RDMA=1 makes libfabric abort where the device has
    no RDMA, and only P-series from p4d on have GPUDirect RDMA over EFA (aws/aws-ofi-nccl#547: not g6e). With
    libfabric >= 1.18 and aws-ofi-nccl >= 1.7 it is detected anyway (aws/aws-ofi-nccl#313); it is set where RDMA
    exists so a node without it fails loudly instead of training at a fraction of the bandwidth."""
    env = [{"name": "FI_PROVIDER", "value": "efa"}]
    types = pool.get("instance_types", [])
    if types and all(has_gpudirect_rdma(t) for t in types):
        env.append({"name": "FI_EFA_USE_DEVICE_RDMA", "value": "1"})
    return env
