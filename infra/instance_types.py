"""What the platform knows about EC2 GPU instance types: GPU count and whether EFA is supported.

Used to validate config (a GPU pool must use GPU types; EFA only where supported), to size the GPU budget,
and to tell workloads how many GPUs a node of a pool offers. Source: the EC2 accelerated-computing instance
type pages (GPU counts, EFA support), checked 2026-11. x86_64 only: the pools use the AL2023 x86_64 NVIDIA AMI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInstanceType:
    gpus: int
    gpu: str
    gpu_memory_gib: int
    vcpus: int
    memory_gib: int
    efa: bool


GPU_INSTANCE_TYPES: dict[str, GpuInstanceType] = {
    "g4dn.xlarge": GpuInstanceType(1, "T4", 16, 4, 16, False),
    "g4dn.2xlarge": GpuInstanceType(1, "T4", 16, 8, 32, False),
    "g4dn.12xlarge": GpuInstanceType(4, "T4", 64, 48, 192, True),
    "g4dn.metal": GpuInstanceType(8, "T4", 128, 96, 384, True),
    "g5.xlarge": GpuInstanceType(1, "A10G", 24, 4, 16, False),
    "g5.2xlarge": GpuInstanceType(1, "A10G", 24, 8, 32, False),
    "g5.4xlarge": GpuInstanceType(1, "A10G", 24, 16, 64, False),
    "g5.12xlarge": GpuInstanceType(4, "A10G", 96, 48, 192, True),
    "g5.48xlarge": GpuInstanceType(8, "A10G", 192, 192, 768, True),
    "g6.xlarge": GpuInstanceType(1, "L4", 24, 4, 16, False),
    "g6.2xlarge": GpuInstanceType(1, "L4", 24, 8, 32, False),
    "g6.4xlarge": GpuInstanceType(1, "L4", 24, 16, 64, False),
    "g6.12xlarge": GpuInstanceType(4, "L4", 96, 48, 192, False),
    "g6.48xlarge": GpuInstanceType(8, "L4", 192, 192, 768, True),
    "g6e.xlarge": GpuInstanceType(1, "L40S", 48, 4, 32, False),
    "g6e.2xlarge": GpuInstanceType(1, "L40S", 48, 8, 64, False),
    "g6e.12xlarge": GpuInstanceType(4, "L40S", 192, 48, 384, True),
    "g6e.48xlarge": GpuInstanceType(8, "L40S", 384, 192, 1536, True),
    "p4d.24xlarge": GpuInstanceType(8, "A100", 320, 96, 1152, True),
    "p4de.24xlarge": GpuInstanceType(8, "A100", 640, 96, 1152, True),
    "p5.48xlarge": GpuInstanceType(8, "H100", 640, 192, 2048, True),
    "p5e.48xlarge": GpuInstanceType(8, "H200", 1128, 192, 2048, True),
    "p5en.48xlarge": GpuInstanceType(8, "H200", 1128, 192, 2048, True),
}
