"""Capacity that follows demand: GPU nodes from zero and back (Cluster Autoscaler), spot interruptions handled
gracefully (aws-node-termination-handler in queue mode), the serving Deployment scaled on its own load (KEDA), and
the scheduling contract that proves every workload can actually be placed on a pool the autoscaler can grow.

Why the Cluster Autoscaler on the managed node groups rather than Karpenter: the node groups (built from the stack
config in `infra/cluster.py`) stay the single source of truth for instance types, labels, taints and maximum sizes.
Karpenter would need a second, parallel description (NodePools, EC2NodeClasses) that can drift from the node groups
and from what workloads select - the failure mode peers ship (pods Pending forever). The price: slower scale-up
(one ASG at a time, ~1 min more than Karpenter) and no bin-packing across instance families. See
docs/capacity-and-observability.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra.config import POOL_LABEL, GpuPool, StackConfig
from infra.identity import pod_identity_trust
from infra.instance_types import GPU_INSTANCE_TYPES, efa_interfaces

SYSTEM_POOL = "system"
KUBE_SYSTEM = "kube-system"
GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"

CLUSTER_AUTOSCALER_IMAGE = "registry.k8s.io/autoscaling/cluster-autoscaler"
CLUSTER_AUTOSCALER_SA = "cluster-autoscaler"
NTH_IMAGE = "public.ecr.aws/aws-ec2/aws-node-termination-handler"
NTH_SA = "aws-node-termination-handler"

KEDA_API_VERSION = "keda.sh/v1alpha1"
SCALED_OBJECT_CRD = "infra/crds/keda.sh_scaledobjects.json"


def autoscaler_tag_keys(cluster_name: str) -> tuple[str, str]:
    """The two ASG tags CA auto-discovery filters on. EKS puts both on every managed node group's ASG itself."""
    return "k8s.io/cluster-autoscaler/enabled", f"k8s.io/cluster-autoscaler/{cluster_name}"


def node_template_tags(pool: GpuPool) -> dict[str, str]:
    """ASG tags that describe a node of `pool` to the Cluster Autoscaler while the group has no node at all.

    Scaling from zero means simulating a node that does not exist: CA builds it from the instance type and these
    tags. (CA also reads labels and taints from the EKS DescribeNodegroup API; the tags make the GPU count explicit
    and keep the template right even if that call is denied or throttled.)"""
    tags = {f"k8s.io/cluster-autoscaler/node-template/label/{k}": v for k, v in pool.labels.items()}
    for taint in pool.taints:
        tags[f"k8s.io/cluster-autoscaler/node-template/taint/{taint['key']}"] = f"{taint['value']}:{taint['effect']}"
    tags[f"k8s.io/cluster-autoscaler/node-template/resources/{GPU_RESOURCE}"] = str(pool.gpus_per_node)
    if pool.efa:
        # Training pods on EFA pools request the EFA device; without it in the template CA never scales from zero.
        tags[f"k8s.io/cluster-autoscaler/node-template/resources/{EFA_RESOURCE}"] = str(
            efa_interfaces(pool.instance_types)
        )
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


def _pod_identity_role(
    parent: pulumi.Resource,
    name: str,
    role_name: str,
    policy: pulumi.Input[str],
    tags: dict[str, str],
    account_id: str,
) -> aws.iam.Role:
    role = aws.iam.Role(
        f"{name}-role",
        name=role_name,
        assume_role_policy=pod_identity_trust(account_id),
        tags=tags,
        opts=pulumi.ResourceOptions(parent=parent),
    )
    aws.iam.RolePolicy(
        f"{name}-policy",
        role=role.name,
        policy=policy,
        opts=pulumi.ResourceOptions(parent=parent),
    )
    return role


def _restricted_container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# ---------------------------------------------------------------------------------------------------------------
# Cluster Autoscaler


@dataclass
class ClusterAutoscalerArgs:
    config: StackConfig
    """Validated stack config: GPU pools (sizes, labels, taints), autoscaler version and scale-down timing."""
    cluster_name: pulumi.Input[str]
    """EKS cluster name: auto-discovery tag and the IAM condition that limits which ASGs CA may resize."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster (infra.cluster.Cluster.provider)."""
    node_groups: Mapping[str, aws.eks.NodeGroup]
    """The cluster's node groups by pool name ("system", "training", "inference")."""
    tags: dict[str, str]
    """Stack tags for every taggable AWS resource."""
    account_id: str
    """Account of the stack: the controller's role trusts Pod Identity from this account only."""


class ClusterAutoscaler(pulumi.ComponentResource):
    """Cluster Autoscaler for the managed node groups, on the system pool, with a least-privilege Pod Identity role."""

    role_arn: pulumi.Output[str]
    deployment_name: pulumi.Output[str]

    def __init__(self, name: str, args: ClusterAutoscalerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:ClusterAutoscaler", name, None, opts)
        self._name = name
        self._args = args
        cfg = args.config
        k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)

        self._tag_gpu_groups()
        role = _pod_identity_role(
            self,
            name,
            f"{cfg.name_prefix}-cluster-autoscaler",
            pulumi.Output.from_input(args.cluster_name).apply(lambda c: json.dumps(cluster_autoscaler_policy(c))),
            args.tags,
            args.account_id,
        )
        association = aws.eks.PodIdentityAssociation(
            f"{name}-pod-identity",
            cluster_name=args.cluster_name,
            namespace=KUBE_SYSTEM,
            service_account=CLUSTER_AUTOSCALER_SA,
            role_arn=role.arn,
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        for kind, obj in cluster_autoscaler_rbac().items():
            _apply(f"{name}-{kind}", obj, k8s_opts)
        deployment = k8s.apps.v1.Deployment(
            f"{name}-deployment",
            **_spec_kwargs(
                pulumi.Output.from_input(args.cluster_name).apply(lambda c: cluster_autoscaler_deployment(cfg, c))
            ),
            # The role must be associated before the pod starts, or its first AWS calls fail with node credentials.
            opts=pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[association]),
        )
        self.role_arn = role.arn
        self.deployment_name = deployment.metadata.name
        self.register_outputs({"role_arn": self.role_arn, "deployment_name": self.deployment_name})

    def _tag_gpu_groups(self) -> None:
        for pool in self._args.config.cluster.gpu_pools:
            group = asg_name(self._args.node_groups[pool.name])
            for i, (key, value) in enumerate(sorted(node_template_tags(pool).items())):
                aws.autoscaling.Tag(
                    f"{self._name}-{pool.name}-template-{i}",
                    autoscaling_group_name=group,
                    tag=aws.autoscaling.TagTagArgs(key=key, value=value, propagate_at_launch=False),
                    opts=pulumi.ResourceOptions(parent=self),
                )


def cluster_autoscaler_policy(cluster_name: str) -> dict[str, Any]:
    """The CA policy from the autoscaler's AWS docs, narrowed: it may only resize or terminate in ASGs owned by this
    cluster (EKS tags its managed node group ASGs `k8s.io/cluster-autoscaler/<cluster>=owned`)."""
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


def cluster_autoscaler_rbac() -> dict[str, dict[str, Any]]:
    """RBAC of the upstream `cluster-autoscaler-autodiscover.yaml` example, minus the long-gone `extensions` group."""
    meta = {"name": CLUSTER_AUTOSCALER_SA, "labels": {"app.kubernetes.io/name": CLUSTER_AUTOSCALER_SA}}
    ns_meta = {**meta, "namespace": KUBE_SYSTEM}
    watch = ["watch", "list", "get"]
    return {
        "sa": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": ns_meta},
        "clusterrole": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta,
            "rules": [
                {"apiGroups": [""], "resources": ["events", "endpoints"], "verbs": ["create", "patch"]},
                {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["update"]},
                {
                    "apiGroups": [""],
                    "resources": ["endpoints"],
                    "resourceNames": [CLUSTER_AUTOSCALER_SA],
                    "verbs": ["get", "update"],
                },
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["watch", "list", "get", "update"]},
                {
                    "apiGroups": [""],
                    "resources": [
                        "namespaces",
                        "pods",
                        "services",
                        "replicationcontrollers",
                        "persistentvolumeclaims",
                        "persistentvolumes",
                    ],
                    "verbs": watch,
                },
                {"apiGroups": ["apps"], "resources": ["statefulsets", "replicasets", "daemonsets"], "verbs": watch},
                {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["watch", "list"]},
                {
                    "apiGroups": ["storage.k8s.io"],
                    "resources": ["storageclasses", "csinodes", "csidrivers", "csistoragecapacities"],
                    "verbs": watch,
                },
                {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": watch},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "resourceNames": [CLUSTER_AUTOSCALER_SA],
                    "verbs": ["get", "update"],
                },
            ],
        },
        "clusterrolebinding": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CLUSTER_AUTOSCALER_SA},
            "subjects": [{"kind": "ServiceAccount", "name": CLUSTER_AUTOSCALER_SA, "namespace": KUBE_SYSTEM}],
        },
        "role": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": ns_meta,
            "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "list", "watch"]},
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": ["cluster-autoscaler-status"],
                    "verbs": ["delete", "get", "update", "watch"],
                },
            ],
        },
        "rolebinding": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": ns_meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CLUSTER_AUTOSCALER_SA},
            "subjects": [{"kind": "ServiceAccount", "name": CLUSTER_AUTOSCALER_SA, "namespace": KUBE_SYSTEM}],
        },
    }


def max_nodes_total(cfg: StackConfig) -> int:
    """Hard ceiling on nodes CA will ever have: the system group plus every GPU group at its maximum. With config
    validation guaranteeing sum(max_size * gpus_per_node) <= maxGpus, this and the per-group maxima cap GPUs."""
    return cfg.cluster.system_node_count + sum(p.max_size for p in cfg.cluster.gpu_pools)


def cluster_autoscaler_deployment(cfg: StackConfig, cluster_name: str) -> dict[str, Any]:
    enabled, owned = autoscaler_tag_keys(cluster_name)
    labels = {"app.kubernetes.io/name": CLUSTER_AUTOSCALER_SA}
    version = cfg.autoscaling.cluster_autoscaler_version
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": CLUSTER_AUTOSCALER_SA, "namespace": KUBE_SYSTEM, "labels": labels},
        "spec": {
            # One replica with leader election: two would only add a standby, and CA restarts in seconds.
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    # CA must never evict itself while draining the node it runs on.
                    "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                },
                "spec": {
                    "serviceAccountName": CLUSTER_AUTOSCALER_SA,
                    "priorityClassName": "system-cluster-critical",
                    # The system pool is fixed-size and untainted: CA never runs on a node it might remove.
                    "nodeSelector": {POOL_LABEL: SYSTEM_POOL},
                    "securityContext": {"runAsNonRoot": True, "fsGroup": 65534},
                    "containers": [
                        {
                            "name": "cluster-autoscaler",
                            "image": f"{CLUSTER_AUTOSCALER_IMAGE}:v{version}",
                            "command": ["./cluster-autoscaler"],
                            "args": [
                                "--cloud-provider=aws",
                                f"--node-group-auto-discovery=asg:tag={enabled},{owned}",
                                # One ASG per pool, so any expander picks the same group; least-waste is the
                                # sensible tie-breaker if a pool ever gets a second group (e.g. per AZ).
                                "--expander=least-waste",
                                "--balance-similar-node-groups",
                                # GPU nodes only run DaemonSets besides workloads; kube-system pods on them must
                                # not pin an idle GPU node forever.
                                "--skip-nodes-with-system-pods=false",
                                "--skip-nodes-with-local-storage=false",
                                f"--scale-down-unneeded-time={cfg.autoscaling.scale_down_unneeded_minutes}m",
                                "--scale-down-delay-after-add=5m",
                                f"--max-nodes-total={max_nodes_total(cfg)}",
                                # Give a pod its full terminationGracePeriodSeconds (training checkpoints on
                                # SIGTERM) up to this bound when CA drains a node it removes.
                                "--max-graceful-termination-sec=900",
                                "--stderrthreshold=info",
                                "--v=2",
                            ],
                            "env": [{"name": "AWS_REGION", "value": cfg.region}],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "600Mi"},
                                "limits": {"memory": "600Mi"},
                            },
                            "securityContext": _restricted_container_security(),
                        }
                    ],
                },
            },
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# Spot interruption handling


SPOT_EVENT_PATTERNS: dict[str, dict[str, Any]] = {
    "spot-interruption": {"source": ["aws.ec2"], "detail-type": ["EC2 Spot Instance Interruption Warning"]},
    "rebalance": {"source": ["aws.ec2"], "detail-type": ["EC2 Instance Rebalance Recommendation"]},
    "state-change": {"source": ["aws.ec2"], "detail-type": ["EC2 Instance State-change Notification"]},
    "scheduled-change": {
        "source": ["aws.health"],
        "detail-type": ["AWS Health Event"],
        "detail": {"service": ["EC2"], "eventTypeCategory": ["scheduledChange"]},
    },
}
"""The events aws-node-termination-handler's queue mode understands. ASG lifecycle events are left out on purpose:
EKS managed node groups own their ASG's termination lifecycle hook, and two drainers completing one hook race."""


@dataclass
class NodeTerminationHandlerArgs:
    config: StackConfig
    """Validated stack config (region, name prefix, handler version)."""
    cluster_name: pulumi.Input[str]
    """EKS cluster name: the handler only drains instances whose ASG carries this cluster's autoscaler tag."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster."""
    tags: dict[str, str]
    """Stack tags for every taggable AWS resource."""
    account_id: str
    """Account of the stack: the controller's role trusts Pod Identity from this account only."""


class NodeTerminationHandler(pulumi.ComponentResource):
    """SQS queue + EventBridge rules + aws-node-termination-handler (queue mode): a spot interruption warning,
    rebalance recommendation or scheduled maintenance cordons the node and drains it, so pods get SIGTERM with time
    to act (the trainer checkpoints, the serving container stops taking requests and drains)."""

    queue_url: pulumi.Output[str]
    role_arn: pulumi.Output[str]

    def __init__(self, name: str, args: NodeTerminationHandlerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:NodeTerminationHandler", name, None, opts)
        cfg = args.config
        child = pulumi.ResourceOptions(parent=self)
        queue = aws.sqs.Queue(
            f"{name}-queue",
            name=f"{cfg.name_prefix}-node-termination",
            # A notice older than the 2-minute spot warning is useless; don't let a backlog replay stale drains.
            message_retention_seconds=300,
            sqs_managed_sse_enabled=True,
            tags=args.tags,
            opts=child,
        )
        rules = []
        for kind, pattern in SPOT_EVENT_PATTERNS.items():
            rule = aws.cloudwatch.EventRule(
                f"{name}-{kind}",
                name=f"{cfg.name_prefix}-nth-{kind}",
                description=f"{kind} notices to aws-node-termination-handler ({cfg.name_prefix})",
                event_pattern=json.dumps(pattern),
                tags=args.tags,
                opts=child,
            )
            aws.cloudwatch.EventTarget(f"{name}-{kind}-target", rule=rule.name, arn=queue.arn, opts=child)
            rules.append(rule)
        aws.sqs.QueuePolicy(
            f"{name}-queue-policy",
            queue_url=queue.url,
            policy=pulumi.Output.all(queue.arn, *[r.arn for r in rules]).apply(
                lambda a: json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Sid": "OnlyOurRules",
                                "Effect": "Allow",
                                "Principal": {"Service": ["events.amazonaws.com", "sqs.amazonaws.com"]},
                                "Action": "sqs:SendMessage",
                                "Resource": a[0],
                                "Condition": {"ArnEquals": {"aws:SourceArn": list(a[1:])}},
                            }
                        ],
                    }
                )
            ),
            opts=child,
        )
        role = _pod_identity_role(
            self,
            name,
            f"{cfg.name_prefix}-node-termination-handler",
            queue.arn.apply(lambda arn: json.dumps(node_termination_handler_policy(arn))),
            args.tags,
            args.account_id,
        )
        association = aws.eks.PodIdentityAssociation(
            f"{name}-pod-identity",
            cluster_name=args.cluster_name,
            namespace=KUBE_SYSTEM,
            service_account=NTH_SA,
            role_arn=role.arn,
            tags=args.tags,
            opts=child,
        )
        k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)
        for kind, obj in node_termination_handler_rbac().items():
            _apply(f"{name}-{kind}", obj, k8s_opts)
        k8s.apps.v1.Deployment(
            f"{name}-deployment",
            **_spec_kwargs(
                pulumi.Output.all(queue.url, args.cluster_name).apply(
                    lambda a: node_termination_handler_deployment(cfg, a[0], a[1])
                )
            ),
            opts=pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[association]),
        )
        self.queue_url = queue.url
        self.role_arn = role.arn
        self.register_outputs({"queue_url": self.queue_url, "role_arn": self.role_arn})


def node_termination_handler_policy(queue_arn: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Queue",
                "Effect": "Allow",
                "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage"],
                "Resource": queue_arn,
            },
            {
                "Sid": "MapInstanceToNode",
                "Effect": "Allow",
                "Action": [
                    "ec2:DescribeInstances",
                    "autoscaling:DescribeAutoScalingInstances",
                    "autoscaling:DescribeTags",
                ],
                "Resource": "*",
            },
        ],
    }


def node_termination_handler_rbac() -> dict[str, dict[str, Any]]:
    meta = {"name": NTH_SA, "labels": {"app.kubernetes.io/name": NTH_SA}}
    return {
        "sa": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {**meta, "namespace": KUBE_SYSTEM}},
        "clusterrole": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta,
            "rules": [
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "patch", "update"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "get"]},
                {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
                {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            ],
        },
        "clusterrolebinding": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NTH_SA},
            "subjects": [{"kind": "ServiceAccount", "name": NTH_SA, "namespace": KUBE_SYSTEM}],
        },
    }


def node_termination_handler_deployment(cfg: StackConfig, queue_url: str, cluster_name: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": NTH_SA}
    _, owned = autoscaler_tag_keys(cluster_name)
    env = {
        "ENABLE_SQS_TERMINATION_DRAINING": "true",
        "QUEUE_URL": queue_url,
        "AWS_REGION": cfg.region,
        # The rules see every instance in the account and region; only drain nodes of this cluster's ASGs.
        "CHECK_TAG_BEFORE_DRAINING": "true",
        "MANAGED_TAG": owned,
        "ENABLE_SPOT_INTERRUPTION_DRAINING": "true",
        "ENABLE_REBALANCE_DRAINING": "true",
        "ENABLE_SCHEDULED_EVENT_DRAINING": "true",
        "IGNORE_DAEMON_SETS": "true",
        "DELETE_LOCAL_DATA": "true",
        # -1: each pod keeps its own terminationGracePeriodSeconds (the trainer's covers a checkpoint).
        "POD_TERMINATION_GRACE_PERIOD": "-1",
        "NODE_TERMINATION_GRACE_PERIOD": "120",
        "JSON_LOGGING": "true",
        "ENABLE_PROBES_SERVER": "true",
        "PROBES_SERVER_PORT": "8080",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NTH_SA, "namespace": KUBE_SYSTEM, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": NTH_SA,
                    "priorityClassName": "system-cluster-critical",
                    "nodeSelector": {POOL_LABEL: SYSTEM_POOL},
                    "containers": [
                        {
                            "name": "aws-node-termination-handler",
                            "image": f"{NTH_IMAGE}:v{cfg.autoscaling.node_termination_handler_version}",
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            "ports": [{"name": "probes", "containerPort": 8080}],
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": 8080},
                                "initialDelaySeconds": 5,
                                "periodSeconds": 5,
                            },
                            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
                            "securityContext": _restricted_container_security(),
                        }
                    ],
                },
            },
        },
    }


def needs_node_termination_handler(cfg: StackConfig) -> bool:
    """On-demand pools get no interruption warnings worth a queue; managed node groups drain on scale-in anyway."""
    return cfg.autoscaling.spot_interruption_handler and any(p.capacity_type == "SPOT" for p in cfg.cluster.gpu_pools)


# ---------------------------------------------------------------------------------------------------------------
# Serving autoscaling (KEDA)


@dataclass
class ServingAutoscalingArgs:
    config: StackConfig
    """Validated stack config: replicas, target load per replica, scale-to-zero window."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster."""
    namespace: pulumi.Input[str]
    """Namespace of the serving Deployment."""
    deployment_name: pulumi.Input[str]
    """Name of the serving Deployment to scale."""
    prometheus_url: pulumi.Input[str]
    """In-cluster Prometheus the KEDA scaler queries (infra.observability.Observability.prometheus_url)."""


class ServingAutoscaling(pulumi.ComponentResource):
    """A KEDA ScaledObject that scales serving on in-flight requests per replica (and to zero out of hours).

    KEDA itself is a cluster prerequisite (servingAutoscaler: keda), not installed here; see the doc."""

    scaled_object_name: pulumi.Output[str]

    def __init__(self, name: str, args: ServingAutoscalingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:ServingAutoscaling", name, None, opts)
        cfg = args.config
        body = pulumi.Output.all(args.namespace, args.deployment_name, args.prometheus_url).apply(
            lambda a: scaled_object(cfg, a[0], a[1], a[2])
        )
        so = k8s.apiextensions.CustomResource(
            f"{name}-scaledobject",
            api_version=KEDA_API_VERSION,
            kind="ScaledObject",
            metadata=body["metadata"],
            spec=body["spec"],
            opts=pulumi.ResourceOptions(parent=self, provider=args.provider),
        )
        self.scaled_object_name = so.metadata["name"]
        self.register_outputs({"scaled_object_name": self.scaled_object_name})


def serving_load_query(namespace: str, deployment: str) -> str:
    """Requests a replica holds now (being decoded or waiting for a batch slot), summed over the Deployment."""
    return f'sum(llm_serving_inflight_requests{{namespace="{namespace}",pod=~"{deployment}-.*"}})'


def scaled_object(cfg: StackConfig, namespace: str, deployment: str, prometheus_url: str) -> dict[str, Any]:
    a, s = cfg.autoscaling, cfg.serving
    triggers: list[dict[str, Any]] = [
        {
            "type": "prometheus",
            "name": "inflight-per-replica",
            # AverageValue: KEDA divides the query's value by the replica count, so the threshold is per replica.
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": prometheus_url,
                "query": serving_load_query(namespace, deployment),
                "threshold": str(a.serving_target_inflight_per_replica),
                # At zero replicas there are no series; an empty result is zero load, not an error.
                "ignoreNullValues": "true",
            },
        }
    ]
    if a.serving_scale_to_zero:
        # A request cannot wake a Deployment with no pods (nothing would hold it while a GPU node boots), so the
        # active window is a schedule; outside it, load from the Prometheus trigger alone keeps replicas up.
        triggers.append(
            {
                "type": "cron",
                "name": "active-hours",
                "metadata": {
                    "timezone": a.serving_active_hours_timezone,
                    "start": a.serving_active_hours_start,
                    "end": a.serving_active_hours_end,
                    "desiredReplicas": str(s.replicas),
                },
            }
        )
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": {"name": deployment, "namespace": namespace, "labels": {"app.kubernetes.io/name": deployment}},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicaCount": 0 if a.serving_scale_to_zero else s.replicas,
            "maxReplicaCount": s.max_replicas,
            "pollingInterval": 15,
            # Only applies to the last step to zero: keep the GPU node warm a while after the window ends.
            "cooldownPeriod": 900,
            # If Prometheus is unreachable, hold the configured floor instead of flapping.
            "fallback": {"failureThreshold": 4, "replicas": s.replicas},
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        # A new replica costs a GPU node and minutes of cold start; don't drop one on a lull.
                        "scaleDown": {
                            "stabilizationWindowSeconds": 600,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                        },
                        "scaleUp": {
                            "stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}],
                        },
                    }
                }
            },
            "triggers": triggers,
        },
    }


# ---------------------------------------------------------------------------------------------------------------
# The scheduling contract


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
        # infra/cluster.py attaches one EFA interface per network card (p5: 32)
        EFA_RESOURCE: float(efa_interfaces([instance_type]) if efa and it.efa else 0),
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
"""Extended resources advertised in every stack: infra/kubernetes_base.py installs the NVIDIA plugin everywhere
and the EFA plugin (vpc.amazonaws.com/efa) where a pool has EFA."""


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


# ---------------------------------------------------------------------------------------------------------------


def _spec_kwargs(obj: pulumi.Output[dict[str, Any]]) -> dict[str, Any]:
    """metadata/spec of a rendered object as Deployment kwargs (the object itself is what the tests validate)."""
    return {"metadata": obj["metadata"], "spec": obj["spec"]}


def _apply(resource_name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
    kind = obj["kind"]
    # Top-level fields become keyword arguments (roleRef -> role_ref); nested values keep the wire (camelCase) form.
    rest = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in obj.items() if k not in ("apiVersion", "kind")}
    classes = {
        "ServiceAccount": k8s.core.v1.ServiceAccount,
        "ConfigMap": k8s.core.v1.ConfigMap,
        "Service": k8s.core.v1.Service,
        "Namespace": k8s.core.v1.Namespace,
        "ClusterRole": k8s.rbac.v1.ClusterRole,
        "ClusterRoleBinding": k8s.rbac.v1.ClusterRoleBinding,
        "Role": k8s.rbac.v1.Role,
        "RoleBinding": k8s.rbac.v1.RoleBinding,
        "DaemonSet": k8s.apps.v1.DaemonSet,
        "Deployment": k8s.apps.v1.Deployment,
    }
    return classes[kind](resource_name, **rest, opts=opts)
