"""Versions that must follow the cluster's Kubernetes version, kept in one place.

The Cluster Autoscaler supports only its own Kubernetes minor version (kubernetes/autoscaler README, "Releases"):
when `kubernetesVersion` moves (or EKS upgrades the control plane at the end of standard support), the autoscaler
moves with it through this table unless a stack pins `clusterAutoscalerVersion` explicitly.
"""

from __future__ import annotations

CLUSTER_AUTOSCALER = {
    # Latest patch per minor promoted to registry.k8s.io/autoscaling/cluster-autoscaler (kubernetes/k8s.io image
    # promotion PRs #8568, #8815; the version map of aws-ia/terraform-aws-eks-blueprints-addons PR #516).
    "1.31": "1.31.0",
    "1.32": "1.32.5",
    "1.33": "1.33.5",
    "1.34": "1.34.4",
    "1.35": "1.35.1",
}


def cluster_autoscaler_for(kubernetes_version: str) -> str:
    """The Cluster Autoscaler release for a Kubernetes minor version (`1.33` -> `1.33.5`)."""
    return CLUSTER_AUTOSCALER[kubernetes_version]
