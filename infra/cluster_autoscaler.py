"""GPU nodes from zero and back: the Cluster Autoscaler (its upstream chart) on the managed node groups, with the ASG
node-template tags that let it scale a pool up from zero nodes, and a least-privilege Pod Identity role.

Why the Cluster Autoscaler on the managed node groups rather than Karpenter: the node groups (built from the stack
config in `infra/cluster.py`) stay the single source of truth for instance types, labels, taints and maximum sizes.
Karpenter would need a second, parallel description (NodePools, EC2NodeClasses) that can drift from the node groups
and from what workloads select - the failure mode peers ship (pods Pending forever). The price: slower scale-up
(one ASG at a time, ~1 min more than Karpenter) and no bin-packing across instance families. See
docs/capacity-and-observability.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from facts.cluster import EFA_RESOURCE, GPU_RESOURCE, KUBE_SYSTEM
from infra.charts import SYSTEM_NODE_SELECTOR, controller_identity, install_chart
from infra.config import AutoscalingConfig, BatchPool, ClusterConfig, GpuPool

CHART = "cluster-autoscaler"
SERVICE_ACCOUNT = "cluster-autoscaler"
TEMPLATE_PREFIX = "k8s.io/cluster-autoscaler/node-template"


def autoscaler_tag_keys(cluster_name: str) -> tuple[str, str]:
    """The two ASG tags CA auto-discovery filters on. EKS puts both on every managed node group's ASG itself."""
    return "k8s.io/cluster-autoscaler/enabled", f"k8s.io/cluster-autoscaler/{cluster_name}"


def node_template_tags(pool: GpuPool) -> dict[str, str]:
    """ASG tags that describe a node of `pool` to the Cluster Autoscaler while the group has no node at all.

    Scaling from zero means simulating a node that does not exist: CA builds it from the instance type and these
    tags (cluster-autoscaler/cloudprovider/aws/README.md, "Auto-Discovery Setup"). CA also reads labels and taints
    from the EKS DescribeNodegroup API, but only until a group has had a node; the tags keep the template right
    after that, and are the only place the extended resources (GPUs, EFA devices) can be declared. The labels
    include `k8s.amazonaws.com/accelerator`, which the node group also sets on its nodes."""
    tags = {f"{TEMPLATE_PREFIX}/label/{k}": v for k, v in pool.labels.items()}
    for taint in pool.taints:
        tags[f"{TEMPLATE_PREFIX}/taint/{taint['key']}"] = f"{taint['value']}:{taint['effect']}"
    tags[f"{TEMPLATE_PREFIX}/resources/{GPU_RESOURCE}"] = str(pool.gpus_per_node)
    if pool.efa:
        # The launch template's interface count (facts.instance_types), which the EFA plugin advertises: a pod asking
        # for all of a p5's 32 devices must see 32 here or CA never scales the group up for it.
        tags[f"{TEMPLATE_PREFIX}/resources/{EFA_RESOURCE}"] = str(pool.efa_interfaces_per_node)
    return tags


def batch_node_template_tags(pool: BatchPool) -> dict[str, str]:
    """The batch pool's node template: its label and taint, as for a GPU pool (no extended resources: CPU and
    memory come from the instance type). Without the taint tag, CA's simulated node from zero would have no taint,
    and it would scale the pool up for any pending pod that fits a CPU node, not only batch pods; without the label
    tag, never for a batch pod, whose nodeSelector names the label (kubernetes/autoscaler at cluster-autoscaler-chart-
    9.59.0, cluster-autoscaler/cloudprovider/aws/README.md "Scaling a node group to 0": "If you are using
    nodeSelector you need to tag the ASG with a node-template key .../label/ and .../taint/ if you are using
    taints")."""
    tags = {f"{TEMPLATE_PREFIX}/label/{k}": v for k, v in pool.labels.items()}
    for taint in pool.taints:
        tags[f"{TEMPLATE_PREFIX}/taint/{taint['key']}"] = f"{taint['value']}:{taint['effect']}"
    return tags


def asg_name(node_group: aws.eks.NodeGroup) -> pulumi.Output[str]:
    """Name of the Auto Scaling group behind a managed node group.

    Managed node group tags are not copied to its ASG, so tags CA must see go on the ASG itself. Before the node
    group exists (a preview, the mock engine) the name is unknown; a placeholder naming the node group keeps previews
    readable instead of failing."""

    def first(resources: Any, ng_name: str) -> str:
        for res in resources or []:
            groups = res.get("autoscaling_groups") if isinstance(res, dict) else res.autoscaling_groups
            for group in groups or []:
                name = group.get("name") if isinstance(group, dict) else group.name
                if name:
                    return name
        return f"eks-{ng_name}-asg-unknown"

    return pulumi.Output.all(node_group.resources, node_group.node_group_name).apply(lambda a: first(a[0], a[1]))


def max_nodes_total(cluster: ClusterConfig) -> int:
    """Hard ceiling on nodes CA will ever have: the system group plus every GPU group and the batch group at their
    maximum. With config validation guaranteeing sum(max_size * gpus_per_node) <= maxGpus, this and the per-group
    maxima cap GPUs."""
    gpu = sum(p.max_size for p in cluster.gpu_pools)
    return cluster.system_node_count + gpu + cluster.batch_pool.max_size


@dataclass(kw_only=True)
class ClusterAutoscalerIdentityArgs:
    cluster: ClusterConfig
    """The GPU pools (their node-template tags)."""
    name_prefix: str
    """Prefix of the controller's IAM role name."""
    cluster_name: pulumi.Input[str]
    """EKS cluster name: the IAM condition that limits which ASGs CA may resize, and the Pod Identity association."""
    node_groups: Mapping[str, aws.eks.NodeGroup]
    """The cluster's node groups by pool name ("system", "training", "inference", "batch")."""
    tags: dict[str, str]
    """Stack tags for every taggable AWS resource."""
    account_id: str
    """Account of the stack: the controller's role trusts Pod Identity from this account only."""


class ClusterAutoscalerIdentity(pulumi.ComponentResource):
    """The Cluster Autoscaler's AWS half (AWS layer, infra/layers.py): the ASG node-template tags that let it scale a
    pool up from zero, and its least-privilege Pod Identity role and association."""

    role_arn: pulumi.Output[str]
    """The controller's Pod Identity role (may resize only this cluster's node groups)."""

    def __init__(
        self, name: str, args: ClusterAutoscalerIdentityArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-platform:infra:ClusterAutoscalerIdentity", name, None, opts)
        self._name = name
        self._args = args
        self._tag_gpu_groups()
        role = controller_identity(
            self,
            name,
            role_name=f"{args.name_prefix}-cluster-autoscaler",
            policy=pulumi.Output.from_input(args.cluster_name).apply(
                lambda c: json.dumps(cluster_autoscaler_policy(c))
            ),
            cluster_name=args.cluster_name,
            namespace=KUBE_SYSTEM,
            service_account=SERVICE_ACCOUNT,
            tags=args.tags,
            account_id=args.account_id,
        )
        self.role_arn = role.arn
        self.register_outputs({"role_arn": self.role_arn})

    def _tag_gpu_groups(self) -> None:
        """Every group that scales from zero: the GPU pools and the batch pool."""
        templates = {pool.name: node_template_tags(pool) for pool in self._args.cluster.gpu_pools}
        batch = self._args.cluster.batch_pool
        templates[batch.name] = batch_node_template_tags(batch)
        for name, tags in templates.items():
            group = asg_name(self._args.node_groups[name])
            for i, (key, value) in enumerate(sorted(tags.items())):
                aws.autoscaling.Tag(
                    f"{self._name}-{name}-template-{i}",
                    autoscaling_group_name=group,
                    tag=aws.autoscaling.TagTagArgs(key=key, value=value, propagate_at_launch=False),
                    opts=pulumi.ResourceOptions(parent=self),
                )


@dataclass(kw_only=True)
class ClusterAutoscalerArgs:
    cluster: ClusterConfig
    """The system pool's size and the GPU pools (sizes, labels, taints)."""
    autoscaling: AutoscalingConfig
    """Autoscaler version and scale-down timing."""
    region: str
    cluster_name: pulumi.Input[str]
    """EKS cluster name: the auto-discovery tag."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster (cluster layer)."""


class ClusterAutoscaler(pulumi.ComponentResource):
    """Cluster Autoscaler for the managed node groups, on the system pool (cluster layer: its chart; its role, the
    association and the ASG tags are ClusterAutoscalerIdentity's, in the AWS layer)."""

    chart: k8s.helm.v4.Chart
    """The Helm chart release (its resources are what the tests and the scheduling contract inspect)."""

    def __init__(self, name: str, args: ClusterAutoscalerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:ClusterAutoscaler", name, None, opts)
        self.chart = install_chart(
            f"{name}-chart",
            CHART,
            KUBE_SYSTEM,
            pulumi.Output.from_input(args.cluster_name).apply(lambda c: cluster_autoscaler_values(args, c)),
            pulumi.ResourceOptions(parent=self, provider=args.provider),
        )
        self.register_outputs({})


def cluster_autoscaler_policy(cluster_name: str) -> dict[str, Any]:
    """The "Full Cluster Autoscaler Features Policy" of cluster-autoscaler/cloudprovider/aws/README.md (chart 9.59.0's
    tag), narrowed: it may only resize or terminate in ASGs owned by this cluster (EKS tags its managed node group
    ASGs `k8s.io/cluster-autoscaler/<cluster>=owned`)."""
    _, owned_tag = autoscaler_tag_keys(cluster_name)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Describe",
                "Effect": "Allow",
                "Action": [
                    "autoscaling:DescribeAutoScalingGroups",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeLaunchConfigurations",
                    "autoscaling:DescribeScalingActivities",
                    "autoscaling:DescribeTags",
                    "ec2:DescribeImages",
                    "ec2:DescribeInstanceTypes",
                    "ec2:DescribeLaunchTemplateVersions",
                    "ec2:GetInstanceTypesFromInstanceRequirements",
                    "eks:DescribeNodegroup",
                ],
                # Describe/List calls do not support resource-level permissions.
                "Resource": "*",
            },
            {
                "Sid": "ResizeOwnGroupsOnly",
                "Effect": "Allow",
                "Action": ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"],
                "Resource": "*",
                "Condition": {"StringEquals": {f"aws:ResourceTag/{owned_tag}": "owned"}},
            },
        ],
    }


def cluster_autoscaler_values(args: ClusterAutoscalerArgs, cluster_name: str) -> dict[str, Any]:
    """Values over the chart's defaults (kubernetes/autoscaler cluster-autoscaler-chart-9.59.0:
    cluster-autoscaler/charts/cluster-autoscaler/values.yaml; every key below exists there). The chart's RBAC
    (templates/clusterrole.yaml) includes what our hand copy lacked: volumeattachments (kubernetes/autoscaler#7663,
    #8678), resource.k8s.io for DRA, podtemplates, and the other API groups CA 1.32+ lists."""
    enabled, owned = autoscaler_tag_keys(cluster_name)
    return {
        "cloudProvider": "aws",
        "awsRegion": args.region,
        # The chart renders --node-group-auto-discovery=asg:tag=<tags joined by ','> from these two.
        "autoDiscovery": {"clusterName": cluster_name, "tags": [enabled, owned]},
        # The image must match the cluster's Kubernetes minor (config validation checks it); the chart's default
        # follows its own appVersion (1.35.0), so pin the tag explicitly as its README instructs.
        "image": {"tag": f"v{args.autoscaling.cluster_autoscaler_version}"},
        # Fixed names: Pod Identity binds this exact service account; the chart's lease and endpoints rules name
        # "cluster-autoscaler" (resourceNames), which fullnameOverride keeps true.
        "fullnameOverride": "cluster-autoscaler",
        "rbac": {"create": True, "serviceAccount": {"create": True, "name": SERVICE_ACCOUNT}},
        # The system pool is fixed-size and untainted: CA never runs on a node it might remove.
        "nodeSelector": dict(SYSTEM_NODE_SELECTOR),
        "priorityClassName": "system-cluster-critical",
        "replicaCount": 1,
        # CA must never evict itself while draining the node it runs on.
        "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "resources": {"requests": {"cpu": "100m", "memory": "600Mi"}, "limits": {"memory": "600Mi"}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "fsGroup": 65534},
        "containerSecurityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "extraArgs": {
            "logtostderr": True,
            "stderrthreshold": "info",
            "v": 2,
            # One ASG per pool, so any expander picks the same group; least-waste is the sensible tie-breaker if a
            # pool ever gets a second group (e.g. per AZ).
            "expander": "least-waste",
            "balance-similar-node-groups": True,
            # GPU nodes only run DaemonSets besides workloads; kube-system pods on them must not pin an idle GPU
            # node forever.
            "skip-nodes-with-system-pods": False,
            "skip-nodes-with-local-storage": False,
            "scale-down-unneeded-time": f"{args.autoscaling.scale_down_unneeded_minutes}m",
            "scale-down-delay-after-add": "5m",
            "max-nodes-total": max_nodes_total(args.cluster),
            # Give a pod its full terminationGracePeriodSeconds (training checkpoints on SIGTERM) up to this bound
            # when CA drains a node it removes.
            "max-graceful-termination-sec": 900,
        },
    }
