"""Alarms that reach people: a KMS-encrypted SNS topic (e-mail subscribers), node groups that cannot launch capacity
(the ASG's own failure event), and the SageMaker endpoint's health (latency, 5xx, saturation, idle)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.cluster_autoscaler import asg_name
from infra.config import ObservabilityConfig, ServingConfig

SAGEMAKER_NAMESPACE = "AWS/SageMaker"


@dataclass
class AlertsArgs:
    observability: ObservabilityConfig
    """Alert subscribers and the SageMaker latency threshold."""
    serving: ServingConfig
    """Whether the stack serves on SageMaker, and the endpoint's scaling ceiling (the invocations alarm)."""
    name_prefix: str
    """Prefix of the physical names (topic, rule, alarms)."""
    protect_data: bool
    """Protect the alert topic's key with the data (storage.protect_data)."""
    node_groups: Mapping[str, aws.eks.NodeGroup]
    """Node groups by pool name; a launch failure in any of them raises an alert."""
    account_id: str
    """AWS account id (key and topic policies name it as the only source account)."""
    partition: str
    """AWS partition (aws, aws-us-gov, aws-cn)."""
    tags: dict[str, str]
    """Stack tags for every taggable AWS resource."""
    sagemaker_endpoint_name: pulumi.Input[str] | None = None
    """The SageMaker endpoint to alarm on, when the stack serves on SageMaker."""
    sagemaker_variant_name: str = "AllTraffic"
    """The endpoint's production variant (SageMaker's metrics are per variant)."""


class Alerts(pulumi.ComponentResource):
    """Alerting: an encrypted SNS topic with the alert e-mails subscribed, an EventBridge rule for node launch
    failures, and SageMaker endpoint alarms when the stack serves there."""

    topic_arn: pulumi.Output[str]
    """The alert topic: every alarm and rule of the stack notifies it."""

    def __init__(self, name: str, args: AlertsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Alerts", name, None, opts)
        self._name = name
        self._args = args
        topic = self._create_alert_topic()
        self.topic_arn = topic.arn
        self._create_capacity_failure_rule(topic)
        if args.serving.on_sagemaker and args.sagemaker_endpoint_name is not None:
            self._create_sagemaker_alarms(topic)
        self.register_outputs({"topic_arn": self.topic_arn})

    def _create_alert_topic(self) -> aws.sns.Topic:
        args = self._args
        child = pulumi.ResourceOptions(parent=self)
        # Its own key: CloudWatch and EventBridge must be allowed to encrypt into the topic, which the AWS-managed
        # SNS key cannot grant and the stack's data key should not.
        key = aws.kms.Key(
            f"{self._name}-alerts-key",
            description=f"{args.name_prefix} alert topic",
            enable_key_rotation=True,
            deletion_window_in_days=7,
            policy=json.dumps(alerts_key_policy(args.account_id, args.partition)),
            tags=args.tags,
            # It holds no data, but the production policy protects every key of a protected stack (and deleting it
            # would only break alerting): follow protectData like the data key.
            opts=pulumi.ResourceOptions(parent=self, protect=args.protect_data),
        )
        topic = aws.sns.Topic(
            f"{self._name}-alerts",
            name=f"{args.name_prefix}-alerts",
            kms_master_key_id=key.id,
            tags=args.tags,
            opts=child,
        )
        aws.sns.TopicPolicy(
            f"{self._name}-alerts-policy",
            arn=topic.arn,
            policy=topic.arn.apply(lambda arn: json.dumps(alerts_topic_policy(arn, args.account_id))),
            opts=child,
        )
        for i, email in enumerate(args.observability.alert_emails):
            aws.sns.TopicSubscription(
                f"{self._name}-alerts-email-{i}", topic=topic.arn, protocol="email", endpoint=email, opts=child
            )
        return topic

    def _create_capacity_failure_rule(self, topic: aws.sns.Topic) -> None:
        """An ASG that cannot launch (no spot capacity, instance limit, bad launch template) leaves pods Pending
        silently; the ASG's own failure event is the earliest, cheapest signal."""
        args = self._args
        names = pulumi.Output.all(*[asg_name(ng) for _, ng in sorted(args.node_groups.items())])
        rule = aws.cloudwatch.EventRule(
            f"{self._name}-capacity-failures",
            name=f"{args.name_prefix}-node-launch-failures",
            description="A node group's Auto Scaling group failed to launch an instance",
            event_pattern=names.apply(lambda n: json.dumps(capacity_failure_pattern(list(n)))),
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        aws.cloudwatch.EventTarget(
            f"{self._name}-capacity-failures-target",
            rule=rule.name,
            arn=topic.arn,
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _create_sagemaker_alarms(self, topic: aws.sns.Topic) -> None:
        args = self._args
        for key, spec in sagemaker_alarm_specs(args.serving, args.observability).items():
            aws.cloudwatch.MetricAlarm(
                f"{self._name}-sagemaker-{key}",
                name=f"{args.name_prefix}-sagemaker-{key}",
                namespace=SAGEMAKER_NAMESPACE,
                dimensions={"EndpointName": args.sagemaker_endpoint_name, "VariantName": args.sagemaker_variant_name},
                alarm_actions=[topic.arn],
                ok_actions=[topic.arn],
                tags=args.tags,
                opts=pulumi.ResourceOptions(parent=self),
                **spec,
            )


def alerts_key_policy(account_id: str, partition: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AccountAdministers",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:{partition}:iam::{account_id}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Sid": "AlarmAndEventPublishers",
                "Effect": "Allow",
                "Principal": {"Service": ["cloudwatch.amazonaws.com", "events.amazonaws.com"]},
                "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:SourceAccount": account_id}},
            },
        ],
    }


def alerts_topic_policy(topic_arn: str, account_id: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "AccountManages",
                "Effect": "Allow",
                "Principal": {"AWS": account_id},
                "Action": ["sns:GetTopicAttributes", "sns:SetTopicAttributes", "sns:Subscribe", "sns:Publish"],
                "Resource": topic_arn,
            },
            {
                "Sid": "AlarmsAndRulesOfThisAccount",
                "Effect": "Allow",
                "Principal": {"Service": ["cloudwatch.amazonaws.com", "events.amazonaws.com"]},
                "Action": "sns:Publish",
                "Resource": topic_arn,
                "Condition": {"StringEquals": {"aws:SourceAccount": account_id}},
            },
        ],
    }


def capacity_failure_pattern(asg_names: list[str]) -> dict[str, Any]:
    return {
        "source": ["aws.autoscaling"],
        "detail-type": ["EC2 Instance Launch Unsuccessful"],
        "detail": {"AutoScalingGroupName": sorted(asg_names)},
    }


def sagemaker_alarm_specs(s: ServingConfig, o: ObservabilityConfig) -> dict[str, dict[str, Any]]:
    """MetricAlarm arguments per alarm. SageMaker publishes per-minute metrics per endpoint variant."""
    ceiling = s.sagemaker_max_instances * s.sagemaker_invocations_per_instance
    return {
        "latency-p90": {
            "alarm_description": "p90 model latency above the stack's target (ModelLatency is in microseconds)",
            "metric_name": "ModelLatency",
            "extended_statistic": "p90",
            "period": 60,
            "evaluation_periods": 5,
            "datapoints_to_alarm": 3,
            "threshold": o.sagemaker_latency_p90_ms * 1000,
            "comparison_operator": "GreaterThanThreshold",
            "treat_missing_data": "notBreaching",
        },
        "5xx": {
            "alarm_description": "The model container returned 5xx errors",
            "metric_name": "Invocation5XXErrors",
            "statistic": "Sum",
            "period": 60,
            "evaluation_periods": 5,
            "datapoints_to_alarm": 2,
            "threshold": 0,
            "comparison_operator": "GreaterThanThreshold",
            "treat_missing_data": "notBreaching",
        },
        "invocations-high": {
            "alarm_description": "Invocations at 90% of what the endpoint can scale to: raise sagemakerMaxInstances",
            "metric_name": "Invocations",
            "statistic": "Sum",
            "period": 60,
            "evaluation_periods": 10,
            "datapoints_to_alarm": 8,
            "threshold": int(ceiling * 0.9),
            "comparison_operator": "GreaterThanThreshold",
            "treat_missing_data": "notBreaching",
        },
        "invocations-none": {
            "alarm_description": "No invocations for 6 hours: the endpoint bills for idle instances (delete it?)",
            "metric_name": "Invocations",
            "statistic": "Sum",
            "period": 3600,
            "evaluation_periods": 6,
            "datapoints_to_alarm": 6,
            "threshold": 1,
            "comparison_operator": "LessThanThreshold",
            # No datapoints at all is exactly the idle case.
            "treat_missing_data": "breaching",
        },
    }
