"""Third-party cluster software comes from pinned upstream charts, in every shipped stack and with ingress and KEDA
switched on: every chart the program installs is in the pinned table (chart, version, repository), goes through the
cluster's provider, and the image versions the config keys default to are the ones those charts ship."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from facts import pulumi_types as tok
from facts.tags import stack_tags
from infra.charts import CHART_TYPE, CHARTS
from infra.config import load_stack, schema
from infra.load_balancer_controller import (
    IAM_POLICY_FILE,
    IAM_POLICY_SHA256,
    SERVICE_ACCOUNT,
    load_balancer_controller_policy,
)
from infra.versions import cluster_autoscaler_for
from ops.mocks import Run

POD_IDENTITY = tok.EKS_POD_IDENTITY_ASSOCIATION
ROLE_POLICY = tok.IAM_ROLE_POLICY


def installed(run: Run) -> dict[str, dict]:
    by_chart = {pinned.chart: key for key, pinned in CHARTS.items()}
    out = {}
    for rec in run.of_type(CHART_TYPE):
        key = by_chart[rec.inputs["chart"]]
        pinned = CHARTS[key]
        assert rec.inputs["version"] == pinned.version, rec.name
        assert (rec.inputs.get("repositoryOpts") or {}).get("repo") == pinned.repository, rec.name
        assert pinned.repository is None or pinned.repository.startswith("https://")
        assert pinned.repository is not None or pinned.chart.startswith("oci://")
        assert rec.provider and "k8s" in rec.provider, f"{rec.name} must use the cluster's explicit provider"
        assert key not in out, f"{key} installed twice"
        out[key] = rec.inputs
    return out


ALWAYS = {"cluster-autoscaler", "nvidia-device-plugin"}
SHIPPED_CHARTS = {
    # SPOT training and inference pools (spot interruptions), no EFA, metrics: in-cluster
    "dev": ALWAYS | {"aws-node-termination-handler", "dcgm-exporter", "prometheus"},
    # ON_DEMAND pools, trainingEfa: true, metrics: in-cluster
    "staging": ALWAYS | {"aws-efa-k8s-device-plugin", "dcgm-exporter", "prometheus"},
    # ON_DEMAND pools, trainingEfa: true, metrics: amp (the managed scraper, no Prometheus server in the cluster)
    "prod": ALWAYS | {"aws-efa-k8s-device-plugin", "dcgm-exporter"},
}
"""What each shipped stack installs, read off stacks/Pulumi.<stack>.yaml (stated, not recomputed from the config)."""


def test_every_shipped_stack_installs_only_pinned_charts(shipped: tuple) -> None:
    cfg, run = shipped
    charts = installed(run)
    assert set(charts) == SHIPPED_CHARTS[cfg.stack]
    # No hand-written controller is left: our own workloads are the serving Deployment only.
    deployments = [r for r in run.of_type(tok.K8S_DEPLOYMENT)]
    assert all(r.parent == "serving-eks" for r in deployments), [r.name for r in deployments]
    assert not run.of_type(tok.K8S_DAEMON_SET)


def test_charts_follow_the_capacity_and_metrics_keys(run_stack: Callable[..., Run]) -> None:
    """Each optional chart goes with its key: dev on demand and without metrics keeps only the two it always needs."""
    on_demand = {
        "llm-platform:trainingCapacityType": "ON_DEMAND",
        "llm-platform:inferenceCapacityType": "ON_DEMAND",
        "llm-platform:batchCapacityType": "ON_DEMAND",  # a spot batch pool alone needs the termination handler
    }
    assert set(installed(run_stack("dev", on_demand))) == ALWAYS | {"dcgm-exporter", "prometheus"}
    assert set(installed(run_stack("dev", {**on_demand, "llm-platform:metrics": "none"}))) == ALWAYS
    assert set(installed(run_stack("dev", {"llm-platform:metrics": "amp"}))) == ALWAYS | {
        "aws-node-termination-handler",
        "dcgm-exporter",
    }


def test_keda_and_the_load_balancer_controller_install_when_used(run_stack: Callable[..., Run]) -> None:
    run = run_stack(
        "dev",
        {
            "llm-platform:servingAutoscaler": "keda",
            "llm-platform:servingIngress": True,
            "llm-platform:servingImageTag": "0.1.0",
        },
    )
    cfg = load_stack("dev")
    charts = installed(run)
    assert {"keda", "aws-load-balancer-controller"} <= set(charts)
    lbc = charts["aws-load-balancer-controller"]["values"]
    assert lbc["clusterName"] == cfg.name_prefix and lbc["region"] == cfg.region
    assert lbc["vpcId"].startswith("vpc-")
    assert lbc["serviceAccount"] == {"create": True, "name": SERVICE_ACCOUNT}
    assert lbc["nodeSelector"] == {"llm-platform/pool": "system"}
    assert lbc["ingressClass"] == "alb" and lbc["createIngressClassResource"] is True
    assert lbc["defaultTags"] == stack_tags(cfg.stack, cfg.environment)
    ingress = run.one(tok.K8S_INGRESS).inputs
    assert ingress["spec"]["ingressClassName"] == lbc["ingressClass"]
    assoc = run.one(POD_IDENTITY, "load-balancer-controller-pod-identity").inputs
    assert (assoc["namespace"], assoc["serviceAccount"]) == ("kube-system", SERVICE_ACCOUNT)
    policy = run.one(ROLE_POLICY, "load-balancer-controller-policy").inputs["policy"]
    assert json.loads(policy) == json.loads(IAM_POLICY_FILE.read_text())
    (chart,) = [r for r in run.of_type(CHART_TYPE) if r.inputs["chart"] == "aws-load-balancer-controller"]
    # Role, policy and association are the AWS layer's, applied before the cluster layer installs the chart.
    assert run.one(POD_IDENTITY, "load-balancer-controller-pod-identity").stack == cfg.stack
    assert run.one(ROLE_POLICY, "load-balancer-controller-policy").stack == cfg.stack
    assert chart.stack == f"{cfg.stack}-cluster"
    # The Ingress's Deployment waits for the controller (its webhook must answer first).
    serving = run.one("llm-platform:infra:ServingOnEks")
    assert "llm-platform:infra:LoadBalancerController::load-balancer-controller" in serving.depends_on


def test_load_balancer_controller_policy_is_the_pinned_upstream_file() -> None:
    document = json.loads(load_balancer_controller_policy())
    # Every mutating statement of upstream's policy is scoped by a condition or to its own resources.
    assert len(document["Statement"]) >= 10
    assert IAM_POLICY_FILE.name.endswith("v3.5.0-iam_policy.json") and len(IAM_POLICY_SHA256) == 64
    assert CHARTS["aws-load-balancer-controller"].app_version == "v3.5.0"


def test_load_balancer_controller_policy_refuses_an_edited_copy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import infra.load_balancer_controller as lbc

    edited = tmp_path / IAM_POLICY_FILE.name
    edited.write_text(IAM_POLICY_FILE.read_text().replace('"Effect": "Allow"', '"Effect":"Allow"', 1))
    monkeypatch.setattr(lbc, "IAM_POLICY_FILE", edited)
    with pytest.raises(ValueError, match="expected"):
        lbc.load_balancer_controller_policy()


def test_image_defaults_are_the_charts_own_releases() -> None:
    """The config keys override the image tag of a pinned chart; their defaults are what that chart ships."""
    keys = schema()
    assert keys["nodeTerminationHandlerVersion"].default == CHARTS["aws-node-termination-handler"].app_version
    assert keys["prometheusVersion"].default == CHARTS["prometheus"].app_version.removeprefix("v")
    # NVIDIA/dcgm-exporter 4.5.3-4.8.2 deployment/values.yaml: image.tag (distroless is the flavour it publishes).
    assert keys["dcgmExporterVersion"].default == f"4.5.3-{CHARTS['dcgm-exporter'].app_version}-distroless"
    # The autoscaler is the exception: its image must follow the cluster's Kubernetes minor, not the chart's.
    # An empty default follows kubernetesVersion through infra/versions.py (issue 9): one place to move both.
    assert keys["clusterAutoscalerVersion"].default == ""
    assert (
        cluster_autoscaler_for(keys["kubernetesVersion"].default).rsplit(".", 1)[0] == keys["kubernetesVersion"].default
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.lstrip("v").split("."))


def test_pins_are_at_or_past_the_releases_that_fix_our_hand_copies() -> None:
    """The bugs the hand copies had, fixed upstream: each pin must not go back before the fix."""
    # templates/clusterrole.yaml lists storage.k8s.io volumeattachments from chart 9.46.3 on (kubernetes/autoscaler
    # #7663, #8678: without it CA 1.32+ stops adding nodes).
    assert _version(CHARTS["cluster-autoscaler"].version) >= (9, 46, 3)
    # The queue-mode Deployment template sets NODE_NAME from spec.nodeName (v1.25 panics without it) since chart
    # 0.11.0; the chart's appVersion must be the handler release whose env it renders (1.25.x here).
    assert _version(CHARTS["aws-node-termination-handler"].version) >= (0, 11, 0)
    assert _version(CHARTS["aws-node-termination-handler"].app_version)[:2] == (1, 25)
    # EKS's EFA chart runs the plugin with hostNetwork and /dev/infiniband mounted (the image v0.5.8 needs both).
    assert _version(CHARTS["aws-efa-k8s-device-plugin"].app_version) >= (0, 5, 8)


def test_every_pin_names_its_upstream_source() -> None:
    for key, pinned in CHARTS.items():
        assert pinned.version and pinned.app_version and "@" in pinned.source, key
