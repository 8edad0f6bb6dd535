"""Seeing the platform: GPU metrics (NVIDIA DCGM exporter), Prometheus scraping of GPUs, serving and training
(Amazon Managed Prometheus or an in-cluster Prometheus, by config), the Grafana dashboard as code, and alarms that
reach people (SageMaker endpoint health, GPU node groups that cannot launch capacity) through a KMS-encrypted topic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s
import yaml

from infra.autoscaling import SYSTEM_POOL, _apply, _restricted_container_security, asg_name
from infra.config import GPU_TAINT, POOL_LABEL, PURPOSE_LABEL, StackConfig
from infra.kubernetes_base import (
    SERVING_ACCESS_LABEL,
    SERVING_NAMESPACE,
    TRAINING_METRICS_ACCESS_LABEL,
    TRAINING_NAMESPACE,
)

MONITORING_NAMESPACE = "monitoring"
PROMETHEUS_IMAGE = "quay.io/prometheus/prometheus"
PROMETHEUS_PORT = 9090
DCGM_IMAGE = "nvcr.io/nvidia/k8s/dcgm-exporter"
DCGM_PORT = 9400
DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
WORKLOAD_NAMESPACES = {"serving": SERVING_NAMESPACE, "training": TRAINING_NAMESPACE}
"""Namespaces whose pods are scraped when annotated `prometheus.io/scrape: "true"` (+ `prometheus.io/port`,
optional `prometheus.io/path`, default /metrics)."""

DCGM_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory (copy engine) utilization (in %)."),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB)."),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C)."),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W)."),
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz)."),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered."),
)
"""The counters our DCGM exporter emits (its collectors file is rendered from this). Device-level fields only:
profiling (DCP) fields would need CAP_SYS_ADMIN, which this exporter is not given."""

SAGEMAKER_NAMESPACE = "AWS/SageMaker"


def dcgm_counters_csv() -> str:
    return "".join(f"{name}, {kind}, {help_}\n" for name, kind, help_ in DCGM_COUNTERS)


def dashboard_files() -> dict[str, str]:
    """Grafana dashboards shipped as code: file name -> JSON text."""
    return {p.name: p.read_text() for p in sorted(DASHBOARDS_DIR.glob("*.json"))}


@dataclass
class ObservabilityArgs:
    config: StackConfig
    """Validated stack config: metrics mode, versions, alert subscribers, SageMaker alarm thresholds."""
    cluster_name: pulumi.Input[str]
    """EKS cluster name (a label on every series, and the access entry of the managed scraper)."""
    cluster_arn: pulumi.Input[str]
    """EKS cluster ARN: the source of the Amazon Managed Prometheus scraper."""
    cluster_security_group_id: pulumi.Input[str]
    """Cluster security group: the managed scraper's ENIs carry it to reach pods on every node."""
    private_subnet_ids: pulumi.Input[list[str]]
    """Private subnets for the managed scraper's ENIs."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster."""
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
    alert_topic_arn: pulumi.Output[str]
    prometheus_url: pulumi.Output[str] | None
    """Where PromQL is answered: the in-cluster Service URL, the AMP workspace endpoint, or None (metrics: none)."""
    amp_workspace_id: pulumi.Output[str] | None

    def __init__(self, name: str, args: ObservabilityArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Observability", name, None, opts)
        self._name = name
        self._args = args
        cfg = args.config
        self.prometheus_url = None
        self.amp_workspace_id = None

        topic = self._create_alert_topic()
        self.alert_topic_arn = topic.arn
        self._create_capacity_failure_rule(topic)
        if cfg.serving.on_sagemaker and args.sagemaker_endpoint_name is not None:
            self._create_sagemaker_alarms(topic)

        mode = cfg.observability.metrics
        if mode != "none":
            k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)
            ns = _apply(f"{name}-namespace", monitoring_namespace(), k8s_opts)
            k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[ns])
            for key, obj in dcgm_exporter_objects(cfg).items():
                _apply(f"{name}-dcgm-{key}", obj, k8s_opts)
            for file_name, obj in dashboard_configmaps().items():
                _apply(f"{name}-dashboard-{file_name.removesuffix('.json')}", obj, k8s_opts)
            if mode == "in-cluster":
                self.prometheus_url = pulumi.Output.from_input(self._create_in_cluster_prometheus(k8s_opts))
            else:
                self._create_amp(k8s_opts)

        self.register_outputs(
            {
                "alert_topic_arn": self.alert_topic_arn,
                "prometheus_url": self.prometheus_url,
                "amp_workspace_id": self.amp_workspace_id,
            }
        )

    # -- metrics -------------------------------------------------------------------------------------------------------
    def _create_in_cluster_prometheus(self, k8s_opts: pulumi.ResourceOptions) -> str:
        for key, obj in prometheus_objects(self._args.config).items():
            _apply(f"{self._name}-prometheus-{key}", obj, k8s_opts)
        return f"http://prometheus.{MONITORING_NAMESPACE}.svc:{PROMETHEUS_PORT}"

    def _create_amp(self, k8s_opts: pulumi.ResourceOptions) -> None:
        """Amazon Managed Prometheus with the AWS-managed collector: nothing to run in the cluster but RBAC for it."""
        cfg, args = self._args.config, self._args
        child = pulumi.ResourceOptions(parent=self)
        workspace = aws.amp.Workspace(
            f"{self._name}-amp", alias=f"{cfg.name_prefix}-metrics", tags=args.tags, opts=child
        )
        aws.amp.Scraper(
            f"{self._name}-amp-scraper",
            alias=f"{cfg.name_prefix}-scraper",
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
            scrape_configuration=yaml.safe_dump(scrape_config(cfg, managed_collector=True), sort_keys=False),
            tags=args.tags,
            opts=child,
        )
        # The collector authenticates to the cluster as its service-linked role. On a cluster with API authentication
        # (ours) AMP creates that role's access entry itself, mapped to `aps-collector-user` (AMP user guide, "Set up
        # managed collectors for Amazon EKS"); a second one from us fails with ResourceInUseException. The RBAC below
        # grants that user read access.
        for key, obj in amp_collector_rbac().items():
            _apply(f"{self._name}-amp-{key}", obj, k8s_opts)
        self.amp_workspace_id = workspace.id
        self.prometheus_url = workspace.prometheus_endpoint

    # -- alerting ------------------------------------------------------------------------------------------------------
    def _create_alert_topic(self) -> aws.sns.Topic:
        cfg, args = self._args.config, self._args
        child = pulumi.ResourceOptions(parent=self)
        # Its own key: CloudWatch and EventBridge must be allowed to encrypt into the topic, which the AWS-managed
        # SNS key cannot grant and the stack's data key should not.
        key = aws.kms.Key(
            f"{self._name}-alerts-key",
            description=f"{cfg.name_prefix} alert topic",
            enable_key_rotation=True,
            deletion_window_in_days=7,
            policy=json.dumps(alerts_key_policy(args.account_id, args.partition)),
            tags=args.tags,
            # It holds no data, but the production policy protects every key of a protected stack (and deleting it
            # would only break alerting): follow protectData like the data key.
            opts=pulumi.ResourceOptions(parent=self, protect=cfg.storage.protect_data),
        )
        topic = aws.sns.Topic(
            f"{self._name}-alerts",
            name=f"{cfg.name_prefix}-alerts",
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
        for i, email in enumerate(cfg.observability.alert_emails):
            aws.sns.TopicSubscription(
                f"{self._name}-alerts-email-{i}", topic=topic.arn, protocol="email", endpoint=email, opts=child
            )
        return topic

    def _create_capacity_failure_rule(self, topic: aws.sns.Topic) -> None:
        """An ASG that cannot launch (no spot capacity, instance limit, bad launch template) leaves pods Pending
        silently; the ASG's own failure event is the earliest, cheapest signal."""
        cfg, args = self._args.config, self._args
        names = pulumi.Output.all(*[asg_name(ng) for _, ng in sorted(args.node_groups.items())])
        rule = aws.cloudwatch.EventRule(
            f"{self._name}-capacity-failures",
            name=f"{cfg.name_prefix}-node-launch-failures",
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
        cfg, args = self._args.config, self._args
        for key, spec in sagemaker_alarm_specs(cfg).items():
            aws.cloudwatch.MetricAlarm(
                f"{self._name}-sagemaker-{key}",
                name=f"{cfg.name_prefix}-sagemaker-{key}",
                namespace=SAGEMAKER_NAMESPACE,
                dimensions={"EndpointName": args.sagemaker_endpoint_name, "VariantName": args.sagemaker_variant_name},
                alarm_actions=[topic.arn],
                ok_actions=[topic.arn],
                tags=args.tags,
                opts=pulumi.ResourceOptions(parent=self),
                **spec,
            )


# ---------------------------------------------------------------------------------------------------------------
# Rendered objects (pure functions: what the component applies is what the tests validate)


AMP_COLLECTOR_USER = "aps-collector-user"


def monitoring_namespace() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": MONITORING_NAMESPACE,
            "labels": {
                # DCGM exporter runs as root with host paths mounted; nothing else here needs more than baseline.
                "pod-security.kubernetes.io/enforce": "privileged",
                "pod-security.kubernetes.io/warn": "baseline",
                # The serving namespace's default-deny admits port 8080 only from namespaces carrying this label.
                SERVING_ACCESS_LABEL: "allowed",
                # ... and the training namespace's admits the trainer's metrics port (9400) only from these.
                TRAINING_METRICS_ACCESS_LABEL: "allowed",
            },
        },
    }


def dcgm_exporter_objects(cfg: StackConfig) -> dict[str, dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "dcgm-exporter"}
    meta = {"name": "dcgm-exporter", "namespace": MONITORING_NAMESPACE, "labels": labels}
    gpu_purposes = sorted({p.purpose for p in cfg.cluster.gpu_pools})
    csv = dcgm_counters_csv()
    return {
        "configmap": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {"counters.csv": csv},
        },
        "daemonset": {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": meta,
            "spec": {
                "selector": {"matchLabels": labels},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                "template": {
                    "metadata": {
                        "labels": labels,
                        # Roll the pods when the counter list changes.
                        "annotations": {"llm-platform/counters-sha": hashlib.sha256(csv.encode()).hexdigest()[:16]},
                    },
                    "spec": {
                        "priorityClassName": "system-node-critical",
                        # Only GPU nodes, and despite their taint: the exporter asks for no GPU itself.
                        "affinity": {
                            "nodeAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": {
                                    "nodeSelectorTerms": [
                                        {
                                            "matchExpressions": [
                                                {"key": PURPOSE_LABEL, "operator": "In", "values": gpu_purposes}
                                            ]
                                        }
                                    ]
                                }
                            }
                        },
                        "tolerations": [{"key": GPU_TAINT["key"], "operator": "Exists", "effect": GPU_TAINT["effect"]}],
                        "containers": [
                            {
                                "name": "dcgm-exporter",
                                "image": f"{DCGM_IMAGE}:{cfg.observability.dcgm_exporter_version}",
                                "args": ["-f", "/etc/dcgm-exporter/counters.csv"],
                                "env": [
                                    {"name": "DCGM_EXPORTER_LISTEN", "value": f":{DCGM_PORT}"},
                                    # Attribute each GPU's series to the pod using it (via the pod-resources API).
                                    {"name": "DCGM_EXPORTER_KUBERNETES", "value": "true"},
                                    # Not a GPU request: the NVIDIA runtime exposes every GPU for monitoring only.
                                    {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
                                ],
                                "ports": [{"name": "metrics", "containerPort": DCGM_PORT}],
                                "readinessProbe": {"httpGet": {"path": "/health", "port": DCGM_PORT}},
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "256Mi"},
                                    "limits": {"memory": "1Gi"},
                                },
                                # NVML needs root on the host's device nodes; no added capabilities (no DCP fields).
                                "securityContext": {
                                    "runAsUser": 0,
                                    "runAsNonRoot": False,
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": False,
                                },
                                "volumeMounts": [
                                    {
                                        "name": "pod-resources",
                                        "mountPath": "/var/lib/kubelet/pod-resources",
                                        "readOnly": True,
                                    },
                                    {"name": "counters", "mountPath": "/etc/dcgm-exporter", "readOnly": True},
                                ],
                            }
                        ],
                        "volumes": [
                            {
                                "name": "pod-resources",
                                "hostPath": {"path": "/var/lib/kubelet/pod-resources", "type": "Directory"},
                            },
                            {"name": "counters", "configMap": {"name": "dcgm-exporter"}},
                        ],
                    },
                },
            },
        },
        "service": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": [{"name": "metrics", "port": DCGM_PORT, "targetPort": DCGM_PORT}],
            },
        },
    }


def _common_relabels() -> list[dict[str, Any]]:
    return [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"},
    ]


def scrape_config(cfg: StackConfig, managed_collector: bool = False) -> dict[str, Any]:
    """The scrape configuration: DCGM exporter pods, and annotated pods in the serving and training namespaces."""
    global_: dict[str, Any] = {"scrape_interval": "30s", "scrape_timeout": "10s"}
    if not managed_collector:
        # The workspace of the managed collector is per stack already; in-cluster, label series with the stack so
        # a federated or remote-written copy stays attributable.
        global_["external_labels"] = {"stack": cfg.stack}
    jobs: list[dict[str, Any]] = [
        {
            "job_name": "dcgm",
            "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [MONITORING_NAMESPACE]}}],
            "relabel_configs": [
                {
                    "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
                    "regex": "dcgm-exporter",
                    "action": "keep",
                },
                {
                    "source_labels": ["__meta_kubernetes_pod_container_port_number"],
                    "regex": str(DCGM_PORT),
                    "action": "keep",
                },
                *_common_relabels(),
            ],
        }
    ]
    for job, ns in WORKLOAD_NAMESPACES.items():
        jobs.append(
            {
                "job_name": job,
                "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [ns]}}],
                "relabel_configs": [
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                        "regex": "true",
                        "action": "keep",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
                        "regex": "(.+)",
                        "target_label": "__metrics_path__",
                    },
                    {
                        "source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
                        "regex": "([^:]+)(?::\\d+)?;(\\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    *_common_relabels(),
                ],
            }
        )
    return {"global": global_, "scrape_configs": jobs}


def prometheus_objects(cfg: StackConfig) -> dict[str, dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "prometheus"}
    meta = {"name": "prometheus", "namespace": MONITORING_NAMESPACE, "labels": labels}
    cluster_meta = {"name": "llm-platform-prometheus", "labels": labels}
    config_text = yaml.safe_dump(scrape_config(cfg), sort_keys=False)
    retention = cfg.observability.prometheus_retention_days
    return {
        "sa": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        "clusterrole": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": cluster_meta,
            # Discovery only: Prometheus reads where pods are, never their contents or secrets.
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["pods", "services", "endpoints", "nodes"],
                    "verbs": ["get", "list", "watch"],
                },
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            ],
        },
        "clusterrolebinding": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": cluster_meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_meta["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": MONITORING_NAMESPACE}],
        },
        "configmap": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {"prometheus.yml": config_text},
        },
        "service": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "selector": labels,
                "ports": [{"name": "web", "port": PROMETHEUS_PORT, "targetPort": PROMETHEUS_PORT}],
            },
        },
        "deployment": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                # Two servers on one emptyDir TSDB would corrupt it; replace, don't overlap.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "llm-platform/config-sha": hashlib.sha256(config_text.encode()).hexdigest()[:16]
                        },
                    },
                    "spec": {
                        "serviceAccountName": "prometheus",
                        "nodeSelector": {POOL_LABEL: SYSTEM_POOL},
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "fsGroup": 65534},
                        "containers": [
                            {
                                "name": "prometheus",
                                "image": f"{PROMETHEUS_IMAGE}:v{cfg.observability.prometheus_version}",
                                "args": [
                                    "--config.file=/etc/prometheus/prometheus.yml",
                                    "--storage.tsdb.path=/prometheus",
                                    f"--storage.tsdb.retention.time={retention}d",
                                ],
                                "ports": [{"name": "web", "containerPort": PROMETHEUS_PORT}],
                                "readinessProbe": {"httpGet": {"path": "/-/ready", "port": PROMETHEUS_PORT}},
                                "livenessProbe": {
                                    "httpGet": {"path": "/-/healthy", "port": PROMETHEUS_PORT},
                                    "initialDelaySeconds": 30,
                                },
                                "resources": {
                                    "requests": {"cpu": "200m", "memory": "1Gi"},
                                    "limits": {"memory": "2Gi"},
                                },
                                "securityContext": _restricted_container_security(),
                                "volumeMounts": [
                                    {"name": "config", "mountPath": "/etc/prometheus", "readOnly": True},
                                    {"name": "data", "mountPath": "/prometheus"},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "config", "configMap": {"name": "prometheus"}},
                            # Node-local: lost when the pod moves; durable history is what metrics: amp is for.
                            {"name": "data", "emptyDir": {"sizeLimit": f"{2 * retention + 2}Gi"}},
                        ],
                    },
                },
            },
        },
    }


def amp_collector_rbac() -> dict[str, dict[str, Any]]:
    """The read-only role AWS documents for the managed collector (`aps-collector-role`)."""
    return {
        "clusterrole": {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "aps-collector-role"},
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
            "metadata": {"name": "aps-collector-user-role-binding"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "aps-collector-role"},
            "subjects": [{"kind": "User", "name": AMP_COLLECTOR_USER, "apiGroup": "rbac.authorization.k8s.io"}],
        },
    }


def dashboard_configmaps() -> dict[str, dict[str, Any]]:
    """Each dashboard as a ConfigMap a Grafana dashboard sidecar (label grafana_dashboard=1) picks up."""
    return {
        file_name: {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"grafana-dashboard-{file_name.removesuffix('.json')}",
                "namespace": MONITORING_NAMESPACE,
                "labels": {"grafana_dashboard": "1"},
            },
            "data": {file_name: text},
        }
        for file_name, text in dashboard_files().items()
    }


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


def sagemaker_alarm_specs(cfg: StackConfig) -> dict[str, dict[str, Any]]:
    """MetricAlarm arguments per alarm. SageMaker publishes per-minute metrics per endpoint variant."""
    s = cfg.serving
    ceiling = s.sagemaker_max_instances * s.sagemaker_invocations_per_instance
    return {
        "latency-p90": {
            "alarm_description": "p90 model latency above the stack's target (ModelLatency is in microseconds)",
            "metric_name": "ModelLatency",
            "extended_statistic": "p90",
            "period": 60,
            "evaluation_periods": 5,
            "datapoints_to_alarm": 3,
            "threshold": cfg.observability.sagemaker_latency_p90_ms * 1000,
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
