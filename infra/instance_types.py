"""What the platform knows about EC2 GPU instance types: GPU count and model, and EFA support and interface count.

One table for everything that must agree about a node: config validation (a GPU pool must use GPU types; EFA only
where supported), the GPU budget, the launch template's EFA interfaces (infra/cluster.py), the Cluster Autoscaler's
node-template tags for scale-from-zero (infra/cluster_autoscaler.py), the `k8s.amazonaws.com/accelerator` node label,
and the EFA devices a training pod requests by default (exported per pool, read by training/k8s_job.py).

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
