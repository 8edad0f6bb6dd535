"""Device plugins, from their maintainers' charts: NVIDIA's advertises `nvidia.com/gpu` on every GPU pool; EKS's EFA
plugin advertises `vpc.amazonaws.com/efa` on EFA pools. The AL2023 NVIDIA AMI ships the driver, container toolkit and
EFA driver but no plugin: without them no pod can request a GPU, and EFA training pods stay Pending forever."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from facts.cluster import EFA_RESOURCE, GPU_RESOURCE, GPU_TAINT, KUBE_SYSTEM, POOL_LABEL
from infra.charts import gpu_toleration, install_chart
from infra.config import GpuPool

NVIDIA_CHART = "nvidia-device-plugin"
EFA_CHART = "aws-efa-k8s-device-plugin"
PLUGIN_RESOURCES = {NVIDIA_CHART: GPU_RESOURCE, EFA_CHART: EFA_RESOURCE}
"""The extended resource each plugin chart advertises."""

_CRITICAL_ADDONS = {"key": "CriticalAddonsOnly", "operator": "Exists"}


def _pools_affinity(pools: list[str]) -> dict[str, Any]:
    """Required node affinity to the given pools: a plugin has nothing to do (or crash-loops) anywhere else."""
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": POOL_LABEL, "operator": "In", "values": pools}]}]
            }
        }
    }


def nvidia_device_plugin_values(gpu_pools: Sequence[GpuPool]) -> dict[str, Any]:
    """Values over NVIDIA/k8s-device-plugin v0.20.0 deployments/helm/nvidia-device-plugin/values.yaml. Its default
    affinity selects nodes by Node Feature Discovery labels (`feature.node.kubernetes.io/pci-10de.present`, ...),
    which nothing sets here (NFD and GFD stay off): the affinity is replaced by our pool label."""
    return {
        "fullnameOverride": NVIDIA_CHART,
        "affinity": _pools_affinity([p.name for p in gpu_pools]),
        # Helm replaces lists: these are the chart's two defaults, restated so the taint contract is tested here.
        "tolerations": [dict(_CRITICAL_ADDONS), gpu_toleration(GPU_TAINT)],
        "priorityClassName": "system-node-critical",
        # Don't crash-loop on a node whose driver is still initialising; the plugin retries and logs instead.
        "failOnInitError": False,
        "gfd": {"enabled": False},
        "nfd": {"enabled": False},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
    }


def efa_device_plugin_values(gpu_pools: Sequence[GpuPool]) -> dict[str, Any]:
    """Values over aws/eks-charts stable/aws-efa-k8s-device-plugin (chart v0.5.30, image v0.5.20). The chart runs the
    plugin the way it works: hostNetwork, privileged, /dev/infiniband and the device-plugin socket mounted
    (templates/daemonset.yaml); our former hand copy had neither hostNetwork nor /dev/infiniband. Its affinity is
    built from `supportedInstanceLabels` (keys x values, operator In): keyed on our pool label instead of the instance
    type list, it runs exactly on the EFA pools. Tolerations are appended to the chart's CriticalAddonsOnly."""
    return {
        "fullnameOverride": EFA_CHART,
        "supportedInstanceLabels": {"keys": [POOL_LABEL], "values": [p.name for p in gpu_pools if p.efa]},
        "tolerations": [gpu_toleration(GPU_TAINT)],
    }


@dataclass
class GpuDevicePluginsArgs:
    gpu_pools: Sequence[GpuPool]
    """The GPU pools (names, EFA): where the plugins run."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster."""


class GpuDevicePlugins(pulumi.ComponentResource):
    """The NVIDIA device plugin on every GPU pool, and the EFA device plugin where a pool has EFA."""

    advertised: tuple[str, ...]
    """Extended resources the installed plugins advertise."""

    def __init__(self, name: str, args: GpuDevicePluginsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:GpuDevicePlugins", name, None, opts)
        k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)
        install_chart(
            f"{name}-nvidia", NVIDIA_CHART, KUBE_SYSTEM, nvidia_device_plugin_values(args.gpu_pools), k8s_opts
        )
        charts = [NVIDIA_CHART]
        if any(p.efa for p in args.gpu_pools):
            install_chart(f"{name}-efa", EFA_CHART, KUBE_SYSTEM, efa_device_plugin_values(args.gpu_pools), k8s_opts)
            charts.append(EFA_CHART)
        self.advertised = tuple(PLUGIN_RESOURCES[c] for c in charts)
        self.register_outputs({})
