"""Third-party cluster software, installed from its maintainers' Helm charts at pinned versions.

We write our own objects (namespaces, our workloads, RBAC for our service accounts, network policies); controllers
that other projects maintain come from those projects' charts, so their RBAC, probes, env and volumes follow the
release we pin instead of a hand copy drifting from it. Each chart is installed with pulumi-kubernetes
`helm.v4.Chart` (rendered by the provider, each object a Pulumi resource) with chart, version and repository pinned
here; a version bump is a reviewed change to this table, checked against the chart's values.yaml at the new tag.

The values we pass are built by pure functions next to each component (`*_values`), so the tests pin exactly the
values our contracts depend on: tolerations for the GPU taint, node selectors to the system pool, the service-account
names Pod Identity binds, auto-discovery tags, the SQS queue URL, the cluster name and region.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from facts import pulumi_types as tok
from facts.cluster import POOL_LABEL, SYSTEM_POOL
from infra.identity import pod_identity_trust

SYSTEM_NODE_SELECTOR = {POOL_LABEL: SYSTEM_POOL}
"""Controllers run on the fixed-size, untainted system pool: never on a GPU node the autoscaler might remove."""
CHART_TYPE = tok.HELM_CHART


@dataclass(frozen=True)
class PinnedChart:
    chart: str
    """Chart name in its repository, or a full oci:// reference (then `repository` is None)."""
    version: str
    """Chart version, exactly as the chart's Chart.yaml spells it."""
    repository: str | None
    """Helm repository URL the maintainers publish to (their README's `helm repo add`)."""
    app_version: str
    """The chart's appVersion at that version: the release of the software it installs by default."""
    source: str
    """Where the chart's values.yaml at this version lives (repository@tag:path), for the next bump."""


CHARTS: dict[str, PinnedChart] = {
    "cluster-autoscaler": PinnedChart(
        chart="cluster-autoscaler",
        version="9.59.0",
        repository="https://kubernetes.github.io/autoscaler",
        app_version="1.35.0",
        source="kubernetes/autoscaler@cluster-autoscaler-chart-9.59.0:cluster-autoscaler/charts/cluster-autoscaler",
    ),
    "aws-node-termination-handler": PinnedChart(
        chart="oci://public.ecr.aws/aws-ec2/helm/aws-node-termination-handler",
        version="0.27.6",
        repository=None,
        app_version="1.25.6",
        source="aws/aws-node-termination-handler@v1.25.6:config/helm/aws-node-termination-handler",
    ),
    "nvidia-device-plugin": PinnedChart(
        chart="nvidia-device-plugin",
        version="0.20.0",
        repository="https://nvidia.github.io/k8s-device-plugin",
        app_version="0.20.0",
        source="NVIDIA/k8s-device-plugin@v0.20.0:deployments/helm/nvidia-device-plugin",
    ),
    "aws-efa-k8s-device-plugin": PinnedChart(
        chart="aws-efa-k8s-device-plugin",
        version="v0.5.30",
        repository="https://aws.github.io/eks-charts",
        app_version="v0.5.20",
        source="aws/eks-charts@bfe91c4 (tag v0.0.241):stable/aws-efa-k8s-device-plugin",
    ),
    "dcgm-exporter": PinnedChart(
        chart="dcgm-exporter",
        version="4.8.2",
        repository="https://nvidia.github.io/dcgm-exporter/helm-charts",
        app_version="4.8.2",
        source="NVIDIA/dcgm-exporter@4.5.3-4.8.2:deployment",
    ),
    "prometheus": PinnedChart(
        chart="prometheus",
        version="29.27.0",
        repository="https://prometheus-community.github.io/helm-charts",
        app_version="v3.14.0",
        source="prometheus-community/helm-charts@prometheus-29.27.0:charts/prometheus",
    ),
    "keda": PinnedChart(
        chart="keda",
        version="2.20.2",
        repository="https://kedacore.github.io/charts",
        app_version="2.20.2",
        source="kedacore/charts@v2.20.2:keda",
    ),
    "aws-load-balancer-controller": PinnedChart(
        chart="aws-load-balancer-controller",
        version="3.5.0",
        repository="https://aws.github.io/eks-charts",
        app_version="v3.5.0",
        source="aws/eks-charts@5239609 (tag v0.0.242):stable/aws-load-balancer-controller",
    ),
}


def install_chart(
    resource_name: str,
    key: str,
    namespace: str,
    values: pulumi.Input[dict[str, Any]],
    opts: pulumi.ResourceOptions,
) -> k8s.helm.v4.Chart:
    """The pinned chart `key` as release `key` in `namespace`, with `values` over the chart's defaults."""
    pinned = CHARTS[key]
    return k8s.helm.v4.Chart(
        resource_name,
        chart=pinned.chart,
        version=pinned.version,
        repository_opts=k8s.helm.v4.RepositoryOptsArgs(repo=pinned.repository) if pinned.repository else None,
        name=key,
        namespace=namespace,
        values=values,
        opts=opts,
    )


def pod_identity_role(
    parent: pulumi.Resource,
    name: str,
    role_name: str,
    policy: pulumi.Input[str],
    tags: dict[str, str],
    account_id: str,
) -> tuple[aws.iam.Role, aws.iam.RolePolicy]:
    """A controller's IAM role, assumable only through EKS Pod Identity from this account, with its inline policy.
    Consumers depend on the policy too: a controller started with the role but not yet its policy fails its first
    AWS calls (IAM is eventually consistent) and backs off for minutes."""
    role = aws.iam.Role(
        f"{name}-role",
        name=role_name,
        assume_role_policy=pod_identity_trust(account_id),
        tags=tags,
        opts=pulumi.ResourceOptions(parent=parent),
    )
    policy_resource = aws.iam.RolePolicy(
        f"{name}-policy",
        role=role.name,
        policy=policy,
        opts=pulumi.ResourceOptions(parent=parent),
    )
    return role, policy_resource


def pod_identity_association(
    parent: pulumi.Resource,
    name: str,
    cluster_name: pulumi.Input[str],
    namespace: str,
    service_account: str,
    role: aws.iam.Role,
    tags: dict[str, str],
) -> aws.eks.PodIdentityAssociation:
    """Binds `namespace/service_account` to `role`. The chart must create the service account under exactly this
    name (its values pin it); the association itself does not need the account to exist yet."""
    return aws.eks.PodIdentityAssociation(
        f"{name}-pod-identity",
        cluster_name=cluster_name,
        namespace=namespace,
        service_account=service_account,
        role_arn=role.arn,
        tags=tags,
        opts=pulumi.ResourceOptions(parent=parent),
    )


def controller_identity(
    parent: pulumi.Resource,
    name: str,
    *,
    role_name: str,
    policy: pulumi.Input[str],
    cluster_name: pulumi.Input[str],
    namespace: str,
    service_account: str,
    tags: dict[str, str],
    account_id: str,
) -> aws.iam.Role:
    """The AWS half of a controller that calls AWS (AWS layer, infra/layers.py): its Pod Identity role and policy and
    the association to the service account its chart will create. It exists before the chart does (the cluster layer
    is applied after the AWS layer), so the pod's first AWS calls never fail for a missing association or policy."""
    role, _policy = pod_identity_role(parent, name, role_name, policy, tags, account_id)
    pod_identity_association(parent, name, cluster_name, namespace, service_account, role, tags)
    return role


def gpu_toleration(taint: dict[str, str]) -> dict[str, str]:
    """Tolerates the GPU taint whatever its value (DaemonSets that must run on every GPU node)."""
    return {"key": taint["key"], "operator": "Exists", "effect": taint["effect"]}
