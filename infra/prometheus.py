"""Metrics inside the cluster: the monitoring namespace, NVIDIA's DCGM exporter (its chart) on every GPU node, the
scrape configuration (GPUs, serving, training), the in-cluster Prometheus (prometheus-community's chart) when
`metrics: in-cluster`, and the Grafana dashboards as ConfigMaps. Pure functions: what the component applies (objects
through infra/k8s_objects.py, chart values through infra/charts.py) is what the tests check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from facts.cluster import (
    DCGM_PORT,
    GPU_TAINT,
    MONITORING_NAMESPACE,
    PURPOSE_LABEL,
    SERVING_NAMESPACE,
    TRAINING_NAMESPACE,
)
from infra.charts import SYSTEM_NODE_SELECTOR, gpu_toleration
from infra.config import GpuPool, ObservabilityConfig
from infra.k8s_objects import metadata
from infra.kubernetes_base import SERVING_ACCESS_LABEL, TRAINING_METRICS_ACCESS_LABEL

PROMETHEUS_SERVICE = "prometheus"
PROMETHEUS_PORT = 9090

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
"""The counters our DCGM exporter emits (its counters ConfigMap is rendered from this). Device-level fields only:
profiling (DCP) fields would need CAP_SYS_ADMIN, which this exporter is not given."""


def dcgm_counters_csv() -> str:
    return "".join(f"{name}, {kind}, {help_}\n" for name, kind, help_ in DCGM_COUNTERS)


def dashboard_files() -> dict[str, str]:
    """Grafana dashboards shipped as code: file name -> JSON text."""
    return {p.name: p.read_text() for p in sorted(DASHBOARDS_DIR.glob("*.json"))}


def monitoring_namespace() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": metadata(
            MONITORING_NAMESPACE,
            labels={
                # DCGM exporter runs as root with host paths mounted; nothing else here needs more than baseline.
                "pod-security.kubernetes.io/enforce": "privileged",
                "pod-security.kubernetes.io/warn": "baseline",
                # The serving namespace's default-deny admits port 8080 only from namespaces carrying this label.
                SERVING_ACCESS_LABEL: "allowed",
                # ... and the training namespace's admits the trainer's metrics port only from these.
                TRAINING_METRICS_ACCESS_LABEL: "allowed",
            },
        ),
    }


def dcgm_exporter_values(o: ObservabilityConfig, gpu_pools: Sequence[GpuPool]) -> dict[str, Any]:
    """Values over NVIDIA/dcgm-exporter 4.5.3-4.8.2 deployment/values.yaml (chart 4.8.2). `customMetrics` becomes the
    chart's counters ConfigMap (templates/metrics-configmap.yaml), mounted where the default `arguments` read it."""
    gpu_purposes = sorted({p.purpose for p in gpu_pools})
    return {
        "fullnameOverride": "dcgm-exporter",
        "image": {"tag": o.dcgm_exporter_version},
        "customMetrics": dcgm_counters_csv(),
        # Only GPU nodes, and despite their taint: the exporter asks for no GPU itself. (Helm replaces lists: the
        # chart's default control-plane toleration is dropped, EKS has no schedulable control plane.)
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": PURPOSE_LABEL, "operator": "In", "values": gpu_purposes}]}
                    ]
                }
            }
        },
        "tolerations": [gpu_toleration(GPU_TAINT)],
        # The chart adds SYS_ADMIN for profiling (DCP) fields; our counters are device-level only, so it goes.
        "securityContext": {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "capabilities": {"add": [], "drop": ["ALL"]},
            "allowPrivilegeEscalation": False,
        },
        # Prometheus discovers the pods itself (scrape_config's dcgm job); no ServiceMonitor CRD in this cluster.
        "serviceMonitor": {"enabled": False},
        "service": {"port": DCGM_PORT},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }


def _common_relabels() -> list[dict[str, Any]]:
    return [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_node_name"], "target_label": "node"},
    ]


def scrape_config(stack: str, managed_collector: bool = False) -> dict[str, Any]:
    """The scrape configuration: DCGM exporter pods, and annotated pods in the serving and training namespaces."""
    global_: dict[str, Any] = {"scrape_interval": "30s", "scrape_timeout": "10s"}
    if not managed_collector:
        # The workspace of the managed collector is per stack already; in-cluster, label series with the stack so
        # a federated or remote-written copy stays attributable.
        global_["external_labels"] = {"stack": stack}
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


PROMETHEUS_CHART_DEFAULT_JOBS = (
    "prometheus",
    "kubernetes-api-servers",
    "kubernetes-nodes",
    "kubernetes-nodes-cadvisor",
    "kubernetes-service-endpoints",
    "kubernetes-service-endpoints-slow",
    "prometheus-pushgateway",
    "kubernetes-services",
    "kubernetes-pods",
    "kubernetes-pods-slow",
)
"""The `scrapeConfigs` keys of the prometheus chart's values.yaml at 29.27.0. Each is switched off: the stack scrapes
exactly the jobs of `scrape_config` (the same ones the managed collector gets with `metrics: amp`)."""


def prometheus_values(o: ObservabilityConfig, stack: str) -> dict[str, Any]:
    """Values over prometheus-community/helm-charts prometheus-29.27.0 charts/prometheus/values.yaml. The server's
    prometheus.yml is `global` from server.global and `scrape_configs` from serverFiles (templates/cm.yaml)."""
    config = scrape_config(stack)
    retention = o.prometheus_retention_days
    return {
        "server": {
            # Service "prometheus" on 9090 in the monitoring namespace: the URL KEDA and the dashboards use.
            "fullnameOverride": PROMETHEUS_SERVICE,
            "service": {"servicePort": PROMETHEUS_PORT},
            "image": {"tag": f"v{o.prometheus_version}"},
            "global": config["global"],
            "retention": f"{retention}d",
            # Node-local: lost when the pod moves; durable history is what metrics: amp is for.
            "persistentVolume": {"enabled": False},
            "emptyDir": {"sizeLimit": f"{2 * retention + 2}Gi"},
            "nodeSelector": dict(SYSTEM_NODE_SELECTOR),
            "resources": {"requests": {"cpu": "200m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        },
        "serverFiles": {"prometheus.yml": {"scrape_configs": config["scrape_configs"]}},
        "scrapeConfigs": {job: {"enabled": False} for job in PROMETHEUS_CHART_DEFAULT_JOBS},
        # Only the server: alerting goes through CloudWatch/SNS (infra/alarms.py), node metrics are not needed here.
        "alertmanager": {"enabled": False},
        "kube-state-metrics": {"enabled": False},
        "prometheus-node-exporter": {"enabled": False},
        "prometheus-pushgateway": {"enabled": False},
    }


def dashboard_configmaps() -> dict[str, dict[str, Any]]:
    """Each dashboard as a ConfigMap a Grafana dashboard sidecar (label grafana_dashboard=1) picks up."""
    return {
        file_name: {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(
                f"grafana-dashboard-{file_name.removesuffix('.json')}",
                MONITORING_NAMESPACE,
                {"grafana_dashboard": "1"},
            ),
            "data": {file_name: text},
        }
        for file_name, text in dashboard_files().items()
    }
