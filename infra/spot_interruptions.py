"""Spot interruptions handled gracefully: an SQS queue fed by EventBridge, and aws-node-termination-handler (its
upstream chart, queue mode) cordoning and draining the node, so pods get SIGTERM with time to act (the trainer
checkpoints, the serving container stops taking requests and drains)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from facts.cluster import KUBE_SYSTEM
from infra.charts import SYSTEM_NODE_SELECTOR, controller_identity, install_chart
from infra.cluster_autoscaler import autoscaler_tag_keys
from infra.config import AutoscalingConfig, ClusterConfig

CHART = "aws-node-termination-handler"
SERVICE_ACCOUNT = "aws-node-termination-handler"

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


def needs_node_termination_handler(autoscaling: AutoscalingConfig, cluster: ClusterConfig) -> bool:
    """On-demand pools get no interruption warnings worth a queue; managed node groups drain on scale-in anyway."""
    pools = (*cluster.gpu_pools, cluster.batch_pool)
    return autoscaling.spot_interruption_handler and any(p.capacity_type == "SPOT" for p in pools)


@dataclass(kw_only=True)
class SpotInterruptionQueueArgs:
    name_prefix: str
    """Prefix of the queue, rule and role names."""
    cluster_name: pulumi.Input[str]
    """EKS cluster the handler's Pod Identity association belongs to."""
    tags: dict[str, str]
    """Stack tags for every taggable AWS resource."""
    account_id: str
    """Account of the stack: the controller's role trusts Pod Identity from this account only."""


class SpotInterruptionQueue(pulumi.ComponentResource):
    """The AWS half of spot-interruption handling (AWS layer, infra/layers.py): the SQS queue, the EventBridge rules
    feeding it, and the handler's Pod Identity role and association. Exists before the handler's chart does."""

    queue_url: pulumi.Output[str]
    """The SQS queue the EventBridge rules deliver interruption notices to and the handler polls."""
    role_arn: pulumi.Output[str]
    """The handler's Pod Identity role (may read and delete messages of its queue)."""

    def __init__(self, name: str, args: SpotInterruptionQueueArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:SpotInterruptionQueue", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        queue = aws.sqs.Queue(
            f"{name}-queue",
            name=f"{args.name_prefix}-node-termination",
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
                name=f"{args.name_prefix}-nth-{kind}",
                description=f"{kind} notices to aws-node-termination-handler ({args.name_prefix})",
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
                lambda a: json.dumps(queue_policy(a[0], list(a[1:])))
            ),
            opts=child,
        )
        role = controller_identity(
            self,
            name,
            role_name=f"{args.name_prefix}-node-termination-handler",
            policy=queue.arn.apply(lambda arn: json.dumps(node_termination_handler_policy(arn))),
            cluster_name=args.cluster_name,
            namespace=KUBE_SYSTEM,
            service_account=SERVICE_ACCOUNT,
            tags=args.tags,
            account_id=args.account_id,
        )
        self.queue_url = queue.url
        self.role_arn = role.arn
        self.register_outputs({"queue_url": self.queue_url, "role_arn": self.role_arn})


@dataclass(kw_only=True)
class NodeTerminationHandlerArgs:
    autoscaling: AutoscalingConfig
    """The handler's version."""
    region: str
    cluster_name: pulumi.Input[str]
    """EKS cluster name: the handler only drains instances carrying this cluster's managed tag."""
    queue_url: pulumi.Input[str]
    """The queue SpotInterruptionQueue created (the AWS layer's output)."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster (cluster layer)."""


class NodeTerminationHandler(pulumi.ComponentResource):
    """aws-node-termination-handler in queue mode (cluster layer: its chart)."""

    chart: k8s.helm.v4.Chart
    """The Helm chart release of aws-node-termination-handler."""

    def __init__(self, name: str, args: NodeTerminationHandlerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:NodeTerminationHandler", name, None, opts)
        self.chart = install_chart(
            f"{name}-chart",
            CHART,
            KUBE_SYSTEM,
            pulumi.Output.all(args.queue_url, args.cluster_name).apply(
                lambda a: node_termination_handler_values(args, a[0], a[1])
            ),
            pulumi.ResourceOptions(parent=self, provider=args.provider),
        )
        self.register_outputs({})


def queue_policy(queue_arn: str, rule_arns: list[str]) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "OnlyOurRules",
                "Effect": "Allow",
                "Principal": {"Service": ["events.amazonaws.com", "sqs.amazonaws.com"]},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": rule_arns}},
            }
        ],
    }


def node_termination_handler_policy(queue_arn: str) -> dict[str, Any]:
    """The queue-mode policy of aws-node-termination-handler's README (v1.25.6) minus
    autoscaling:CompleteLifecycleAction: no ASG lifecycle events reach the queue (see SPOT_EVENT_PATTERNS)."""
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


def node_termination_handler_values(
    args: NodeTerminationHandlerArgs, queue_url: str, cluster_name: str
) -> dict[str, Any]:
    """Values over the chart's defaults (aws/aws-node-termination-handler v1.25.6:
    config/helm/aws-node-termination-handler/values.yaml, chart 0.27.6). `enableSqsTerminationDraining` selects the
    chart's queue-mode Deployment (templates/deployment.yaml), which sets NODE_NAME, POD_NAME and NAMESPACE from the
    downward API - v1.25 panics at start without NODE_NAME, the crash loop of our former hand copy."""
    _, owned = autoscaler_tag_keys(cluster_name)
    return {
        "enableSqsTerminationDraining": True,
        "queueURL": queue_url,
        "awsRegion": args.region,
        "image": {"tag": f"v{args.autoscaling.node_termination_handler_version}"},
        "fullnameOverride": SERVICE_ACCOUNT,
        # Pod Identity binds this exact name.
        "serviceAccount": {"create": True, "name": SERVICE_ACCOUNT},
        # PodSecurityPolicy is gone since Kubernetes 1.25 (the chart skips it there anyway); say so.
        "rbac": {"create": True, "pspEnabled": False},
        # The rules see every instance in the account and region; only drain nodes of this cluster's ASGs.
        "checkTagBeforeDraining": True,
        "managedTag": owned,
        "deleteLocalData": True,
        "ignoreDaemonSets": True,
        # -1: each pod keeps its own terminationGracePeriodSeconds (the trainer's covers a checkpoint).
        "podTerminationGracePeriod": -1,
        "nodeTerminationGracePeriod": 120,
        "emitKubernetesEvents": True,
        "jsonLogging": True,
        "replicas": 1,
        "nodeSelector": dict(SYSTEM_NODE_SELECTOR),
        "priorityClassName": "system-cluster-critical",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
    }
