"""System-namespace network policies: valid against the strict Kubernetes schema, a default deny in every namespace,
and each chart pod's own ports admitted from exactly its callers (the labels and ports below are what `helm template`
rendered for the pinned charts with our values: keda 2.20.2, prometheus 29.27.0, dcgm-exporter 4.8.2,
aws-load-balancer-controller 3.5.0)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import kubernetes_validate
import pytest

from facts import pulumi_types as tok
from facts.cluster import KUBE_SYSTEM, MONITORING_NAMESPACE
from infra.config import load_stack
from infra.network import plan_collector_subnets
from infra.network_policies import SystemTraffic, system_network_policies
from infra.serving_autoscaling import KEDA_NAMESPACE

VPC = "10.30.0.0/16"
API_SERVER_ENI = "10.30.1.17"  # a control-plane ENI in a private subnet
COLLECTORS = tuple(plan_collector_subnets(VPC, 3))


@dataclass(frozen=True)
class Peer:
    """A source of traffic: a pod (namespace + labels) or a bare IP (the API server's ENIs, the managed collector)."""

    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = "10.30.200.5"  # pods get VPC addresses too (VPC CNI)


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(rule_peer: dict, peer: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        return ipaddress.ip_address(peer.ip) in ipaddress.ip_network(rule_peer["ipBlock"]["cidr"])
    if not peer.namespace:
        return False
    ns_ok = (
        _selects(rule_peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace})
        if "namespaceSelector" in rule_peer
        else peer.namespace == policy_namespace
    )
    return ns_ok and _selects(rule_peer.get("podSelector", {}), peer.labels)


def admitted(policies: list[dict], namespace: str, pod: dict[str, str], source: Peer, protocol: str, port: int) -> bool:
    """NetworkPolicy ingress semantics: isolated once any policy selects the pod; then allowed if any rule of a
    selecting policy admits the source on the port."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], pod)]
    assert selecting, f"no policy selects {pod} in {namespace}: the default deny is missing"
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("protocol", "TCP") == protocol and p["port"] == port for p in ports):
                continue
            if any(_peer_matches(peer, source, namespace) for peer in rule.get("from", [])):
                return True
    return False


def _traffic(metrics: str = "in-cluster", keda: bool = True, lb: bool = True) -> SystemTraffic:
    return SystemTraffic(
        vpc_cidr=VPC,
        load_balancer_controller=lb,
        keda=keda,
        metrics=metrics,
        collector_cidrs=COLLECTORS if metrics == "amp" else (),
    )


API_SERVER = Peer(ip=API_SERVER_ENI)
SERVING_POD = Peer("llm-serving", {"app.kubernetes.io/name": "llm-serving"})
KEDA_OPERATOR = Peer(KEDA_NAMESPACE, {"app": "keda-operator", "app.kubernetes.io/name": "keda-operator"})
KEDA_METRICS_API = Peer(KEDA_NAMESPACE, {"app": "keda-operator-metrics-apiserver"})
PROMETHEUS = Peer(
    MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/component": "server"}
)
COLLECTOR = Peer(ip=str(next(ipaddress.ip_network(COLLECTORS[0]).hosts())))

CHART_PODS = {
    "coredns": (KUBE_SYSTEM, {"k8s-app": "kube-dns", "eks.amazonaws.com/component": "coredns"}),
    "lb-controller": (KUBE_SYSTEM, {"app.kubernetes.io/name": "aws-load-balancer-controller"}),
    "cluster-autoscaler": (KUBE_SYSTEM, {"app.kubernetes.io/name": "aws-cluster-autoscaler"}),
    "metrics-server": (KUBE_SYSTEM, {"k8s-app": "metrics-server"}),
    "keda-operator": (KEDA_NAMESPACE, KEDA_OPERATOR.labels),
    "keda-metrics-apiserver": (KEDA_NAMESPACE, KEDA_METRICS_API.labels),
    "keda-webhooks": (KEDA_NAMESPACE, {"app": "keda-admission-webhooks"}),
    "prometheus": (MONITORING_NAMESPACE, PROMETHEUS.labels),
    "dcgm-exporter": (MONITORING_NAMESPACE, {"app.kubernetes.io/name": "dcgm-exporter"}),
}  # fmt: skip

FLOWS = [
    # pod, source, protocol, port, admitted?
    ("coredns", SERVING_POD, "UDP", 53, True),
    ("coredns", KEDA_OPERATOR, "TCP", 53, True),
    ("coredns", SERVING_POD, "TCP", 9153, False),  # CoreDNS metrics: nobody scrapes them
    ("lb-controller", API_SERVER, "TCP", 9443, True),  # its admission webhook
    ("lb-controller", API_SERVER, "TCP", 8080, False),
    ("lb-controller", SERVING_POD, "TCP", 8080, False),
    ("metrics-server", API_SERVER, "TCP", 10251, True),  # the metrics.k8s.io APIService
    ("metrics-server", API_SERVER, "TCP", 4443, False),
    ("cluster-autoscaler", API_SERVER, "TCP", 8085, False),
    ("keda-operator", KEDA_METRICS_API, "TCP", 9666, True),
    ("keda-operator", SERVING_POD, "TCP", 9666, False),
    ("keda-metrics-apiserver", API_SERVER, "TCP", 6443, True),  # the external.metrics.k8s.io APIService
    ("keda-metrics-apiserver", SERVING_POD, "TCP", 8080, False),
    ("keda-webhooks", API_SERVER, "TCP", 9443, True),  # the keda-admission ValidatingWebhookConfiguration
    ("prometheus", KEDA_OPERATOR, "TCP", 9090, True),  # the serving ScaledObject's trigger
    ("prometheus", SERVING_POD, "TCP", 9090, False),
    ("dcgm-exporter", PROMETHEUS, "TCP", 9400, True),
    ("dcgm-exporter", SERVING_POD, "TCP", 9400, False),
]


def test_every_chart_pod_gets_its_callers_and_nothing_else() -> None:
    policies = system_network_policies(_traffic())
    wrong = []
    for pod, source, protocol, port, expected in FLOWS:
        namespace, labels = CHART_PODS[pod]
        if admitted(policies[namespace], namespace, labels, source, protocol, port) is not expected:
            wrong.append(f"{pod} {protocol}/{port} from {source}: expected {'allowed' if expected else 'denied'}")
    assert not wrong, "\n".join(wrong)


def test_known_limit_pods_share_the_api_servers_address_range() -> None:
    """The API server's ENIs and pods take addresses from the same subnets: a pod reaches a webhook port (and only
    that port). The webhook's own TLS authentication is the gate there; this test pins the limit so a change shows."""
    policies = system_network_policies(_traffic())
    namespace, labels = CHART_PODS["keda-webhooks"]
    assert admitted(policies[namespace], namespace, labels, SERVING_POD, "TCP", 9443)
    assert not admitted(policies[namespace], namespace, labels, SERVING_POD, "TCP", 8080)


def test_with_the_managed_collector_dcgm_is_scraped_from_its_subnets_only() -> None:
    policies = system_network_policies(_traffic(metrics="amp", keda=False))
    namespace, labels = CHART_PODS["dcgm-exporter"]
    assert admitted(policies[namespace], namespace, labels, COLLECTOR, "TCP", 9400)
    assert not admitted(policies[namespace], namespace, labels, Peer(ip="10.30.100.9"), "TCP", 9400)
    assert KEDA_NAMESPACE not in policies
    assert not any("prometheus" in p["metadata"]["name"] for p in policies[namespace])


def test_no_monitoring_no_keda_no_controller_no_policies_for_them() -> None:
    policies = system_network_policies(_traffic(metrics="none", keda=False, lb=False))
    assert set(policies) == {KUBE_SYSTEM}
    assert [p["metadata"]["name"] for p in policies[KUBE_SYSTEM]] == [
        "allow-dns",
        "allow-api-server-to-metrics-server",
        "default-deny-ingress",
    ]


@pytest.mark.parametrize("metrics", ["in-cluster", "amp", "none"])
@pytest.mark.parametrize("keda", [True, False])
def test_policies_pass_the_strict_schema_and_each_namespace_denies_by_default(metrics: str, keda: bool) -> None:
    version = load_stack("dev").cluster.kubernetes_version
    for namespace, objects in system_network_policies(_traffic(metrics=metrics, keda=keda)).items():
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
            assert obj["metadata"]["namespace"] == namespace
        deny = objects[-1]
        assert deny["metadata"]["name"] == "default-deny-ingress"
        assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_the_program_declares_them_and_the_deny_waits_for_the_allows(run_stack) -> None:
    run = run_stack("dev")
    policies = [r for r in run.of_type(tok.K8S_NETWORK_POLICY) if r.parent == "system-network-policies"]
    by_namespace: dict[str, list] = {}
    for r in policies:
        by_namespace.setdefault(r.inputs["metadata"]["namespace"], []).append(r)
    assert set(by_namespace) == {KUBE_SYSTEM, MONITORING_NAMESPACE}  # dev: in-cluster metrics, cpu autoscaler
    for records in by_namespace.values():
        deny = next(r for r in records if r.inputs["metadata"]["name"] == "default-deny-ingress")
        allows = [r for r in records if r is not deny]
        assert allows and all(any(a.name in d for d in deny.depends_on) for a in allows)
