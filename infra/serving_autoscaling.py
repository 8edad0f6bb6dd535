"""Serving scaled on its own load: KEDA (its upstream chart) and a ScaledObject that scales the serving Deployment on
in-flight requests per replica, and to zero out of hours. Installed when `servingAutoscaler: keda`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from infra import k8s_objects
from infra.charts import SYSTEM_NODE_SELECTOR, install_chart
from infra.config import AutoscalingConfig, ServingConfig

CHART = "keda"
KEDA_NAMESPACE = "keda"
KEDA_API_VERSION = "keda.sh/v1alpha1"
SCALED_OBJECT_CRD = "infra/crds/keda.sh_scaledobjects.json"


def keda_values() -> dict[str, Any]:
    """Values over kedacore/charts v2.20.2 keda/values.yaml. The top-level nodeSelector applies to the operator, the
    metrics API server and the admission webhooks alike (templates: `.Values.operator.nodeSelector | default
    .Values.nodeSelector`). KEDA needs no AWS identity here: its only trigger is the in-cluster Prometheus."""
    return {
        "nodeSelector": dict(SYSTEM_NODE_SELECTOR),
        "crds": {"install": True},
        "priorityClassName": "system-cluster-critical",
    }


@dataclass
class ServingAutoscalingArgs:
    autoscaling: AutoscalingConfig
    """Target load per replica, scale-to-zero and its active-hours window."""
    serving: ServingConfig
    """Replica floor and ceiling."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster."""
    namespace: pulumi.Input[str]
    """Namespace of the serving Deployment."""
    deployment_name: pulumi.Input[str]
    """Name of the serving Deployment to scale."""
    prometheus_url: pulumi.Input[str]
    """In-cluster Prometheus the KEDA scaler queries (infra.observability.Observability.prometheus_url)."""


class ServingAutoscaling(pulumi.ComponentResource):
    """KEDA in its own namespace, and a ScaledObject that scales serving on in-flight requests per replica (and to
    zero out of hours)."""

    scaled_object_name: pulumi.Output[str]
    """The KEDA ScaledObject scaling the serving Deployment (named after it)."""
    chart: k8s.helm.v4.Chart
    """The KEDA Helm chart release (installs the ScaledObject CRD and its admission webhook)."""

    def __init__(self, name: str, args: ServingAutoscalingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:ServingAutoscaling", name, None, opts)
        namespace = k8s_objects.apply(
            f"{name}-keda-namespace",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                # The chart's pods set runAsNonRoot, drop all capabilities and use RuntimeDefault seccomp.
                "metadata": k8s_objects.metadata(
                    KEDA_NAMESPACE,
                    labels={**k8s_objects.MANAGED_BY, "pod-security.kubernetes.io/enforce": "restricted"},
                ),
            },
            pulumi.ResourceOptions(parent=self, provider=args.provider),
        )
        self.chart = install_chart(
            f"{name}-keda",
            CHART,
            KEDA_NAMESPACE,
            keda_values(),
            pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[namespace]),
        )
        body = pulumi.Output.all(args.namespace, args.deployment_name, args.prometheus_url).apply(
            lambda a: scaled_object(args.autoscaling, args.serving, a[0], a[1], a[2])
        )
        so = k8s_objects.apply(
            f"{name}-scaledobject",
            {
                "apiVersion": KEDA_API_VERSION,
                "kind": "ScaledObject",
                "metadata": body["metadata"],
                "spec": body["spec"],
            },
            # The chart installs the ScaledObject CRD and the admission webhook that validates it.
            pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[self.chart]),
        )
        self.scaled_object_name = so.metadata["name"]
        self.register_outputs({"scaled_object_name": self.scaled_object_name})


def serving_load_query(namespace: str, deployment: str) -> str:
    """Requests a replica holds now (being decoded or waiting for a batch slot), summed over the Deployment."""
    return f'sum(llm_serving_inflight_requests{{namespace="{namespace}",pod=~"{deployment}-.*"}})'


def scaled_object(
    a: AutoscalingConfig, s: ServingConfig, namespace: str, deployment: str, prometheus_url: str
) -> dict[str, Any]:
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
