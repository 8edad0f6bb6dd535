"""GPU capacity you can actually get: reservations for the training pool and the service quotas a stack needs.

New accounts start with a GPU quota of 0 vCPUs for G and P instances, and on-demand p5 in practice needs a
capacity reservation or a Capacity Block for ML. The preview lists the quotas below so an operator can request
them (Service Quotas console or `aws service-quotas request-service-quota-increase`) before the first `up`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pulumi_aws as aws

from facts.instance_types import GPU_INSTANCE_TYPES
from infra.config import GpuPool, StackConfig

# EC2 vCPU-based instance quotas (Service Quotas, service code `ec2`; EC2 User Guide, "Amazon EC2 service quotas").
EC2_QUOTAS = {
    ("ON_DEMAND", "standard"): ("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
    ("ON_DEMAND", "g"): ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    ("ON_DEMAND", "p"): ("L-417A185B", "Running On-Demand P instances"),
    ("SPOT", "standard"): ("L-34B43A08", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests"),
    ("SPOT", "g"): ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    ("SPOT", "p"): ("L-7212CCBC", "All P Spot Instance Requests"),
}


@dataclass(frozen=True)
class Quota:
    service: str
    code: str
    """Service Quotas code, or '' where the code differs per instance type (SageMaker): look it up by name."""
    name: str
    needed: int
    unit: str
    why: str

    def request_command(self, region: str) -> str:
        if self.code:
            return (
                f"aws service-quotas request-service-quota-increase --region {region} --service-code {self.service} "
                f"--quota-code {self.code} --desired-value {self.needed}"
            )
        return (
            f"aws service-quotas list-service-quotas --region {region} --service-code {self.service} "
            f"--query \"Quotas[?QuotaName=='{self.name}'].QuotaCode\"  # then request-service-quota-increase"
        )


def _family_class(instance_type: str) -> str:
    family = instance_type.split(".", 1)[0]
    if family.startswith("p"):
        return "p"
    if family.startswith(("g", "vt")):
        return "g"
    return "standard"


def _vcpus(instance_type: str) -> int:
    """vCPUs: from the GPU table, else from the size name (large 2, xlarge 4, Nxlarge 4N), exact for the general
    purpose families the system pool uses (EC2 instance type pages)."""
    if instance_type in GPU_INSTANCE_TYPES:
        return GPU_INSTANCE_TYPES[instance_type].vcpus
    size = instance_type.split(".", 1)[1]
    if size == "large":
        return 2
    match = re.fullmatch(r"(\d*)xlarge", size)
    if match:
        return 4 * int(match.group(1) or 1)
    return 2


def required_quotas(cfg: StackConfig) -> list[Quota]:
    """The quotas the stack needs at its maximum sizes (vCPUs per family and purchase option, SageMaker instances)."""
    need: dict[tuple[str, str], list[tuple[int, str]]] = {}
    system = cfg.cluster.system_instance_type
    need.setdefault(("ON_DEMAND", _family_class(system)), []).append(
        (cfg.cluster.system_node_count * _vcpus(system), f"system pool {cfg.cluster.system_node_count} x {system}")
    )
    for pool in cfg.cluster.gpu_pools:
        largest = max(pool.instance_types, key=_vcpus)
        option = "ON_DEMAND" if pool.capacity_type == "ON_DEMAND" else "SPOT"
        if pool.capacity_reservation_id:
            # Instances in a reservation or a Capacity Block still count against the on-demand vCPU quota.
            option = "ON_DEMAND"
        need.setdefault((option, _family_class(largest)), []).append(
            (pool.max_size * _vcpus(largest), f"{pool.name} pool max {pool.max_size} x {largest}")
        )
    batch = cfg.cluster.batch_pool
    largest = max(batch.instance_types, key=_vcpus)
    need.setdefault((batch.capacity_type, _family_class(largest)), []).append(
        (batch.max_size * _vcpus(largest), f"{batch.name} pool max {batch.max_size} x {largest}")
    )
    quotas = [
        Quota(
            "ec2", *EC2_QUOTAS[key], needed=sum(n for n, _ in parts), unit="vCPUs", why="; ".join(w for _, w in parts)
        )
        for key, parts in sorted(need.items())
    ]
    if cfg.serving.on_sagemaker:
        instance = cfg.serving.sagemaker_instance_type
        quotas.append(
            Quota(
                "sagemaker",
                "",
                f"{instance} for endpoint usage",
                needed=cfg.serving.sagemaker_max_instances,
                unit="instances",
                why=f"SageMaker endpoint max {cfg.serving.sagemaker_max_instances} x {instance}",
            )
        )
    return quotas


# -- capacity reservations and Capacity Blocks for the training pool -------------------------------------------------
def node_group_capacity_type(pool: GpuPool) -> str:
    """EKS managed node groups take CAPACITY_BLOCK for Capacity Blocks for ML (EKS User Guide, "Create a managed node
    group with Capacity Blocks for ML"); a plain On-Demand Capacity Reservation is ON_DEMAND capacity."""
    return "CAPACITY_BLOCK" if pool.capacity_block else pool.capacity_type


def reservation_launch_template_args(pool: GpuPool) -> dict[str, Any]:
    """Launch-template arguments that put the pool's instances into its reservation (none without one).

    A Capacity Block needs `instanceMarketOptions.marketType = capacity-block` and the reservation as target; an
    On-Demand Capacity Reservation only the target (EC2 User Guide, "Use Capacity Blocks"; pulumi-aws
    LaunchTemplate `capacity_reservation_specification`, `instance_market_options`)."""
    if not pool.capacity_reservation_id:
        return {}
    args: dict[str, Any] = {
        "capacity_reservation_specification": aws.ec2.LaunchTemplateCapacityReservationSpecificationArgs(
            capacity_reservation_target=aws.ec2.LaunchTemplateCapacityReservationSpecificationCapacityReservationTargetArgs(
                capacity_reservation_id=pool.capacity_reservation_id
            )
        )
    }
    if pool.capacity_block:
        args["instance_market_options"] = aws.ec2.LaunchTemplateInstanceMarketOptionsArgs(market_type="capacity-block")
    return args
