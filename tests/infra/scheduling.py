"""The scheduling oracle the contract tests use: can the Cluster Autoscaler grow some pool so that a pod fits?

It checks what decides it for real - taints vs tolerations, nodeSelector and required node affinity vs the labels
nodes of the pool carry, requests vs every instance type's allocatable (extended resources only where a device plugin
advertises them), and a non-zero max size - from the same config objects and instance-type table the program builds
the node groups from. Test-only: nothing in the program schedules pods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from facts.cluster import POOL_LABEL
from facts.instance_types import GPU_INSTANCE_TYPES
from infra.config import GpuPool

GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"

KUBE_RESERVED_MEMORY_MIB_PER_POD = 11
MAX_PODS = 110
DAEMONSET_CPU = 0.5
DAEMONSET_MEMORY_MIB = 1024
"""What every GPU node runs before a workload arrives (VPC CNI, kube-proxy, Pod Identity agent, NVIDIA device
plugin, DCGM exporter): a deliberately generous bound, so the contract fails before a real node would."""


def allocatable(instance_type: str, efa: bool = False) -> dict[str, float]:
    """What a pod can request on an empty node of this type: EKS AL2023's kube-reserved formula (CPU: 6% of the
    first core, 1% of the second, 0.5% of the next two, 0.25% of the rest; memory: 255 MiB + 11 MiB per pod at 110
    pods, plus a 100 MiB eviction threshold) minus the DaemonSets' share."""
    it = GPU_INSTANCE_TYPES[instance_type]
    cores = it.vcpus
    reserved_cpu = 0.06 + 0.01 * (cores > 1) + 0.005 * max(0, min(cores, 4) - 2) + 0.0025 * max(0, cores - 4)
    reserved_mem = 255 + KUBE_RESERVED_MEMORY_MIB_PER_POD * MAX_PODS + 100
    return {
        "cpu": cores - reserved_cpu - DAEMONSET_CPU,
        "memory": it.memory_gib * 1024 * 1024 * 1024 - (reserved_mem + DAEMONSET_MEMORY_MIB) * 1024 * 1024,
        GPU_RESOURCE: float(it.gpus),
        # The launch template attaches every EFA interface the type has (facts.instance_types), on EFA pools only.
        EFA_RESOURCE: float(it.efa_interfaces if efa else 0),
    }


_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}  # fmt: skip


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "16Gi", 2) as a number of base units."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if text.endswith(suffix) and text[: -len(suffix)]:
            return float(text[: -len(suffix)]) * _SUFFIX[suffix]
    return float(text)


def pod_requests(pod_spec: Mapping[str, Any]) -> dict[str, float]:
    """Effective requests like the scheduler computes them: the sum over containers, or the largest init container
    if that is bigger; a limit without a request counts as the request."""

    def of(container: Mapping[str, Any]) -> dict[str, float]:
        res = container.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {k: quantity(v) for k, v in merged.items()}

    total: dict[str, float] = {}
    for c in pod_spec.get("containers") or []:
        for k, v in of(c).items():
            total[k] = total.get(k, 0.0) + v
    for c in pod_spec.get("initContainers") or []:
        for k, v in of(c).items():
            total[k] = max(total.get(k, 0.0), v)
    return total


def _tolerated(taint: Mapping[str, str], tolerations: Sequence[Mapping[str, Any]]) -> bool:
    for t in tolerations:
        op = t.get("operator", "Equal")
        key_ok = t.get("key") == taint["key"] or (not t.get("key") and op == "Exists")
        value_ok = op == "Exists" or t.get("value", "") == taint.get("value", "")
        effect_ok = not t.get("effect") or t["effect"] == taint["effect"]
        if key_ok and value_ok and effect_ok:
            return True
    return False


def _expression_ok(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and key in labels:
        try:
            node, bound = int(labels[key]), int(values[0])
        except (ValueError, IndexError):
            return False
        return node > bound if op == "Gt" else node < bound
    return False


def _pool_fields(pool: GpuPool | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(pool, GpuPool):
        return {
            "name": pool.name,
            "instance_types": list(pool.instance_types),
            "capacity_type": pool.capacity_type,
            "max_size": pool.max_size,
            "labels": pool.labels,
            "taints": pool.taints,
            "efa": pool.efa,
        }
    return {
        "name": pool.get("name") or (pool.get("labels") or {}).get(POOL_LABEL, "?"),
        "instance_types": list(pool["instance_types"]),
        "capacity_type": pool.get("capacity_type", "ON_DEMAND"),
        "max_size": int(pool["max_size"]),
        "labels": dict(pool.get("labels") or {}),
        "taints": list(pool.get("taints") or []),
        "efa": bool(pool.get("efa", False)),
    }


def node_labels(pool: Mapping[str, Any], instance_type: str) -> dict[str, str]:
    """Labels a node of the pool carries: the pool's own plus the well-known ones kubelet and EKS set."""
    return {
        **pool["labels"],
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": instance_type,
        "eks.amazonaws.com/capacityType": pool["capacity_type"],
    }


def _why_not(pod_spec: Mapping[str, Any], pool: Mapping[str, Any], advertised: Sequence[str]) -> str | None:
    if pool["max_size"] <= 0:
        return "max size is 0"
    tolerations = pod_spec.get("tolerations") or []
    for taint in pool["taints"]:
        if taint["effect"] in ("NoSchedule", "NoExecute") and not _tolerated(taint, tolerations):
            return f"taint {taint['key']}={taint.get('value', '')}:{taint['effect']} not tolerated"
    requests = pod_requests(pod_spec)
    for instance_type in pool["instance_types"]:
        labels = node_labels(pool, instance_type)
        for key, value in (pod_spec.get("nodeSelector") or {}).items():
            if labels.get(key) != value:
                return f"nodeSelector {key}={value} but {instance_type} nodes have {key}={labels.get(key)!r}"
        required = (
            ((pod_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution"
            )
            or {}
        ).get("nodeSelectorTerms")
        if required and not any(
            all(_expression_ok(e, labels) for e in term.get("matchExpressions") or []) for term in required
        ):
            return f"required node affinity matches no {instance_type} node"
        # Every type must fit: the ASG may launch any of them, and a pod that fits only the biggest stays Pending.
        capacity = allocatable(instance_type, pool["efa"])
        for resource, amount in requests.items():
            if resource in ("ephemeral-storage",) or amount <= 0:
                continue
            if "/" in resource and resource not in advertised:
                return f"requests {resource} but no device plugin in the cluster advertises it"
            have = capacity.get(resource, 0.0)
            if amount > have + 1e-9:
                return f"requests {resource}={amount:g} but a {instance_type} node offers {have:g}"
    return None


DEVICE_PLUGINS = (GPU_RESOURCE,)
"""Extended resources advertised in every stack: infra/gpu_plugins.py installs the NVIDIA plugin everywhere and the
EFA plugin (vpc.amazonaws.com/efa) where a pool has EFA."""


def can_schedule(
    pod_spec: Mapping[str, Any],
    pools: Sequence[GpuPool | Mapping[str, Any]],
    advertised: Sequence[str] = DEVICE_PLUGINS,
) -> tuple[bool, str]:
    """Can the autoscaler grow some pool so that this pod fits? Returns (True, pool name) or (False, why not for
    each pool). Checks what decides it for real: taints vs tolerations, nodeSelector and required node affinity vs
    the labels nodes of the pool carry, requests vs every instance type's allocatable (extended resources only if a
    device plugin advertises them), and a non-zero max size."""
    reasons = []
    for raw in pools:
        pool = _pool_fields(raw)
        why = _why_not(pod_spec, pool, advertised)
        if why is None:
            return True, pool["name"]
        reasons.append(f"{pool['name']}: {why}")
    return False, "; ".join(reasons) or "no pools"


def pool_capacity(pod_spec: Mapping[str, Any], pool: GpuPool | Mapping[str, Any]) -> int:
    """How many such pods the pool holds at its maximum size: max size x pods per node on its smallest type. A
    workload asking for more (serving's max replicas, a training job's node count) can never all be placed."""
    fields = _pool_fields(pool)
    requests = {k: v for k, v in pod_requests(pod_spec).items() if v > 0 and k != "ephemeral-storage"}
    if not requests:
        return 0
    per_node = min(
        min(int(allocatable(t, fields["efa"]).get(r, 0.0) // v) for r, v in requests.items())
        for t in fields["instance_types"]
    )
    return fields["max_size"] * per_node


def chart_pod_spec(chart: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The placement part of the pods a pinned chart renders, from the values we give it: where each chart reads
    nodeSelector, affinity and tolerations (see each chart's values.yaml at the pinned version, infra/charts.py).
    No containers: requests come from the charts' templates, which render only at deploy time."""
    if chart == "prometheus":
        values = values.get("server") or {}
    spec: dict[str, Any] = {"containers": []}
    if values.get("nodeSelector"):
        spec["nodeSelector"] = dict(values["nodeSelector"])
    tolerations = list(values.get("tolerations") or [])
    if chart == "aws-efa-k8s-device-plugin":
        # templates/daemonset.yaml: CriticalAddonsOnly first, then ours; affinity = one term per label key (In).
        tolerations = [{"key": "CriticalAddonsOnly", "operator": "Exists"}, *tolerations]
        labels = values["supportedInstanceLabels"]
        terms = [
            {"matchExpressions": [{"key": k, "operator": "In", "values": labels["values"]}]} for k in labels["keys"]
        ]
        spec["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        }
    elif values.get("affinity"):
        spec["affinity"] = values["affinity"]
    if tolerations:
        spec["tolerations"] = tolerations
    return spec
