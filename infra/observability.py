"""Seeing the platform: GPU metrics, Prometheus scraping of GPUs, serving and training (Amazon Managed Prometheus or an
in-cluster Prometheus, by config), the Grafana dashboards as code, and alarms that reach people.

Two components, one per layer (infra/layers.py): Observability (AWS layer: infra/alarms.py's topic, capacity and
SageMaker alarms, and Amazon Managed Prometheus) and ClusterMonitoring (cluster layer: infra/prometheus.py's monitoring
namespace, DCGM exporter and Prometheus chart values, dashboards). Its Kubernetes objects are plain objects applied by
infra/k8s_objects.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s
import yaml

from facts.cluster import MONITORING_NAMESPACE
from infra import k8s_objects
from infra.alarms import Alerts, AlertsArgs
from infra.charts import install_chart
from infra.config import GpuPool, ObservabilityConfig, ServingConfig
from infra.prometheus import (
    PROMETHEUS_PORT,
    PROMETHEUS_SERVICE,
    dashboard_configmaps,
    dcgm_exporter_values,
    monitoring_namespace,
    prometheus_values,
    scrape_config,
)

AMP_COLLECTOR_USER = "aps-collector-user"


@dataclass(kw_only=True)
class ObservabilityArgs:
    observability: ObservabilityConfig
    """Metrics mode, retention, alert subscribers, the SageMaker latency target."""
    serving: ServingConfig
    """Whether the stack serves on SageMaker and its scaling ceiling (the SageMaker alarms)."""
    stack: str
    """The environment's stack name: series carry it as an external label."""
    name_prefix: str
    """Prefix of the physical names (workspace, scraper, topic, alarms)."""
    protect_data: bool
    """Protect the alert topic's key with the data (storage.protect_data)."""
    cluster_arn: pulumi.Input[str]
    """EKS cluster ARN: the source of the Amazon Managed Prometheus scraper."""
    cluster_security_group_id: pulumi.Input[str]
    """Cluster security group: the managed scraper's ENIs carry it to reach pods on every node."""
    private_subnet_ids: pulumi.Input[list[str]]
    """Private subnets for the managed scraper's ENIs."""
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


class Observability(pulumi.ComponentResource):
    """The AWS half of seeing the platform (AWS layer, infra/layers.py), so alerting exists even when the cluster
    layer never gets applied: the alert topic, its key and the alarms (always), and with `metrics: amp` the Amazon
    Managed Prometheus workspace and the AWS-managed collector. The in-cluster half is ClusterMonitoring."""

    alert_topic_arn: pulumi.Output[str]
    """The SNS topic every alarm publishes to (the alert emails subscribe to it)."""
    amp_workspace_id: pulumi.Output[str] | None
    """The Amazon Managed Prometheus workspace id with `metrics: amp`, else None."""
    amp_query_url: pulumi.Output[str] | None
    """The workspace's Prometheus endpoint with `metrics: amp`, else None."""

    def __init__(self, name: str, args: ObservabilityArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Observability", name, None, opts)
        self._name = name
        self._args = args
        self.amp_workspace_id = None
        self.amp_query_url = None

        alerts = Alerts(
            name,
            AlertsArgs(
                observability=args.observability,
                serving=args.serving,
                name_prefix=args.name_prefix,
                protect_data=args.protect_data,
                node_groups=args.node_groups,
                account_id=args.account_id,
                partition=args.partition,
                tags=args.tags,
                sagemaker_endpoint_name=args.sagemaker_endpoint_name,
                sagemaker_variant_name=args.sagemaker_variant_name,
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.alert_topic_arn = alerts.topic_arn
        if args.observability.metrics == "amp":
            self._create_amp()
        self.register_outputs(
            {
                "alert_topic_arn": self.alert_topic_arn,
                "amp_workspace_id": self.amp_workspace_id,
                "amp_query_url": self.amp_query_url,
            }
        )

    def _create_amp(self) -> None:
        """Amazon Managed Prometheus with the AWS-managed collector; the cluster layer adds only its RBAC."""
        args = self._args
        child = pulumi.ResourceOptions(parent=self)
        workspace = aws.amp.Workspace(
            f"{self._name}-amp", alias=f"{args.name_prefix}-metrics", tags=args.tags, opts=child
        )
        aws.amp.Scraper(
            f"{self._name}-amp-scraper",
            alias=f"{args.name_prefix}-scraper",
            source=aws.amp.ScraperSourceArgs(
                eks=aws.amp.ScraperSourceEksArgs(
                    cluster_arn=args.cluster_arn,
                    subnet_ids=args.private_subnet_ids,
                    security_group_ids=[args.cluster_security_group_id],
                )
            ),
            destination=aws.amp.ScraperDestinationArgs(
                amp=aws.amp.ScraperDestinationAmpArgs(workspace_arn=workspace.arn)
            ),
            scrape_configuration=yaml.safe_dump(scrape_config(args.stack, managed_collector=True), sort_keys=False),
            tags=args.tags,
            opts=child,
        )
        self.amp_workspace_id = workspace.id
        self.amp_query_url = workspace.prometheus_endpoint


@dataclass(kw_only=True)
class ClusterMonitoringArgs:
    observability: ObservabilityConfig
    """Metrics mode, exporter and Prometheus versions, retention."""
    gpu_pools: Sequence[GpuPool]
    """The GPU pools: the DCGM exporter runs on their nodes."""
    stack: str
    """The environment's stack name: in-cluster series carry it as an external label."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster (cluster layer)."""
    amp_query_url: pulumi.Input[str] | None = None
    """With `metrics: amp`, the workspace endpoint (the AWS layer's output)."""


class ClusterMonitoring(pulumi.ComponentResource):
    """The in-cluster half (cluster layer), with `metrics` other than `none`: the monitoring namespace, the DCGM
    exporter on the GPU nodes, the dashboards as ConfigMaps, and either the in-cluster Prometheus (`in-cluster`) or the
    RBAC the AWS-managed collector reads the cluster with (`amp`)."""

    prometheus_url: pulumi.Output[str] | None
    """Where PromQL is answered: the in-cluster Service URL, the AMP workspace endpoint, or None (metrics: none)."""

    def __init__(self, name: str, args: ClusterMonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:ClusterMonitoring", name, None, opts)
        self.prometheus_url = None
        mode = args.observability.metrics
        if mode != "none":
            k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)
            ns = k8s_objects.apply(f"{name}-namespace", monitoring_namespace(), k8s_opts)
            k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[ns])
            install_chart(
                f"{name}-dcgm-exporter",
                "dcgm-exporter",
                MONITORING_NAMESPACE,
                dcgm_exporter_values(args.observability, args.gpu_pools),
                k8s_opts,
            )
            for file_name, obj in dashboard_configmaps().items():
                k8s_objects.apply(f"{name}-dashboard-{file_name.removesuffix('.json')}", obj, k8s_opts)
            if mode == "in-cluster":
                install_chart(
                    f"{name}-prometheus",
                    "prometheus",
                    MONITORING_NAMESPACE,
                    prometheus_values(args.observability, args.stack),
                    k8s_opts,
                )
                self.prometheus_url = pulumi.Output.from_input(
                    f"http://{PROMETHEUS_SERVICE}.{MONITORING_NAMESPACE}.svc:{PROMETHEUS_PORT}"
                )
            else:
                # The collector authenticates to the cluster as its service-linked role. On a cluster with API
                # authentication (ours) AMP creates that role's access entry itself, mapped to `aps-collector-user`
                # (AMP user guide, "Set up managed collectors for Amazon EKS"); a second one from us fails with
                # ResourceInUseException. The RBAC below grants that user read access.
                for key, obj in amp_collector_rbac().items():
                    k8s_objects.apply(f"{name}-amp-{key}", obj, k8s_opts)
                self.prometheus_url = (
                    pulumi.Output.from_input(args.amp_query_url) if args.amp_query_url is not None else None
                )
        self.register_outputs({"prometheus_url": self.prometheus_url})


def amp_collector_rbac() -> dict[str, dict[str, Any]]:
    """The read-only role AWS documents for the managed collector (`aps-collector-role`)."""
    return {
        "clusterrole": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": k8s_objects.metadata("aps-collector-role"),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": [
                        "nodes",
                        "nodes/proxy",
                        "nodes/metrics",
                        "services",
                        "endpoints",
                        "pods",
                        "ingresses",
                        "configmaps",
                    ],
                    "verbs": ["describe", "get", "list", "watch"],
                },
                {
                    "apiGroups": ["extensions", "networking.k8s.io"],
                    "resources": ["ingresses/status", "ingresses"],
                    "verbs": ["describe", "get", "list", "watch"],
                },
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                {"nonResourceURLs": ["/metrics"], "verbs": ["get"]},
            ],
        },
        "clusterrolebinding": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": k8s_objects.metadata("aps-collector-user-role-binding"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "aps-collector-role"},
            "subjects": [{"kind": "User", "name": AMP_COLLECTOR_USER, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    }
