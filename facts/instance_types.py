"""What the platform knows about EC2 GPU instance types: GPU count and model, and EFA support and interface count.

One table for everything that must agree about a node: config validation (a GPU pool must use GPU types; EFA only
where supported), the GPU budget, the launch template's EFA interfaces (infra/cluster.py), the Cluster Autoscaler's
node-template tags for scale-from-zero (infra/cluster_autoscaler.py), the `k8s.amazonaws.com/accelerator` node label,
and the EFA devices a training pod requests by default (exported per pool, read by ops/training_k8s_job.py).

Sources, checked 2026-11: the EC2 accelerated-computing instance type pages (GPU counts, GPU memory, vCPUs, memory)
and the EC2 user guide's EFA section ("Supported instance types" and "Maximum EFA interfaces per instance" in
"Network cards"/"Maximum network interfaces"): every EFA-capable single-card type takes 1 EFA interface; multi-card
types take one per network card (p4d/p4de 4, p5/p5e 32, p5en 16, g6e.48xlarge 4). x86_64 only: the pools use the
AL2023 x86_64 NVIDIA AMI.
"""

from __future__ import annotations

from dataclasses import dataclass

ACCELERATOR_LABEL = "k8s.amazonaws.com/accelerator"
"""Node label the Cluster Autoscaler (>= 1.15) reads on AWS to know a node has GPUs before the device plugin has
registered them; without it CA sees an unready GPU node as "no GPUs" and scales out again (kubernetes/autoscaler
cluster-autoscaler/cloudprovider/aws/README.md, "Special note on GPU instances")."""


@dataclass(frozen=True)
class GpuInstanceType:
    gpus: int
    gpu: str
    gpu_memory_gib: int
    vcpus: int
    memory_gib: int
    efa_interfaces: int
    """EFA interfaces a node of this type can have (0: no EFA): one per network card on multi-card types. The launch
    template attaches this many and the EFA device plugin advertises each as one `vpc.amazonaws.com/efa`."""

    @property
    def efa(self) -> bool:
        return self.efa_interfaces > 0

    @property
    def accelerator(self) -> str:
        """Value of the `k8s.amazonaws.com/accelerator` label on nodes of this type (e.g. nvidia-l4, nvidia-h100)."""
        return f"nvidia-{self.gpu.lower()}"


GPU_INSTANCE_TYPES: dict[str, GpuInstanceType] = {
    "g4dn.xlarge": GpuInstanceType(1, "T4", 16, 4, 16, 0),
    "g4dn.2xlarge": GpuInstanceType(1, "T4", 16, 8, 32, 0),
    "g4dn.12xlarge": GpuInstanceType(4, "T4", 64, 48, 192, 1),
    "g4dn.metal": GpuInstanceType(8, "T4", 128, 96, 384, 1),
    "g5.xlarge": GpuInstanceType(1, "A10G", 24, 4, 16, 0),
    "g5.2xlarge": GpuInstanceType(1, "A10G", 24, 8, 32, 0),
    "g5.4xlarge": GpuInstanceType(1, "A10G", 24, 16, 64, 0),
    "g5.12xlarge": GpuInstanceType(4, "A10G", 96, 48, 192, 1),
    "g5.48xlarge": GpuInstanceType(8, "A10G", 192, 192, 768, 1),
    "g6.xlarge": GpuInstanceType(1, "L4", 24, 4, 16, 0),
    "g6.2xlarge": GpuInstanceType(1, "L4", 24, 8, 32, 0),
    "g6.4xlarge": GpuInstanceType(1, "L4", 24, 16, 64, 0),
    "g6.12xlarge": GpuInstanceType(4, "L4", 96, 48, 192, 0),
    "g6.48xlarge": GpuInstanceType(8, "L4", 192, 192, 768, 1),
    "g6e.xlarge": GpuInstanceType(1, "L40S", 48, 4, 32, 0),
    "g6e.2xlarge": GpuInstanceType(1, "L40S", 48, 8, 64, 0),
    "g6e.12xlarge": GpuInstanceType(4, "L40S", 192, 48, 384, 1),
    "g6e.48xlarge": GpuInstanceType(8, "L40S", 384, 192, 1536, 4),
    "p4d.24xlarge": GpuInstanceType(8, "A100", 320, 96, 1152, 4),
    "p4de.24xlarge": GpuInstanceType(8, "A100", 640, 96, 1152, 4),
    "p5.48xlarge": GpuInstanceType(8, "H100", 640, 192, 2048, 32),
    "p5e.48xlarge": GpuInstanceType(8, "H200", 1128, 192, 2048, 32),
    "p5en.48xlarge": GpuInstanceType(8, "H200", 1128, 192, 2048, 16),
}


# -- GPU memory and node hardware (additive: what vLLM sizing and the training Job read) ---------------------------

GPU_MEMORY_MIB: dict[tuple[str, int], int] = {
    ("T4", 16): 15360,
    ("A10G", 24): 23028,
    ("L4", 24): 23034,
    ("L40S", 48): 46068,
    ("A100", 40): 40960,
    ("A100", 80): 81920,
    ("H100", 80): 81559,
    ("H200", 141): 143771,
}
"""Memory of one GPU as the driver reports it (`nvidia-smi --query-gpu=memory.total`), keyed by (model, nominal GB
per GPU). The nominal figure overstates what CUDA can allocate (an A10G's "24 GB" is 22.5 GiB), and vLLM's
`--gpu-memory-utilization` is a fraction of this reported total, so sizing must start from it."""


def instance_gpu(instance_type: str) -> GpuInstanceType | None:
    """The GPU hardware of an EC2 or SageMaker (`ml.`-prefixed) instance type; None for CPU or unknown types.
    SageMaker's `ml.<type>` hosting instances are the EC2 instances of the same name."""
    return GPU_INSTANCE_TYPES.get(instance_type.removeprefix("ml."))


def gpu_memory_gib(instance_type: str) -> float:
    """Reported memory of one GPU of the instance type, in GiB."""
    t = instance_gpu(instance_type)
    if t is None:
        raise KeyError(f"{instance_type} is not a GPU instance type this platform knows")
    return GPU_MEMORY_MIB[(t.gpu, round(t.gpu_memory_gib / t.gpus))] / 1024


GPUDIRECT_RDMA_FAMILIES = ("p4d", "p4de", "p5", "p5e", "p5en")
"""Families whose EFA supports GPUDirect RDMA. Per the aws-ofi-nccl maintainers, only P-series from p4d on do; G
instances (g6e included) do not, though their GPUs could (aws/aws-ofi-nccl#547, 2025-08)."""

NVME_INSTANCE_STORE_GB: dict[str, int] = {
    "g4dn.xlarge": 125,
    "g4dn.2xlarge": 225,
    "g4dn.12xlarge": 900,
    "g4dn.metal": 1800,
    "g5.xlarge": 250,
    "g5.2xlarge": 450,
    "g5.4xlarge": 600,
    "g5.12xlarge": 3800,
    "g5.48xlarge": 7600,
    "g6.xlarge": 250,
    "g6.2xlarge": 450,
    "g6.4xlarge": 600,
    "g6.12xlarge": 3760,
    "g6.48xlarge": 7520,
    "g6e.xlarge": 250,
    "g6e.2xlarge": 450,
    "g6e.12xlarge": 3800,
    "g6e.48xlarge": 7600,
    "p4d.24xlarge": 8000,
    "p4de.24xlarge": 8000,
    "p5.48xlarge": 30720,
    "p5e.48xlarge": 30720,
    "p5en.48xlarge": 30720,
}
"""Local NVMe instance store per type, in GB (EC2 instance-type specifications, "Instance storage"). Every GPU type
the platform allows has some; the node's storage configuration decides whether pods' scratch lands on it."""


def efa_interfaces(instance_types: list[str] | tuple[str, ...]) -> int:
    """EFA devices a node of a pool offers: infra/cluster.py attaches one EFA interface per network card, sized for
    the pool's smallest type, so this is the fewest any of its types has."""
    return min(GPU_INSTANCE_TYPES[t].efa_interfaces if t in GPU_INSTANCE_TYPES else 1 for t in instance_types)


def has_gpudirect_rdma(instance_type: str) -> bool:
    return instance_type.removeprefix("ml.").split(".", 1)[0] in GPUDIRECT_RDMA_FAMILIES
