"""Network policies for the system namespaces (cluster layer): kube-system, keda and monitoring.

Each namespace gets a default-deny for ingress, then one policy per controller that receives traffic, admitting
exactly its sources on exactly the ports its pinned chart (infra/charts.py) or EKS add-on listens on. Egress stays
open: these controllers call the Kubernetes API, AWS APIs and each other on addresses that change (API server ENIs,
regional endpoints), and what they may do there is bounded by RBAC and IAM, not by addresses.

What the VPC CNI's network policy agent does by itself, and so needs no rule here:
- traffic from the pod's own node is always allowed (aws/aws-network-policy-agent PR #65, "Ignore policy restrictions
  against Node IP"): kubelet probes and `kubectl port-forward` keep working;
- hostNetwork pods (aws-node, kube-proxy, eks-pod-identity-agent, the EBS CSI node plugin) are not subject to policies.

The Kubernetes API server reaches webhooks and aggregated APIs from the control plane's ENIs, which EKS places in the
cluster's subnets: those flows are admitted from the VPC CIDR, on the webhook's port only. Pods take their addresses
from the same subnets (VPC CNI), so a pod can reach those ports too: no address tells the API server from a pod here.
The webhooks and aggregated APIs authenticate their callers (TLS client certificates, delegated authn), which is what
protects them; the policies still close every other port of those controllers.

Ports and pod labels, read from the charts at their pinned tags and checked by rendering them with `helm template`
(helm v4.1.4, our values):
- CoreDNS (EKS add-on, `k8s-app: kube-dns`): 53/UDP and 53/TCP from every pod.
- metrics-server (EKS community add-on, `k8s-app: metrics-server`): the aggregated metrics API, called by the API
  server on 10251 (EKS user guide, "Metrics Server": the add-on version is pre-configured to use port 10251).
- aws-load-balancer-controller (eks-charts v0.0.242 stable/aws-load-balancer-controller, chart 3.5.0): webhook
  `webhookBindPort` default 9443 (templates/deployment.yaml, containerPort webhook-server).
- KEDA (kedacore/charts v2.20.2 keda): keda-operator gRPC 9666 (templates/manager/deployment.yaml), called by the
  metrics API server; keda-operator-metrics-apiserver 6443 (`service.portHttpsTarget`), called by the API server;
  keda-admission-webhooks 9443 (`webhooks.port` default), called by the API server.
- Prometheus (prometheus-community/helm-charts prometheus-29.27.0, server only): 9090 (`prometheus.port`), queried by
  the KEDA operator (the serving ScaledObject's trigger).
- dcgm-exporter (NVIDIA/dcgm-exporter 4.5.3-4.8.2 deployment, chart 4.8.2; hostNetwork false): 9400, scraped by the
  in-cluster Prometheus server, or by the managed collector from its own subnets (metrics: amp).
Controllers no one calls (cluster-autoscaler, aws-node-termination-handler, the device plugins, the EBS CSI
controller) get only the default deny: their metrics ports are not scraped by this stack's Prometheus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from facts.cluster import DCGM_PORT, KUBE_SYSTEM, MONITORING_NAMESPACE
from infra import k8s_objects
from infra.prometheus import PROMETHEUS_PORT
from infra.serving_autoscaling import KEDA_NAMESPACE

TCP, UDP = "TCP", "UDP"
_NAMESPACE_LABEL = "kubernetes.io/metadata.name"
METRICS_SERVER_PORT = 10251
LB_CONTROLLER_WEBHOOK_PORT = 9443
KEDA_OPERATOR_GRPC_PORT = 9666
KEDA_METRICS_APISERVER_PORT = 6443
KEDA_WEBHOOK_PORT = 9443


@dataclass(frozen=True, kw_only=True)
class SystemTraffic:
    """What runs in the system namespaces, so only policies for what exists are written."""

    vpc_cidr: str
    """Where the API server's ENIs (webhook and aggregated-API callers) take their addresses."""
    load_balancer_controller: bool
    keda: bool
    metrics: str
    """ObservabilityConfig.metrics: 'in-cluster' (Prometheus + dcgm-exporter), 'amp' (dcgm-exporter, scraped by the
    managed collector) or 'none' (no monitoring namespace)."""
    collector_cidrs: tuple[str, ...] = ()
    """The managed collector's subnets (metrics: amp)."""


def _policy(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": k8s_objects.metadata(name, namespace, k8s_objects.MANAGED_BY),
        "spec": spec,
    }


def _allow(
    namespace: str,
    name: str,
    pods: dict[str, str],
    sources: list[dict[str, Any]],
    ports: list[tuple[str, int]] | None,
) -> dict[str, Any]:
    """Admit `sources` to the pods labelled `pods` on `ports` (every port when None)."""
    rule: dict[str, Any] = {"from": sources}
    if ports is not None:
        rule["ports"] = [{"protocol": protocol, "port": port} for protocol, port in ports]
    return _policy(
        namespace, name, {"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"], "ingress": [rule]}
    )


def _default_deny(namespace: str) -> dict[str, Any]:
    return _policy(namespace, "default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]})


def system_network_policies(t: SystemTraffic) -> dict[str, list[dict[str, Any]]]:
    """The policies per namespace, allows first and the default deny last (the order they are created in)."""
    api_server = [{"ipBlock": {"cidr": t.vpc_cidr}}]
    kube_system = [
        _allow(KUBE_SYSTEM, "allow-dns", {"k8s-app": "kube-dns"}, [{"namespaceSelector": {}}], [(UDP, 53), (TCP, 53)]),
        _allow(
            KUBE_SYSTEM,
            "allow-api-server-to-metrics-server",
            {"k8s-app": "metrics-server"},
            api_server,
            [(TCP, METRICS_SERVER_PORT)],
        ),
    ]
    if t.load_balancer_controller:
        kube_system.append(
            _allow(
                KUBE_SYSTEM,
                "allow-api-server-to-lb-controller-webhook",
                {"app.kubernetes.io/name": "aws-load-balancer-controller"},
                api_server,
                [(TCP, LB_CONTROLLER_WEBHOOK_PORT)],
            )
        )
    policies = {KUBE_SYSTEM: [*kube_system, _default_deny(KUBE_SYSTEM)]}
    if t.keda:
        policies[KEDA_NAMESPACE] = [
            _allow(
                KEDA_NAMESPACE,
                "allow-metrics-apiserver-to-operator",
                {"app": "keda-operator"},
                [{"podSelector": {"matchLabels": {"app": "keda-operator-metrics-apiserver"}}}],
                [(TCP, KEDA_OPERATOR_GRPC_PORT)],
            ),
            _allow(
                KEDA_NAMESPACE,
                "allow-api-server-to-metrics-apiserver",
                {"app": "keda-operator-metrics-apiserver"},
                api_server,
                [(TCP, KEDA_METRICS_APISERVER_PORT)],
            ),
            _allow(
                KEDA_NAMESPACE,
                "allow-api-server-to-webhooks",
                {"app": "keda-admission-webhooks"},
                api_server,
                [(TCP, KEDA_WEBHOOK_PORT)],
            ),
            _default_deny(KEDA_NAMESPACE),
        ]
    if t.metrics != "none":
        monitoring: list[dict[str, Any]] = []
        scrapers: list[dict[str, Any]] = [{"ipBlock": {"cidr": c}} for c in t.collector_cidrs]
        if t.metrics == "in-cluster":
            server = {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/component": "server"}
            scrapers.insert(0, {"podSelector": {"matchLabels": server}})
            if t.keda:
                keda_operator = {
                    "namespaceSelector": {"matchLabels": {_NAMESPACE_LABEL: KEDA_NAMESPACE}},
                    "podSelector": {"matchLabels": {"app": "keda-operator"}},
                }
                monitoring.append(
                    _allow(
                        MONITORING_NAMESPACE,
                        "allow-keda-to-prometheus",
                        server,
                        [keda_operator],
                        [(TCP, PROMETHEUS_PORT)],
                    )
                )
        monitoring.append(
            _allow(
                MONITORING_NAMESPACE,
                "allow-scrape-dcgm-exporter",
                {"app.kubernetes.io/name": "dcgm-exporter"},
                scrapers,
                [(TCP, DCGM_PORT)],
            )
        )
        policies[MONITORING_NAMESPACE] = [*monitoring, _default_deny(MONITORING_NAMESPACE)]
    return policies


@dataclass(kw_only=True)
class SystemNetworkPoliciesArgs:
    traffic: SystemTraffic
    provider: pulumi.ProviderResource
    depends_on: list[pulumi.Resource]
    """What creates the keda and monitoring namespaces (ServingAutoscaling, Observability)."""


class SystemNetworkPolicies(pulumi.ComponentResource):
    """Default-deny ingress plus the controllers' own flows in kube-system, keda and monitoring."""

    def __init__(self, name: str, args: SystemNetworkPoliciesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:SystemNetworkPolicies", name, None, opts)
        for namespace, objects in system_network_policies(args.traffic).items():
            allows: list[pulumi.Resource] = []
            for obj in objects:
                deny = obj["metadata"]["name"] == "default-deny-ingress"
                # The deny goes in after the allows (and out before them): CoreDNS and the webhooks never see a
                # window in which only the deny exists.
                depends = [*args.depends_on, *(allows if deny else [])]
                opts_ = pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=depends)
                created = k8s_objects.apply(f"{name}-{namespace}-{obj['metadata']['name']}", obj, opts_)
                allows.append(created)
        self.register_outputs({})
