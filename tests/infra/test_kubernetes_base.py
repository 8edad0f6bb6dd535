"""The cluster's base objects under the mock engine: namespaces, Pod Identity, GPU quotas and network policies,
each validated against the configured Kubernetes version's schema. (Device plugins: test_gpu_plugins.py.)"""

from __future__ import annotations

import ipaddress
from typing import Any

import kubernetes_validate
import pulumi
import pulumi_kubernetes as k8s
import pytest

from facts import pulumi_types as tok
from facts.cluster import PREPARE_SERVICE_ACCOUNT, SERVING_OPS_PORT, TRAINING_METRICS_PORT
from facts.tags import stack_tags
from infra.config import StackConfig
from infra.config import load_stack as stack_config
from infra.kubernetes_base import (
    POD_IDENTITY_AGENT_CIDR,
    SERVING_ACCESS_LABEL,
    TRAINING_METRICS_ACCESS_LABEL,
    KubernetesBase,
    KubernetesBaseArgs,
    WorkloadIdentities,
    WorkloadIdentitiesArgs,
)
from infra.network import plan_collector_subnets
from infra.prometheus import monitoring_namespace
from ops.mocks import Recorded, Run, run_program

TRAINING_ROLE = "arn:aws:iam::123456789012:role/llmp-dev-training"
SERVING_ROLE = "arn:aws:iam::123456789012:role/llmp-dev-serving"
PREPARE_ROLE = "arn:aws:iam::123456789012:role/llmp-dev-data-prepare"
NETWORK_POLICY = tok.K8S_NETWORK_POLICY
S3_PREFIX_LIST = ["3.5.0.0/19", "52.216.0.0/15", "54.231.0.0/16"]
"""What ops.mocks answers for the region's S3 prefix list, sorted."""


def run_base(cfg: StackConfig) -> tuple[Run, dict[str, Any]]:
    attrs: dict[str, Any] = {}

    def program() -> dict[str, Any]:
        provider = k8s.Provider("k8s", kubeconfig="{}")
        base = KubernetesBase(
            "base",
            KubernetesBaseArgs(
                cluster=cfg.cluster,
                network=cfg.network,
                serving=cfg.serving,
                observability=cfg.observability,
                region=cfg.region,
                provider=provider,
            ),
            opts=pulumi.ResourceOptions(),
        )
        # The associations are the AWS layer's (infra/layers.py); declared here too, as the environment has both.
        WorkloadIdentities(
            "workload-identities",
            WorkloadIdentitiesArgs(
                cluster_name="llmp-dev",
                training_role_arn=TRAINING_ROLE,
                serving_role_arn=SERVING_ROLE,
                prepare_role_arn=PREPARE_ROLE,
                tags=stack_tags(cfg.stack, cfg.environment),
            ),
        )
        attrs.update(
            training_namespace=base.training_namespace,
            serving_namespace=base.serving_namespace,
            training_service_account=base.training_service_account,
            serving_service_account=base.serving_service_account,
        )
        return {}

    return run_program(program, {}, cfg.stack, cfg.project, cfg.region), attrs


def as_k8s_object(rec: Recorded) -> dict[str, Any]:
    """The object as the provider sends it to the API server (the recording mocks restore integers)."""
    return rec.inputs


def kubernetes_objects(run: Run) -> list[Recorded]:
    return [r for r in run.resources if r.type.startswith("kubernetes:")]


@pytest.fixture
def dev() -> tuple[StackConfig, Run, dict[str, Any]]:
    cfg = stack_config("dev")
    run, attrs = run_base(cfg)
    return cfg, run, attrs


def policies(run: Run, namespace: str) -> dict[str, dict[str, Any]]:
    return {
        r.inputs["metadata"]["name"]: r.inputs["spec"]
        for r in run.of_type(NETWORK_POLICY)
        if r.inputs["metadata"]["namespace"] == namespace
    }


def test_every_object_is_valid_for_the_configured_kubernetes_version(dev: tuple[StackConfig, Run, dict]) -> None:
    cfg, run, _ = dev
    objects = kubernetes_objects(run)
    assert len(objects) >= 12
    for rec in objects:
        kubernetes_validate.validate(as_k8s_object(rec), cfg.cluster.kubernetes_version, strict=True)
        assert rec.provider and "k8s" in rec.provider, f"{rec.name} must use the cluster's explicit provider"


def test_validation_catches_a_misspelled_field(dev: tuple[StackConfig, Run, dict]) -> None:
    cfg, run, _ = dev
    obj = as_k8s_object(run.of_type(NETWORK_POLICY)[0])
    obj["spec"]["policyTypes"] = ["Ingress"]
    kubernetes_validate.validate(obj, cfg.cluster.kubernetes_version, strict=True)
    obj["spec"]["podSelecter"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, cfg.cluster.kubernetes_version, strict=True)


def test_namespaces_and_pod_security(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, attrs = dev
    namespaces = {r.inputs["metadata"]["name"]: r.inputs["metadata"]["labels"] for r in run.of_type(tok.K8S_NAMESPACE)}
    assert set(namespaces) == {attrs["training_namespace"], attrs["serving_namespace"]}
    assert namespaces[attrs["serving_namespace"]]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespaces[attrs["training_namespace"]]["pod-security.kubernetes.io/enforce"] == "baseline"
    for labels in namespaces.values():
        assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert namespaces[attrs["serving_namespace"]][SERVING_ACCESS_LABEL] == "allowed"


def test_service_accounts_bound_to_pod_identity_roles(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, attrs = dev
    accounts = {
        (r.inputs["metadata"]["namespace"], r.inputs["metadata"]["name"]) for r in run.of_type(tok.K8S_SERVICE_ACCOUNT)
    }
    associations = {
        (r.inputs["namespace"], r.inputs["serviceAccount"]): r.inputs
        for r in run.of_type(tok.EKS_POD_IDENTITY_ASSOCIATION)
    }
    training = (attrs["training_namespace"], attrs["training_service_account"])
    serving = (attrs["serving_namespace"], attrs["serving_service_account"])
    # Data preparation: its own account in the training namespace (its network policies), its own role.
    prepare = (attrs["training_namespace"], PREPARE_SERVICE_ACCOUNT)
    assert accounts == set(associations) == {training, serving, prepare}
    assert associations[training]["roleArn"] == TRAINING_ROLE
    assert associations[serving]["roleArn"] == SERVING_ROLE
    assert associations[prepare]["roleArn"] == PREPARE_ROLE
    for assoc in associations.values():
        assert assoc["clusterName"] == "llmp-dev"
        assert assoc["tags"] == stack_tags("dev", "dev")


def test_gpu_quotas_follow_the_pools(dev: tuple[StackConfig, Run, dict]) -> None:
    cfg, run, attrs = dev
    quotas = {r.inputs["metadata"]["namespace"]: r.inputs["spec"]["hard"] for r in run.of_type(tok.K8S_RESOURCE_QUOTA)}
    assert quotas == {
        attrs["training_namespace"]: {"requests.nvidia.com/gpu": str(cfg.cluster.pool("training").max_gpus)},
        attrs["serving_namespace"]: {"requests.nvidia.com/gpu": str(cfg.cluster.pool("inference").max_gpus)},
    }


def test_quota_grows_with_the_pool() -> None:
    cfg = stack_config("dev", trainingInstanceTypes=["g6e.12xlarge"], trainingMaxSize=3, maxGpus=16)
    run, attrs = run_base(cfg)
    quota = next(
        r
        for r in run.of_type(tok.K8S_RESOURCE_QUOTA)
        if r.inputs["metadata"]["namespace"] == attrs["training_namespace"]
    )
    assert quota.inputs["spec"]["hard"] == {"requests.nvidia.com/gpu": "12"}


@pytest.mark.parametrize("key", ["training_namespace", "serving_namespace"])
def test_default_deny_plus_dns_and_https(dev: tuple[StackConfig, Run, dict], key: str) -> None:
    _, run, attrs = dev
    specs = policies(run, attrs[key])
    assert specs["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    [dns] = specs["allow-dns"]["egress"]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    s3, agent = specs["allow-aws-egress"]["egress"]
    # S3 (through the gateway endpoint, so S3's own addresses: the region's prefix list), on 443 only.
    assert s3 == {"to": [{"ipBlock": {"cidr": c}} for c in S3_PREFIX_LIST], "ports": [{"protocol": "TCP", "port": 443}]}
    assert agent == {"to": [{"ipBlock": {"cidr": POD_IDENTITY_AGENT_CIDR}}], "ports": [{"protocol": "TCP", "port": 80}]}
    assert tok.EC2_GET_PREFIX_LIST in run.mocks.invokes


@pytest.mark.parametrize("key", ["training_namespace", "serving_namespace"])
def test_no_egress_to_anywhere(dev: tuple[StackConfig, Run, dict], key: str) -> None:
    # "Default deny" means nothing: every egress rule names its peers; no rule without "to" (any destination) and
    # no ipBlock wider than the S3 ranges (never 0.0.0.0/0, never the whole VPC).
    _, run, attrs = dev
    for name, spec in policies(run, attrs[key]).items():
        for rule in spec.get("egress", []):
            assert rule.get("to"), (name, rule)
            for peer in rule["to"]:
                cidr = peer.get("ipBlock", {}).get("cidr")
                assert cidr is None or ipaddress.ip_network(cidr).prefixlen >= 15, (name, cidr)


def test_training_pods_reach_each_other_on_any_port(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, attrs = dev
    spec = policies(run, attrs["training_namespace"])["allow-within-namespace"]
    assert spec["ingress"] == [{"from": [{"podSelector": {}}]}]
    assert spec["egress"] == [{"to": [{"podSelector": {}}]}]
    assert "allow-within-namespace" not in policies(run, attrs["serving_namespace"])


def test_serving_ingress_only_on_8080_from_allowed_namespaces(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, attrs = dev
    [rule] = policies(run, attrs["serving_namespace"])["allow-http-ingress"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {SERVING_ACCESS_LABEL: "allowed"}}}]


def test_serving_ingress_admits_the_alb_when_ingress_is_on() -> None:
    cfg = stack_config("dev", servingIngress=True)
    run, attrs = run_base(cfg)
    [rule] = policies(run, attrs["serving_namespace"])["allow-http-ingress"]["ingress"]
    assert {"ipBlock": {"cidr": cfg.network.vpc_cidr}} in rule["from"]


def test_training_metrics_port_admits_only_the_monitoring_namespace(dev: tuple[StackConfig, Run, dict]) -> None:
    cfg, run, attrs = dev
    assert cfg.observability.metrics == "in-cluster"
    [rule] = policies(run, attrs["training_namespace"])["allow-metrics-ingress"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": TRAINING_METRICS_PORT}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {TRAINING_METRICS_ACCESS_LABEL: "allowed"}}}]
    # The label the monitoring namespace carries.
    assert monitoring_namespace()["metadata"]["labels"][TRAINING_METRICS_ACCESS_LABEL] == "allowed"
    # the serving pods' /metrics is on their operations port, admitted from the same scrapers and no client namespace
    [rule] = policies(run, attrs["serving_namespace"])["allow-metrics-ingress"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": SERVING_OPS_PORT}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {TRAINING_METRICS_ACCESS_LABEL: "allowed"}}}]


def test_metrics_ports_admit_only_the_managed_collectors_subnets_with_amp() -> None:
    # The AMP collector connects from its ENIs in the subnets given to the scraper: those are dedicated subnets no pod
    # takes an address in, so admitting them (not the VPC) lets the collector in and nothing else.
    cfg = stack_config("dev", metrics="amp")
    run, attrs = run_base(cfg)
    collectors = [{"ipBlock": {"cidr": c}} for c in plan_collector_subnets(cfg.network.vpc_cidr, cfg.network.az_count)]
    assert len(collectors) == cfg.network.az_count
    [rule] = policies(run, attrs["training_namespace"])["allow-metrics-ingress"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": TRAINING_METRICS_PORT}]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {TRAINING_METRICS_ACCESS_LABEL: "allowed"}}},
        *collectors,
    ]
    [rule] = policies(run, attrs["serving_namespace"])["allow-http-ingress"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {SERVING_ACCESS_LABEL: "allowed"}}}, *collectors]


def test_children_named_and_parented(dev: tuple[StackConfig, Run, dict]) -> None:
    _, run, _ = dev
    assert run.duplicate_names() == []
    for r in run.resources:
        if r.type in ("llm-platform:infra:KubernetesBase", tok.KUBERNETES_PROVIDER):
            continue
        if "WorkloadIdentities" in r.type or r.parent == "workload-identities":
            continue  # the AWS layer's half (infra/layers.py)
        assert r.parent == "base" and r.name.startswith("base-"), r.name


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_shipped_stacks_are_valid_for_their_kubernetes_version(stack: str) -> None:
    cfg = stack_config(stack)
    run, _ = run_base(cfg)
    assert run.duplicate_names() == []
    for rec in (r for r in run.resources if r.type.startswith("kubernetes:")):
        kubernetes_validate.validate(as_k8s_object(rec), cfg.cluster.kubernetes_version, strict=True)
