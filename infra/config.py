"""Stack configuration: declared once in Pulumi.yaml, loaded and validated once here.

`Pulumi.yaml` is the only place a key, its type, its default and its description live. `load_config` merges a
stack's values over those defaults, checks every value, and returns a frozen, typed `StackConfig`. It collects
all problems and raises one `ConfigError` naming each key, the bad value and what is allowed, so a bad stack file
fails before a single resource is registered. Environments differ only by their stack files.

Each section (NetworkConfig, StorageConfig, ClusterConfig, ...) builds itself from the merged values and holds the
rules for the keys it owns, next to its fields: adding a key touches Pulumi.yaml and that section only.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

from facts.cluster import (
    BATCH_POOL,
    BATCH_TAINT,
    GPU_TAINT,
    MONITORING_NAMESPACE,
    POOL_LABEL,
    PURPOSE_LABEL,
    SERVING_NAMESPACE,
    TRAINING_NAMESPACE,
)
from facts.instance_types import ACCELERATOR_LABEL, GPU_INSTANCE_TYPES, efa_interfaces, instance_gpu
from facts.serving import ENGINES, QUANTIZATIONS
from infra.versions import CLUSTER_AUTOSCALER, cluster_autoscaler_for
from infra.vllm_sizing import MODEL_SHAPES, check_serving_fit

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILE = REPO_ROOT / "Pulumi.yaml"
STACKS_DIR = REPO_ROOT / "stacks"


CAPACITY_TYPES = ("ON_DEMAND", "SPOT")
NAT_MODES = ("single", "perAz")
SUPPORTED_KUBERNETES = ("1.31", "1.32", "1.33", "1.34", "1.35")
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922)
_REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_INSTANCE_RE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:(role|user)/[\w+=,.@/-]+$")
_SAGEMAKER_INSTANCE_RE = re.compile(r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


@cache
def _aws_instance_types(service: str, shape: str) -> frozenset[str]:
    """The instance types an AWS API accepts: the enum of `shape` in botocore's bundled service model
    (botocore/data/ec2/*/service-2.json `InstanceType`, botocore/data/sagemaker/*/service-2.json
    `ProductionVariantInstanceType`), the same list the API validates against. ~0.6 s per service, once."""
    import botocore.session

    return frozenset(botocore.session.get_session().get_service_model(service).shape_for(shape).enum)


def _instance_type_problem(value: str, service: str, shape: str) -> str | None:
    """None if `value` is in the API's enum, else what is wrong and the closest valid names."""
    import botocore

    known = _aws_instance_types(service, shape)
    if value in known:
        return None
    close = difflib.get_close_matches(value, sorted(known), n=3, cutoff=0.8)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{value!r} is not an instance type of the {service} API (botocore {botocore.__version__}){hint}"


_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
SERVING_AUTOSCALERS = ("cpu", "keda")
METRICS_MODES = ("amp", "in-cluster", "none")
DEPLOYERS = ("in-vpc-runner", "public-allowlist")
"""How `pulumi up` reaches the Kubernetes API (infra/access.py)."""
_GITHUB_REPO_RE = re.compile(r"^https://github\.com/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_CAPACITY_RESERVATION_RE = re.compile(r"^cr-[0-9a-f]{8,17}$")
EGRESS_HINT = (
    "find the public address you deploy from with `curl -s https://checkip.amazonaws.com` and allow it as <ip>/32 "
    "(a deploy workflow: use kubernetesDeployer in-vpc-runner; a GitHub-hosted runner's address changes every job)"
)
REMOVED_KEYS = {
    "activateCostAllocationTags": "cost-allocation tags are activated once per payer account, outside environment "
    "stacks: run `python -m ops.account activate-cost-allocation-tags` (docs/first-deploy.md, step 0)",
}
"""Keys that existed once, with where their job went: a stack file still setting one gets told, not just refused."""
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_CRON_RE = re.compile(r"^\S+ \S+ \S+ \S+ \S+$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")


class ConfigError(ValueError):
    """A stack's configuration is invalid. The message lists every problem, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid stack configuration in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ConfigKey:
    """One key declared in Pulumi.yaml."""

    name: str
    type: str
    description: str
    default: Any = None
    required: bool = False
    items: str | None = None


@cache
def schema() -> dict[str, ConfigKey]:
    """The config keys declared in Pulumi.yaml, by name."""
    project = yaml.safe_load(PROJECT_FILE.read_text())
    keys = {}
    for name, spec in project["config"].items():
        keys[name] = ConfigKey(
            name=name,
            type=spec["type"],
            description=spec["description"],
            default=spec.get("default"),
            required="default" not in spec,
            items=spec.get("items", {}).get("type"),
        )
    return keys


def project_name() -> str:
    return yaml.safe_load(PROJECT_FILE.read_text())["name"]


# ---------------------------------------------------------------------------------------------------------------
# The values being loaded


class Values:
    """A stack's merged, type-checked values by key (Pulumi.yaml's defaults under the stack's own), and the problems
    the sections find in them. Every section reads the keys it owns from here and reports each bad one with `bad`, so
    all problems of a stack file are collected and raised together."""

    def __init__(self, values: dict[str, Any], project: str, region: str | None = None) -> None:
        self.values = values
        self.project = project
        self.region = region
        """aws:region (checked apart: it is not one of the project's keys)."""
        self.problems: list[str] = []

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def key(self, key: str) -> str:
        """The key as a stack file spells it (`<project>:<key>`), for messages that point at another key."""
        return f"{self.project}:{key}"

    def bad(self, key: str, why: str) -> None:
        """Report `key`'s value as invalid: key, bad value, what is allowed."""
        self.problems.append(f"{self.project}:{key} = {self.values[key]!r}: {why}")

    def bad_item(self, key: str, item: Any, why: str) -> None:
        """Report one invalid item of a list key."""
        self.problems.append(f"{self.project}:{key} contains {item!r}: {why}")

    def retention(self, key: str) -> None:
        if self.values[key] not in LOG_RETENTION_DAYS:
            self.bad(key, f"must be one of CloudWatch's retention values {LOG_RETENTION_DAYS}")

    def version(self, key: str) -> None:
        if not _VERSION_RE.match(self.values[key]):
            self.bad(key, "must be a release version MAJOR.MINOR.PATCH such as 1.33.0 (no 'v', no 'latest')")


# ---------------------------------------------------------------------------------------------------------------
# The typed configuration: one section per concern, each building itself from the values and checking the keys it
# owns. Adding a key: declare it in Pulumi.yaml, then add the field and its rules to its section's `from_values`.


def _check_environment(v: Values) -> str:
    """environment: a label for names and tags."""
    if v["environment"] not in ("dev", "staging", "prod") and not re.fullmatch(
        r"[a-z][a-z0-9-]{1,15}", v["environment"]
    ):
        v.bad("environment", "must be a short lowercase name such as dev, staging or prod")
    return v["environment"]


@dataclass(frozen=True)
class NetworkConfig:
    """The VPC (infra/network.py): vpcCidr, azCount, natGateways, interfaceEndpoints, flowLogRetentionDays,
    stateBucket."""

    vpc_cidr: str
    az_count: int
    nat_gateways: Literal["single", "perAz"]
    interface_endpoints: bool
    flow_log_retention_days: int
    state_bucket: str = ""
    """An S3 state backend's bucket in the stack's region, admitted by the S3 gateway endpoint so the in-VPC runner
    reaches it (docs/first-deploy.md); empty for none."""

    @property
    def nat_gateway_count(self) -> int:
        return 1 if self.nat_gateways == "single" else self.az_count

    @classmethod
    def from_values(cls, v: Values) -> NetworkConfig:
        try:
            vpc = ipaddress.ip_network(v["vpcCidr"], strict=True)
            if vpc.version != 4 or not 16 <= vpc.prefixlen <= 20:
                v.bad("vpcCidr", "must be an IPv4 CIDR between /16 and /20")
            elif not vpc.is_private:
                v.bad("vpcCidr", "must be a private (RFC 1918) range")
        except ValueError as exc:
            v.bad("vpcCidr", f"not a valid CIDR ({exc})")
        if not 2 <= v["azCount"] <= 4:
            v.bad("azCount", "must be between 2 and 4 (high availability needs at least 2 zones)")
        if v["natGateways"] not in NAT_MODES:
            v.bad("natGateways", f"must be one of {', '.join(NAT_MODES)}")
        v.retention("flowLogRetentionDays")
        state_bucket = v["stateBucket"]
        if state_bucket and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", state_bucket):
            v.bad("stateBucket", "must be an S3 bucket name (the `s3://<bucket>` of `pulumi login`, without s3://)")
        return cls(
            state_bucket=state_bucket,
            vpc_cidr=v["vpcCidr"],
            az_count=v["azCount"],
            nat_gateways=v["natGateways"],
            interface_endpoints=v["interfaceEndpoints"],
            flow_log_retention_days=v["flowLogRetentionDays"],
        )


@dataclass(frozen=True)
class StorageConfig:
    """Buckets and the KMS key (infra/storage.py): forceDestroyBuckets, protectData, checkpointNoncurrentDays."""

    force_destroy: bool
    protect_data: bool
    checkpoint_noncurrent_days: int

    @classmethod
    def from_values(cls, v: Values) -> StorageConfig:
        if v["checkpointNoncurrentDays"] < 1:
            v.bad("checkpointNoncurrentDays", "must be at least 1")
        if v["production"] and not v["protectData"]:
            v.bad(
                "protectData", "must be true when production is true (production data is never deletable by a destroy)"
            )
        if v["production"] and v["forceDestroyBuckets"]:
            v.bad("forceDestroyBuckets", "must be false when production is true")
        return cls(
            force_destroy=v["forceDestroyBuckets"],
            protect_data=v["protectData"],
            checkpoint_noncurrent_days=v["checkpointNoncurrentDays"],
        )


@dataclass(frozen=True)
class GpuPool:
    """A GPU managed node group and the scheduling contract workloads must meet to land on it.

    Keys `<purpose>InstanceTypes`, `<purpose>CapacityType`, `<purpose>MinSize`, `<purpose>MaxSize` per pool,
    gpuNodeDiskGb for both, and the training pool's trainingEfa, trainingCapacityReservationId, trainingCapacityBlock.
    """

    name: str
    purpose: Literal["training", "inference"]
    instance_types: tuple[str, ...]
    capacity_type: Literal["ON_DEMAND", "SPOT"]
    min_size: int
    max_size: int
    disk_gb: int
    efa: bool
    capacity_reservation_id: str = ""
    """An EC2 capacity reservation (or Capacity Block) the pool launches into; empty for none."""
    capacity_block: bool = False
    """The reservation is a Capacity Block for ML (node group capacity type CAPACITY_BLOCK)."""

    @property
    def gpus_per_node(self) -> int:
        return GPU_INSTANCE_TYPES[self.instance_types[0]].gpus

    @property
    def max_gpus(self) -> int:
        return self.max_size * self.gpus_per_node

    @property
    def efa_interfaces_per_node(self) -> int:
        """EFA interfaces (= `vpc.amazonaws.com/efa` devices) on every node of the pool: the launch template's count,
        the autoscaler's node template and the training pod's default request all read it (0 without EFA)."""
        return efa_interfaces(self.instance_types) if self.efa else 0

    @property
    def labels(self) -> dict[str, str]:
        # The accelerator label lets the Cluster Autoscaler wait for the device plugin instead of scaling out again.
        accelerator = GPU_INSTANCE_TYPES[self.instance_types[0]].accelerator
        return {POOL_LABEL: self.name, PURPOSE_LABEL: self.purpose, ACCELERATOR_LABEL: accelerator}

    @property
    def taints(self) -> list[dict[str, str]]:
        return [dict(GPU_TAINT)]

    def describe(self) -> dict[str, Any]:
        """The pool as exported to tools and workloads (see infra.outputs.GPU_POOLS)."""
        return {
            "purpose": self.purpose,
            "instance_types": list(self.instance_types),
            "capacity_type": self.capacity_type,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "gpus_per_node": self.gpus_per_node,
            "efa": self.efa,
            "efa_interfaces_per_node": self.efa_interfaces_per_node,
            "labels": self.labels,
            "taints": self.taints,
        }

    @classmethod
    def from_values(cls, v: Values, purpose: Literal["training", "inference"]) -> GpuPool:
        types_key = f"{purpose}InstanceTypes"
        types = v[types_key]
        if not types:
            v.bad(types_key, "must list at least one GPU instance type")
        unknown = [t for t in types if t not in GPU_INSTANCE_TYPES]
        not_ec2 = [
            p for t in types if t in GPU_INSTANCE_TYPES and (p := _instance_type_problem(t, "ec2", "InstanceType"))
        ]
        if not_ec2:
            v.bad(types_key, "; ".join(not_ec2))
        elif unknown:
            v.bad(types_key, f"{', '.join(unknown)} not GPU instance types; allowed: {', '.join(GPU_INSTANCE_TYPES)}")
        elif len({GPU_INSTANCE_TYPES[t].gpus for t in types}) > 1:
            v.bad(types_key, "all instance types of a pool must have the same GPU count")
        elif len({GPU_INSTANCE_TYPES[t].gpu for t in types}) > 1:
            v.bad(
                types_key, f"all instance types of a pool must have the same GPU model (one {ACCELERATOR_LABEL} label)"
            )
        cap_key = f"{purpose}CapacityType"
        if v[cap_key] not in CAPACITY_TYPES:
            v.bad(cap_key, f"must be one of {', '.join(CAPACITY_TYPES)}")
        min_key, max_key = f"{purpose}MinSize", f"{purpose}MaxSize"
        if v[min_key] < 0:
            v.bad(min_key, "must be 0 or more")
        if v[max_key] < 1:
            v.bad(max_key, "must be at least 1")
        if v[min_key] > v[max_key]:
            v.bad(min_key, f"must not exceed {v.key(max_key)} ({v[max_key]})")
        training = purpose == "training"
        if training:
            cls._check_training_placement(v)
        return cls(
            name=purpose,
            purpose=purpose,
            instance_types=types,
            capacity_type=v[cap_key],
            min_size=v[min_key],
            max_size=v[max_key],
            disk_gb=v["gpuNodeDiskGb"],
            efa=v["trainingEfa"] if training else False,
            capacity_reservation_id=v["trainingCapacityReservationId"] if training else "",
            capacity_block=v["trainingCapacityBlock"] if training else False,
        )

    @staticmethod
    def _check_training_placement(v: Values) -> None:
        """The training pool's reservation, Capacity Block and EFA keys."""
        reservation = v["trainingCapacityReservationId"]
        if reservation and not _CAPACITY_RESERVATION_RE.match(reservation):
            v.bad("trainingCapacityReservationId", "not a capacity reservation ID (cr- followed by 8 to 17 hex digits)")
        if reservation and v["trainingCapacityType"] != "ON_DEMAND":
            v.bad(
                "trainingCapacityReservationId",
                f"a reservation is On-Demand capacity: set {v.key('trainingCapacityType')} ON_DEMAND",
            )
        if v["trainingCapacityBlock"] and not reservation:
            v.bad(
                "trainingCapacityBlock",
                f"a Capacity Block is used through its reservation: set {v.key('trainingCapacityReservationId')}",
            )
        if v["trainingCapacityBlock"] and len(v["trainingInstanceTypes"]) != 1:
            v.bad(
                "trainingCapacityBlock",
                f"a Capacity Block is for one instance type; list exactly one in {v.key('trainingInstanceTypes')}",
            )
        if v["trainingEfa"]:
            types = v["trainingInstanceTypes"]
            no_efa = [t for t in types if t in GPU_INSTANCE_TYPES and not GPU_INSTANCE_TYPES[t].efa]
            if no_efa:
                v.bad("trainingEfa", f"EFA is not supported by {', '.join(no_efa)}")


_ACCELERATED_FAMILY_RE = re.compile(r"^(p|g|inf|trn|dl|f|vt)\d")
"""EC2 families with GPUs, Inferentia/Trainium, FPGAs or video accelerators: not what a CPU batch pool is for."""
_GRAVITON_RE = re.compile(r"^[a-z]+\d+g")
"""Graviton (arm64) types: m7g, c7gn, r8g, im4gn... The batch nodes run the x86_64 AMI and the amd64 training image."""


@dataclass(frozen=True)
class BatchPool:
    """The CPU node group for batch work (data preparation): from zero nodes to batchMaxSize and back, tainted so
    that only batch pods land on it. Keys batchInstanceTypes, batchCapacityType, batchMaxSize, batchNodeDiskGb."""

    instance_types: tuple[str, ...]
    capacity_type: Literal["ON_DEMAND", "SPOT"]
    max_size: int
    disk_gb: int
    name: str = BATCH_POOL
    min_size: int = 0
    """Always 0: an idle batch pool costs nothing (ops/cost.py counts its minimum, which is none)."""

    @property
    def labels(self) -> dict[str, str]:
        return {POOL_LABEL: self.name}

    @property
    def taints(self) -> list[dict[str, str]]:
        return [dict(BATCH_TAINT)]

    def describe(self) -> dict[str, Any]:
        """The pool as exported to tools and workloads (see infra.outputs.BATCH_POOL)."""
        return {
            "name": self.name,
            "instance_types": list(self.instance_types),
            "capacity_type": self.capacity_type,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "labels": self.labels,
            "taints": self.taints,
        }

    @classmethod
    def from_values(cls, v: Values) -> BatchPool:
        types = v["batchInstanceTypes"]
        if not types:
            v.bad("batchInstanceTypes", "must list at least one CPU instance type (e.g. m7i.xlarge)")
        accelerated = [t for t in types if instance_gpu(t) is not None or _ACCELERATED_FAMILY_RE.match(t)]
        not_ec2 = [p for t in types if (p := _instance_type_problem(t, "ec2", "InstanceType"))]
        arm = [t for t in types if _GRAVITON_RE.match(t)]
        if not_ec2:
            v.bad("batchInstanceTypes", "; ".join(not_ec2))
        elif arm:
            v.bad(
                "batchInstanceTypes",
                f"{', '.join(arm)}: Graviton (arm64) types; batch nodes run the x86_64 AMI and the amd64 training "
                "image",
            )
        elif accelerated:
            v.bad(
                "batchInstanceTypes",
                f"{', '.join(accelerated)}: accelerated instance types; the batch pool is for CPU work (GPUs belong "
                f"to {v.key('trainingInstanceTypes')} / {v.key('inferenceInstanceTypes')})",
            )
        if v["batchCapacityType"] not in CAPACITY_TYPES:
            v.bad("batchCapacityType", f"must be one of {', '.join(CAPACITY_TYPES)}")
        if v["batchMaxSize"] < 1:
            v.bad("batchMaxSize", "must be at least 1 (the pool's minimum is 0; it costs nothing while idle)")
        if not 20 <= v["batchNodeDiskGb"] <= 16384:
            v.bad("batchNodeDiskGb", "must be between 20 and 16384 GiB")
        return cls(
            instance_types=tuple(types),
            capacity_type=v["batchCapacityType"],
            max_size=v["batchMaxSize"],
            disk_gb=v["batchNodeDiskGb"],
        )


@dataclass(frozen=True)
class ClusterConfig:
    """The EKS cluster and its node pools (infra/cluster.py), and where its Kubernetes layer is applied from
    (infra/access.py): kubernetesVersion, serviceCidr, controlPlaneLogRetentionDays, clusterAdminArns,
    publicApiEndpoint, publicApiCidrs, kubernetesDeployer, deployerRepository, systemInstanceType, systemNodeCount,
    systemCapacityType, gpuNodeDiskGb, maxGpus, the GPU pools' keys (GpuPool) and the batch pool's (BatchPool)."""

    kubernetes_version: str
    service_cidr: str
    control_plane_log_retention_days: int
    admin_arns: tuple[str, ...]
    public_api_endpoint: bool
    public_api_cidrs: tuple[str, ...]
    system_instance_type: str
    system_node_count: int
    gpu_pools: tuple[GpuPool, ...]
    max_gpus: int
    deployer: Literal["in-vpc-runner", "public-allowlist"] = "in-vpc-runner"
    """Where the Kubernetes layer is applied from (infra/access.py)."""
    deployer_repository: str = ""
    """GitHub repository whose workflow jobs the in-VPC runner takes."""
    system_capacity_type: Literal["ON_DEMAND", "SPOT"] = "ON_DEMAND"
    """systemCapacityType: SPOT only where controllers may move (dev)."""
    batch_pool: BatchPool = BatchPool(("m7i.xlarge",), "ON_DEMAND", 4, 100)
    """The CPU batch pool (BatchPool); the stack's own from its batch* keys."""

    def pool(self, purpose: str) -> GpuPool:
        return next(p for p in self.gpu_pools if p.purpose == purpose)

    @classmethod
    def from_values(cls, v: Values) -> ClusterConfig:
        try:
            services = ipaddress.ip_network(v["serviceCidr"], strict=True)
            if services.version != 4 or not 12 <= services.prefixlen <= 24 or not services.is_private:
                v.bad("serviceCidr", "must be a private IPv4 CIDR between /12 and /24")
            elif (vpc := _network_or_none(v["vpcCidr"])) is not None and services.overlaps(vpc):
                v.bad(
                    "serviceCidr",
                    f"overlaps {v.key('vpcCidr')} ({v['vpcCidr']}); pick a disjoint range such as 172.20.0.0/16",
                )
        except ValueError as exc:
            v.bad("serviceCidr", f"not a valid CIDR ({exc})")
        v.retention("controlPlaneLogRetentionDays")
        if v["kubernetesVersion"] not in SUPPORTED_KUBERNETES:
            v.bad("kubernetesVersion", f"must be one of {', '.join(SUPPORTED_KUBERNETES)}")
        cls._check_api_access(v)
        if not _INSTANCE_RE.match(v["systemInstanceType"]):
            v.bad("systemInstanceType", "not an EC2 instance type name (e.g. m7i.large)")
        elif problem := _instance_type_problem(v["systemInstanceType"], "ec2", "InstanceType"):
            v.bad("systemInstanceType", problem)
        if v["systemNodeCount"] < 2:
            v.bad("systemNodeCount", "must be at least 2 so cluster controllers survive a node loss")
        if v["systemCapacityType"] not in CAPACITY_TYPES:
            v.bad("systemCapacityType", f"must be one of {', '.join(CAPACITY_TYPES)}")
        if not 20 <= v["gpuNodeDiskGb"] <= 16384:
            v.bad("gpuNodeDiskGb", "must be between 20 and 16384 GiB")
        pools = (GpuPool.from_values(v, "training"), GpuPool.from_values(v, "inference"))
        batch = BatchPool.from_values(v)
        return cls(
            kubernetes_version=v["kubernetesVersion"],
            service_cidr=v["serviceCidr"],
            control_plane_log_retention_days=v["controlPlaneLogRetentionDays"],
            admin_arns=v["clusterAdminArns"],
            public_api_endpoint=v["publicApiEndpoint"],
            public_api_cidrs=v["publicApiCidrs"],
            system_instance_type=v["systemInstanceType"],
            system_node_count=v["systemNodeCount"],
            gpu_pools=pools,
            max_gpus=v["maxGpus"],
            deployer=v["kubernetesDeployer"],
            deployer_repository=v["deployerRepository"],
            system_capacity_type=v["systemCapacityType"],
            batch_pool=batch,
        )

    @staticmethod
    def _check_api_access(v: Values) -> None:
        """Who reaches the Kubernetes API, and from where: admins, the public endpoint's allowlist, the deployer."""
        for arn in v["clusterAdminArns"]:
            if not _ARN_RE.match(arn):
                v.bad_item("clusterAdminArns", arn, "not an IAM role or user ARN")
        if not any(":role/" in arn for arn in v["clusterAdminArns"]):
            v.bad(
                "clusterAdminArns",
                "must name at least one IAM role besides the identity that creates the cluster (break-glass: when the "
                "deploy role is deleted, recreated or rotated, nobody else could reach the cluster; "
                "docs/first-deploy.md#recovering-cluster-access)",
            )
        if v["kubernetesDeployer"] not in DEPLOYERS:
            v.bad("kubernetesDeployer", f"must be one of {', '.join(DEPLOYERS)}")
        elif v["kubernetesDeployer"] == "public-allowlist" and not v["publicApiEndpoint"]:
            v.bad(
                "kubernetesDeployer",
                f"public-allowlist needs {v.key('publicApiEndpoint')} = true (and publicApiCidrs); with a private-only "
                "endpoint use in-vpc-runner",
            )
        elif v["kubernetesDeployer"] == "in-vpc-runner" and not _GITHUB_REPO_RE.match(v["deployerRepository"]):
            v.bad(
                "deployerRepository",
                "the in-VPC runner needs the GitHub repository it serves, as https://github.com/OWNER/REPO "
                "(the deploy workflow passes its own)",
            )
        if v["publicApiEndpoint"] and not v["publicApiCidrs"]:
            v.bad(
                "publicApiEndpoint", "a public API endpoint needs publicApiCidrs (an allowlist); 0.0.0.0/0 is refused"
            )
        allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for cidr in v["publicApiCidrs"]:
            try:
                net = ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                v.bad_item("publicApiCidrs", cidr, f"not a valid CIDR ({exc})")
                continue
            if net.prefixlen == 0:
                v.bad_item("publicApiCidrs", cidr, "the whole internet is not an allowlist")
            elif (why := non_routable(net)) is not None:
                v.bad_item("publicApiCidrs", cidr, f"{why}, so no deployer can connect from it; {EGRESS_HINT}")
            for other in allowed:
                if net.version == other.version and net.overlaps(other):
                    v.problems.append(
                        f"{v.key('publicApiCidrs')} contains {cidr!r}, which overlaps '{other}': list each range once"
                    )
            allowed.append(net)


def _network_or_none(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        return None


def _check_gpu_capacity(v: Values, cluster: ClusterConfig) -> None:
    """maxGpus against the pools, and servingGpusPerReplica against an inference node. Both read the pools'
    instance types and sizes, so they run only once those (and every key before them) are valid."""
    gpus = sum(pool.max_gpus for pool in cluster.gpu_pools)
    if gpus > v["maxGpus"]:
        v.bad("maxGpus", f"the GPU pools can reach {gpus} GPUs at their maximum sizes; raise maxGpus or lower them")
    inference_gpus = cluster.pool("inference").gpus_per_node
    if v["servingGpusPerReplica"] > inference_gpus:
        v.bad("servingGpusPerReplica", f"an inference node has only {inference_gpus} GPU(s)")


@dataclass(frozen=True)
class ServingConfig:
    """Serving on EKS (infra/serving_eks.py) and SageMaker (infra/sagemaker_endpoint.py): the serving* keys but the
    autoscaling ones (AutoscalingConfig) and servingImageDigest (ImagesConfig), the sagemaker* keys but
    sagemakerLatencyP90Ms (ObservabilityConfig)."""

    on_eks: bool
    on_sagemaker: bool
    image_tag: str
    model_prefix: str
    engine: Literal["builtin", "vllm"]
    model_shape: str
    """Key of infra.vllm_sizing.MODEL_SHAPES vLLM is sized for; empty: derived from model_prefix."""
    replicas: int
    max_replicas: int
    gpus_per_replica: int
    ingress: bool
    sagemaker_instance_type: str
    sagemaker_min_instances: int
    sagemaker_max_instances: int
    sagemaker_invocations_per_instance: int
    sagemaker_autoscaling: bool = True
    quantization: str = "none"  # servingQuantization (serving/quantize.py)

    @property
    def artifacts_configured(self) -> bool:
        """Image tag and model both set: the first-run lifecycle's gate for declaring any serving workload."""
        return bool(self.image_tag and self.model_prefix)

    @property
    def eks_declared(self) -> bool:
        return self.on_eks and self.artifacts_configured

    @property
    def sagemaker_declared(self) -> bool:
        return self.on_sagemaker and self.artifacts_configured

    @classmethod
    def from_values(cls, v: Values) -> ServingConfig:
        if v["servingGpusPerReplica"] < 1:
            v.bad("servingGpusPerReplica", "must be at least 1")
        if v["servingEngine"] not in ENGINES:
            v.bad("servingEngine", f"must be one of {', '.join(ENGINES)}")
        elif v["servingQuantization"] not in QUANTIZATIONS[v["servingEngine"]]:
            choices = ", ".join(QUANTIZATIONS[v["servingEngine"]])
            v.bad("servingQuantization", f"must be one of {choices} with servingEngine {v['servingEngine']}")
        elif v["servingEngine"] == "builtin" and v["servingQuantization"] == "int8":
            # The built-in engine's int8 is CPU-only (serving/config.py refuses it on cuda: torchao's eager int8 is
            # slower than bfloat16 there). EKS serving always runs on the GPU pool; SageMaker on a GPU instance too.
            gpu_targets = [k for k, on in (("servingOnEks", v["servingOnEks"]),) if on]
            if v["servingOnSagemaker"] and instance_gpu(v["sagemakerInstanceType"]) is not None:
                gpu_targets.append(f"servingOnSagemaker ({v['sagemakerInstanceType']})")
            if gpu_targets:
                v.bad(
                    "servingQuantization",
                    f"int8 with the builtin engine is CPU-only, but {' and '.join(gpu_targets)} runs on a GPU: use "
                    "'none', or servingEngine vllm with a quantized checkpoint (fp8, awq, gptq)",
                )
        if v["servingModelShape"] and v["servingModelShape"] not in MODEL_SHAPES:
            v.bad("servingModelShape", f"must be empty or one of {', '.join(MODEL_SHAPES)}")
        # Empty tag or model: serving is not declared yet (first-run lifecycle, docs/first-deploy.md).
        tag, prefix = v["servingImageTag"], v["servingModelPrefix"]
        if tag and (not _TAG_RE.match(tag) or tag == "latest"):
            v.bad("servingImageTag", "must be a valid, immutable image tag (not 'latest')")
        if prefix and (not _PREFIX_RE.match(prefix) or ".." in prefix):
            v.bad("servingModelPrefix", "must be a relative S3 key prefix such as models/llama-3-8b")
        if v["servingReplicas"] < 1:
            v.bad("servingReplicas", "must be at least 1")
        if v["servingReplicas"] > v["servingMaxReplicas"]:
            v.bad("servingReplicas", f"must not exceed {v.key('servingMaxReplicas')} ({v['servingMaxReplicas']})")
        if v["servingIngress"] and not v["servingOnEks"]:
            v.bad("servingIngress", "an Ingress needs servingOnEks: true")
        if not _SAGEMAKER_INSTANCE_RE.match(v["sagemakerInstanceType"]):
            v.bad("sagemakerInstanceType", "not a SageMaker instance type (e.g. ml.g5.xlarge)")
        elif problem := _instance_type_problem(
            v["sagemakerInstanceType"], "sagemaker", "ProductionVariantInstanceType"
        ):
            v.bad("sagemakerInstanceType", problem)
        if v["sagemakerMinInstances"] < 1:
            v.bad("sagemakerMinInstances", "must be at least 1 (real-time endpoints cannot scale to zero)")
        if v["sagemakerMinInstances"] > v["sagemakerMaxInstances"]:
            v.bad(
                "sagemakerMinInstances",
                f"must not exceed {v.key('sagemakerMaxInstances')} ({v['sagemakerMaxInstances']})",
            )
        if v["sagemakerInvocationsPerInstance"] < 1:
            v.bad("sagemakerInvocationsPerInstance", "must be at least 1")
        return cls(
            on_eks=v["servingOnEks"],
            on_sagemaker=v["servingOnSagemaker"],
            image_tag=tag,
            model_prefix=prefix.strip("/"),
            engine=v["servingEngine"],
            model_shape=v["servingModelShape"],
            replicas=v["servingReplicas"],
            max_replicas=v["servingMaxReplicas"],
            gpus_per_replica=v["servingGpusPerReplica"],
            ingress=v["servingIngress"],
            sagemaker_instance_type=v["sagemakerInstanceType"],
            sagemaker_min_instances=v["sagemakerMinInstances"],
            sagemaker_max_instances=v["sagemakerMaxInstances"],
            sagemaker_invocations_per_instance=v["sagemakerInvocationsPerInstance"],
            sagemaker_autoscaling=v["sagemakerAutoscaling"],
            quantization=v["servingQuantization"],
        )

    @staticmethod
    def check_fit(v: Values) -> None:
        """vLLM must fit the model on the instances the stack serves from (infra/vllm_sizing.py). It reads the pool,
        instance-type and serving keys, so it runs last, once every other key is valid."""
        v.problems.extend(check_serving_fit(v.values, v.project))


@dataclass(frozen=True)
class AutoscalingConfig:
    """GPU node autoscaling (Cluster Autoscaler), spot interruption handling and serving autoscaling
    (infra/cluster_autoscaler.py, spot_interruptions.py, serving_autoscaling.py)."""

    cluster_autoscaler_version: str
    scale_down_unneeded_minutes: int
    spot_interruption_handler: bool
    node_termination_handler_version: str
    serving_autoscaler: Literal["cpu", "keda"]
    serving_target_inflight_per_replica: int
    serving_scale_to_zero: bool
    serving_active_hours_start: str
    serving_active_hours_end: str
    serving_active_hours_timezone: str

    @classmethod
    def from_values(cls, v: Values) -> AutoscalingConfig:
        kubernetes = v["kubernetesVersion"]
        if v["clusterAutoscalerVersion"] == "":
            # Follows kubernetesVersion (infra/versions.py).
            if kubernetes not in CLUSTER_AUTOSCALER:
                v.bad("clusterAutoscalerVersion", f"infra/versions.py pins none for Kubernetes {kubernetes}; set one")
        elif not _VERSION_RE.match(v["clusterAutoscalerVersion"]):
            v.version("clusterAutoscalerVersion")
        elif ".".join(v["clusterAutoscalerVersion"].split(".")[:2]) != kubernetes:
            v.bad(
                "clusterAutoscalerVersion",
                f"its minor version must equal {v.key('kubernetesVersion')} ({kubernetes}); "
                f"use {kubernetes}.x (the autoscaler only supports its own Kubernetes minor)",
            )
        v.version("nodeTerminationHandlerVersion")
        if not 1 <= v["scaleDownUnneededMinutes"] <= 120:
            v.bad("scaleDownUnneededMinutes", "must be between 1 and 120")
        if v["servingAutoscaler"] not in SERVING_AUTOSCALERS:
            v.bad("servingAutoscaler", f"must be one of {', '.join(SERVING_AUTOSCALERS)}")
        elif v["servingAutoscaler"] == "keda" and v["metrics"] != "in-cluster":
            v.bad(
                "servingAutoscaler", f"keda reads the in-cluster Prometheus; it needs {v.key('metrics')} = in-cluster"
            )
        if v["servingTargetInflightPerReplica"] < 1:
            v.bad("servingTargetInflightPerReplica", "must be at least 1")
        if v["servingScaleToZero"] and v["servingAutoscaler"] != "keda":
            v.bad(
                "servingScaleToZero",
                f"scale to zero needs {v.key('servingAutoscaler')} = keda (an HPA cannot reach 0)",
            )
        for key in ("servingActiveHoursStart", "servingActiveHoursEnd"):
            if not _CRON_RE.match(v[key]):
                v.bad(key, "must be a 5-field cron expression such as '0 8 * * 1-5'")
        if not re.fullmatch(r"UTC|[A-Za-z_]+(/[A-Za-z0-9_+-]+)+", v["servingActiveHoursTimezone"]):
            v.bad("servingActiveHoursTimezone", "must be UTC or an IANA time zone such as Europe/Berlin")
        return cls(
            # An unpinned Kubernetes version was reported above; the section is not used then.
            cluster_autoscaler_version=v["clusterAutoscalerVersion"]
            or (cluster_autoscaler_for(kubernetes) if kubernetes in CLUSTER_AUTOSCALER else ""),
            scale_down_unneeded_minutes=v["scaleDownUnneededMinutes"],
            spot_interruption_handler=v["spotInterruptionHandler"],
            node_termination_handler_version=v["nodeTerminationHandlerVersion"],
            serving_autoscaler=v["servingAutoscaler"],
            serving_target_inflight_per_replica=v["servingTargetInflightPerReplica"],
            serving_scale_to_zero=v["servingScaleToZero"],
            serving_active_hours_start=v["servingActiveHoursStart"],
            serving_active_hours_end=v["servingActiveHoursEnd"],
            serving_active_hours_timezone=v["servingActiveHoursTimezone"],
        )


@dataclass(frozen=True)
class ObservabilityConfig:
    """Metrics pipeline (Prometheus, DCGM exporter) and alerting (infra/observability.py, alarms.py): metrics,
    prometheusVersion, prometheusRetentionDays, dcgmExporterVersion, alertEmails, sagemakerLatencyP90Ms."""

    metrics: Literal["amp", "in-cluster", "none"]
    prometheus_version: str
    prometheus_retention_days: int
    dcgm_exporter_version: str
    alert_emails: tuple[str, ...]
    sagemaker_latency_p90_ms: int

    @classmethod
    def from_values(cls, v: Values) -> ObservabilityConfig:
        v.version("prometheusVersion")
        if v["metrics"] not in METRICS_MODES:
            v.bad("metrics", f"must be one of {', '.join(METRICS_MODES)}")
        if not 1 <= v["prometheusRetentionDays"] <= 90:
            v.bad("prometheusRetentionDays", "must be between 1 and 90")
        # NVIDIA's tags are <DCGM>-<exporter>-<flavour>; the chart's default flavour is distroless from 4.5 on.
        if not re.fullmatch(
            r"\d+\.\d+\.\d+-\d+\.\d+\.\d+-(ubuntu\d+\.\d+|ubi\d+|distroless)", v["dcgmExporterVersion"]
        ):
            v.bad("dcgmExporterVersion", "must be a dcgm-exporter tag such as 4.5.3-4.8.2-distroless")
        for email in v["alertEmails"]:
            if not _EMAIL_RE.match(email):
                v.bad_item("alertEmails", email, "not an e-mail address")
        if v["sagemakerLatencyP90Ms"] < 1:
            v.bad("sagemakerLatencyP90Ms", "must be at least 1")
        return cls(
            metrics=v["metrics"],
            prometheus_version=v["prometheusVersion"],
            prometheus_retention_days=v["prometheusRetentionDays"],
            dcgm_exporter_version=v["dcgmExporterVersion"],
            alert_emails=v["alertEmails"],
            sagemaker_latency_p90_ms=v["sagemakerLatencyP90Ms"],
        )


@dataclass(frozen=True)
class BudgetConfig:
    """Spend controls (infra/budgets.py): monthlyBudgetUsd, the stack's monthly cost budget (tag activation is
    account-level: ops/account.py)."""

    monthly_usd: int

    @classmethod
    def from_values(cls, v: Values) -> BudgetConfig:
        if v["monthlyBudgetUsd"] < 1:
            v.bad("monthlyBudgetUsd", "must be at least 1 (every stack has a budget)")
        return cls(monthly_usd=v["monthlyBudgetUsd"])


@dataclass(frozen=True)
class ImagesConfig:
    """Image digests (`sha256:<64 hex>`); empty when the stack references images by tag: servingImageDigest,
    trainingImageDigest."""

    serving_digest: str = ""
    training_digest: str = ""

    @classmethod
    def from_values(cls, v: Values) -> ImagesConfig:
        """Digests well-formed, and present where production serves."""
        for key in ("servingImageDigest", "trainingImageDigest"):
            if v[key] and not _DIGEST_RE.match(v[key]):
                v.bad(key, "must be an image digest sha256:<64 lowercase hex digits>")
        serves = v["servingImageTag"] and (v["servingOnEks"] or v["servingOnSagemaker"])
        if v["production"] and serves and not v["servingImageDigest"]:
            v.problems.append(
                f"{v.key('servingImageDigest')} is not set: a production stack references its serving image by digest "
                f"(the one ECR reports for {v.key('servingImageTag')} = {v['servingImageTag']!r})"
            )
        return cls(serving_digest=v["servingImageDigest"], training_digest=v["trainingImageDigest"])


ACCESS_LEVELS = ("admin", "ml-engineer", "viewer")
"""What a team may do (infra/teams.py maps each level to EKS access policies, RBAC and IAM)."""
_TEAM_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_TEAM_FIELDS = {"name", "access", "namespaces", "iamRoleArns"}


@dataclass(frozen=True)
class Team:
    """People who share an access level: their IAM roles (SSO permission-set roles, federated roles) and the
    namespaces their Kubernetes rights apply to."""

    name: str
    access: Literal["admin", "ml-engineer", "viewer"]
    namespaces: tuple[str, ...]
    role_arns: tuple[str, ...]


@dataclass(frozen=True)
class TeamsConfig:
    """Human access by role (infra/teams.py, infra/team_rbac.py): teams, one JSON object per item,
    `{"name", "access": admin|ml-engineer|viewer, "namespaces": [...], "iamRoleArns": [...]}`."""

    teams: tuple[Team, ...] = ()

    @classmethod
    def from_values(cls, v: Values) -> TeamsConfig:
        teams: list[Team] = []
        seen_arns = set(v["clusterAdminArns"])
        for item in v["teams"]:
            team = cls._team(v, item)
            if team is None:
                continue
            if team.name in {t.name for t in teams}:
                v.bad_item("teams", item, f"a second team named {team.name!r}")
            # EKS allows one access entry per principal: a role is in one team (and not a cluster admin).
            for arn in set(team.role_arns) & seen_arns:
                v.bad_item("teams", item, f"{arn} is already in another team or in {v.key('clusterAdminArns')}")
            seen_arns |= set(team.role_arns)
            teams.append(team)
        return cls(tuple(teams))

    @staticmethod
    def _team(v: Values, item: str) -> Team | None:
        namespaces = (TRAINING_NAMESPACE, SERVING_NAMESPACE, MONITORING_NAMESPACE)
        try:
            raw = json.loads(item)
        except json.JSONDecodeError:
            raw = None
        if not isinstance(raw, dict) or set(raw) != _TEAM_FIELDS:
            v.bad_item(
                "teams", item, f"must be a JSON object with exactly the fields {', '.join(sorted(_TEAM_FIELDS))}"
            )
            return None
        problems = len(v.problems)
        if not isinstance(raw["name"], str) or not _TEAM_NAME_RE.match(raw["name"]):
            v.bad_item("teams", item, "name must be lowercase letters, digits and dashes (at most 31)")
        if raw["access"] not in ACCESS_LEVELS:
            v.bad_item("teams", item, f"access must be one of {', '.join(ACCESS_LEVELS)}")
        ns = raw["namespaces"]
        if not isinstance(ns, list) or not ns or any(n not in namespaces for n in ns):
            v.bad_item("teams", item, f"namespaces must list one or more of {', '.join(namespaces)}")
        elif raw["access"] == "ml-engineer" and TRAINING_NAMESPACE not in ns:
            v.bad_item("teams", item, f"an ml-engineer team launches jobs in {TRAINING_NAMESPACE}: list it")
        arns = raw["iamRoleArns"]
        if not isinstance(arns, list) or not arns or not all(isinstance(a, str) and _ARN_RE.match(a) for a in arns):
            v.bad_item(
                "teams", item, "iamRoleArns must list one or more IAM role ARNs (arn:aws:iam::<account>:role/...)"
            )
        elif any(":user/" in a for a in arns):
            v.bad_item("teams", item, "iamRoleArns must be roles (people assume them), not IAM users")
        if len(v.problems) > problems:
            return None
        return Team(raw["name"], raw["access"], tuple(dict.fromkeys(ns)), tuple(dict.fromkeys(arns)))


LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
"""S3 Object Lock retention modes of the audit trail's bucket (S3 user guide, "Object Lock retention modes")."""


@dataclass(frozen=True)
class ProtectionConfig:
    """Audit trail and backup (infra/audit.py, infra/backup.py): auditTrail, auditS3DataEvents, auditLockMode,
    auditRetentionDays, backupReplicaRegion."""

    audit_trail: bool
    """A CloudTrail trail (management events, S3 data events on datasets and models) into an Object Lock bucket."""
    audit_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"]
    audit_retention_days: int
    """Days every trail log file is locked (and kept) for."""
    backup_replica_region: str
    """Region the models and checkpoints buckets replicate to; empty for no replication."""
    audit_s3_data_events: bool = True
    """The trail also records S3 data events on the datasets and models buckets (auditS3DataEvents)."""

    @classmethod
    def from_values(cls, v: Values) -> ProtectionConfig:
        if v["auditLockMode"] not in LOCK_MODES:
            v.bad("auditLockMode", f"must be one of {', '.join(LOCK_MODES)}")
        if not 1 <= v["auditRetentionDays"] <= 3653:
            v.bad("auditRetentionDays", "must be between 1 and 3653 days (ten years)")
        replica = v["backupReplicaRegion"]
        if replica and not _REGION_RE.match(replica):
            v.bad("backupReplicaRegion", "not an AWS region name (expected e.g. us-west-2)")
        elif replica and replica == v.region:
            v.bad(
                "backupReplicaRegion", "must differ from aws:region (a replica in the same region survives no outage)"
            )
        if v["production"]:
            # Production's recovery and audit guarantees are not optional (docs/operations.md, RPO/RTO).
            if not v["auditTrail"]:
                v.bad("auditTrail", "must be true when production is true")
            if not v["auditS3DataEvents"]:
                v.bad("auditS3DataEvents", "must be true when production is true (who read or deleted a model)")
            if v["auditLockMode"] != "COMPLIANCE":
                v.bad("auditLockMode", "must be COMPLIANCE when production is true (no one can shorten the lock)")
            if not replica:
                v.bad("backupReplicaRegion", "must name a second region when production is true")
        return cls(
            audit_trail=v["auditTrail"],
            audit_lock_mode=v["auditLockMode"],
            audit_retention_days=v["auditRetentionDays"],
            backup_replica_region=replica,
            audit_s3_data_events=v["auditS3DataEvents"],
        )


@dataclass(frozen=True)
class StackConfig:
    """One stack's whole configuration: its identity (project, stack, region, environment, production) and one
    section per concern. The program hands each component only the sections it reads."""

    project: str
    stack: str
    region: str
    environment: str
    production: bool
    network: NetworkConfig
    storage: StorageConfig
    cluster: ClusterConfig
    serving: ServingConfig
    autoscaling: AutoscalingConfig
    observability: ObservabilityConfig
    budget: BudgetConfig
    images: ImagesConfig = ImagesConfig()
    protection: ProtectionConfig = ProtectionConfig(False, "GOVERNANCE", 1, "")
    teams: TeamsConfig = TeamsConfig()

    @property
    def name_prefix(self) -> str:
        """Prefix of physical names: short, unique per stack, valid for S3/ECR/EKS/SageMaker names."""
        return f"llmp-{self.stack}".lower()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_stack_file(stack: str, path: Path | None = None) -> tuple[dict[str, Any], str]:
    """Read `stacks/Pulumi.<stack>.yaml` (or `path`) and return its `config` mapping and a display name."""
    path = path or STACKS_DIR / f"Pulumi.{stack}.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(str(path), [f"stack config file not found: {path}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError(str(path), ["'config' must be a mapping of keys to values"])
    return config, str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def load_stack(stack: str = "dev", /, path: Path | None = None, **overrides: Any) -> StackConfig:
    """A stack file's validated config, with overrides by key (`trainingEfa=True`; the project prefix is implied)."""
    values, source = load_stack_file(stack, path)
    project = project_name()
    values.update({(k if ":" in k else f"{project}:{k}"): v for k, v in overrides.items()})
    return load_config(values, stack, source)


def load_config(values: Mapping[str, Any], stack: str, source: str = "stack config") -> StackConfig:
    """Validate raw config values (`<namespace>:<key>` -> value, as Pulumi supplies them) into a StackConfig.

    Values may be native (from a YAML stack file) or strings (from the Pulumi engine, which passes every value as
    a string and structured values as JSON): both are accepted.
    """
    project = project_name()
    typed, problems = _typed_values(values, project)
    region = values.get("aws:region")
    if region is None:
        problems.append("aws:region: required key is missing (the AWS region to deploy to, e.g. us-east-1)")
    elif not isinstance(region, str) or not _REGION_RE.match(region):
        problems.append(f"aws:region = {region!r}: not an AWS region name (expected e.g. us-east-1)")
    if problems:
        # Type errors make the sections' rules meaningless; report them first.
        raise ConfigError(source, problems)

    v = Values(typed, project, region if isinstance(region, str) else None)
    environment = _check_environment(v)
    network = NetworkConfig.from_values(v)
    storage = StorageConfig.from_values(v)
    cluster = ClusterConfig.from_values(v)
    if not v.problems:
        _check_gpu_capacity(v, cluster)
    serving = ServingConfig.from_values(v)
    autoscaling = AutoscalingConfig.from_values(v)
    observability = ObservabilityConfig.from_values(v)
    budget = BudgetConfig.from_values(v)
    images = ImagesConfig.from_values(v)
    protection = ProtectionConfig.from_values(v)
    teams = TeamsConfig.from_values(v)
    if not v.problems:
        ServingConfig.check_fit(v)
    if v.problems:
        raise ConfigError(source, v.problems)
    return StackConfig(
        project=project,
        stack=stack,
        region=str(region),
        environment=environment,
        production=v["production"],
        network=network,
        storage=storage,
        cluster=cluster,
        serving=serving,
        autoscaling=autoscaling,
        observability=observability,
        budget=budget,
        images=images,
        protection=protection,
        teams=teams,
    )


def _typed_values(values: Mapping[str, Any], project: str) -> tuple[dict[str, Any], list[str]]:
    """Every declared key's value (the stack's, coerced to its declared type, else the default), and the problems:
    unknown, removed, missing or mistyped keys."""
    keys = schema()
    problems: list[str] = []
    raw: dict[str, Any] = {}
    for full_key, value in values.items():
        namespace, _, key = full_key.partition(":")
        if namespace != project:
            continue
        if key in REMOVED_KEYS:
            problems.append(f"{full_key}: no longer a stack setting; {REMOVED_KEYS[key]}")
            continue
        if key not in keys:
            close = [k for k in keys if k.lower() == key.lower()]
            hint = f" (did you mean '{project}:{close[0]}'?)" if close else ""
            problems.append(f"{full_key}: unknown key{hint}; the keys are declared in Pulumi.yaml")
            continue
        raw[key] = value

    typed: dict[str, Any] = {}
    for key, spec in keys.items():
        full = f"{project}:{key}"
        if key not in raw:
            if spec.required:
                problems.append(f"{full}: required key is missing ({spec.description})")
            typed[key] = spec.default
            continue
        try:
            typed[key] = _coerce(raw[key], spec)
        except ValueError as exc:
            problems.append(f"{full} = {raw[key]!r}: {exc}")
            typed[key] = spec.default
    return typed, problems


def _coerce(value: Any, spec: ConfigKey) -> Any:
    if spec.type == "string":
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value
    if spec.type == "integer":
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        raise ValueError("must be an integer")
    if spec.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in ("true", "false"):
            return value == "true"
        raise ValueError("must be true or false")
    if spec.type == "array":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("must be a list") from None
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise ValueError(f"must be a list of {spec.items}s")
        return tuple(value)
    raise ValueError(f"Pulumi.yaml declares an unsupported type {spec.type!r}")


_NON_ROUTABLE = (
    # Ranges no deployer's traffic reaches a public endpoint from (IANA special-purpose registries, RFC 6890).
    (ipaddress.ip_network("192.0.2.0/24"), "a documentation range (RFC 5737 TEST-NET-1)"),
    (ipaddress.ip_network("198.51.100.0/24"), "a documentation range (RFC 5737 TEST-NET-2)"),
    (ipaddress.ip_network("203.0.113.0/24"), "a documentation range (RFC 5737 TEST-NET-3)"),
    (ipaddress.ip_network("2001:db8::/32"), "a documentation range (RFC 3849)"),
    (ipaddress.ip_network("198.18.0.0/15"), "a benchmarking range (RFC 2544)"),
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT space (RFC 6598)"),
)


def non_routable(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
    """Why traffic to a public EKS endpoint can never come from `net` (None when it can): the endpoint sees the
    deployer's public source address, so private, documentation, loopback, link-local and reserved ranges never
    match (EKS cluster endpoint docs: publicAccessCidrs are matched against the client's public IP)."""
    for special, why in _NON_ROUTABLE:
        if net.version == special.version and net.overlaps(special):
            return why
    if net.is_private:
        return "a private range (RFC 1918 / RFC 4193); the public endpoint sees your public egress address"
    if net.is_loopback or net.is_link_local or net.is_multicast or net.is_reserved or net.is_unspecified:
        return "not a routable public range"
    if not net.is_global:
        return "not a globally routable range"
    return None


def from_pulumi() -> StackConfig:
    """Load the running program's config (real engine or mocks). Raises ConfigError before any resource exists."""
    import pulumi
    from pulumi.runtime import config as runtime_config

    from infra.layers import environment_of

    values = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    # Both layers of an environment (`<env>`, `<env>-cluster`; infra/layers.py) read its one stack file and are
    # validated, named and tagged as that environment.
    return load_config(values, environment_of(pulumi.get_stack()), source=f"stack '{pulumi.get_stack()}'")
