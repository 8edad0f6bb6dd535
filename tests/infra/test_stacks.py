"""Whole-stack properties, per shipped environment: tags, names, outputs, schemas, workload contracts."""

from __future__ import annotations

import importlib
import inspect
import re
from functools import cache
from typing import Any

import kubernetes_validate
import pytest

from facts import pulumi_types as tok
from facts.tags import STACK_TAG_KEYS, stack_tags
from infra import outputs as out
from infra.charts import CHART_TYPE, CHARTS
from infra.config import load_stack
from tests.infra.conftest import PROD_SERVING
from tests.infra.scheduling import chart_pod_spec

OPTIONAL_OUTPUTS = (
    out.SERVING_SERVICE_NAME,
    out.SAGEMAKER_ENDPOINT_NAME,
    out.TRAINING_IMAGE,
    out.LAYER,  # each layer's own (infra/layers.py); an environment's run has both
    out.SPOT_INTERRUPTION_QUEUE_URL,
    out.AMP_QUERY_URL,
    out.PROMETHEUS_URL,
    # audit and backup: pinned per stack in tests/infra/test_audit_and_backup.py
    out.AUDIT_TRAIL_BUCKET,
    out.MODELS_REPLICA_BUCKET,
    out.CHECKPOINTS_REPLICA_BUCKET,
    out.BACKUP_REPLICA_REGION,
)
REQUIRED_OUTPUTS = [v for k, v in vars(out).items() if k.isupper() and v not in OPTIONAL_OUTPUTS]


@cache
def taggable(typ: str) -> bool:
    """Whether the pulumi_aws resource class for a type token accepts `tags` (introspected, not a list to maintain)."""
    _, module, _ = typ.split(":")
    mod_name, cls_name = module.split("/")
    mod = importlib.import_module(f"pulumi_aws.{mod_name}")
    cls = getattr(mod, cls_name[0].upper() + cls_name[1:])
    return "tags" in inspect.signature(cls._internal_init).parameters


def test_every_taggable_resource_carries_the_stack_tags(shipped) -> None:
    cfg, run = shipped
    expected = stack_tags(cfg.stack, cfg.environment)
    aws_resources = [r for r in run.resources if r.custom and r.type.startswith("aws:")]
    checked = 0
    for rec in aws_resources:
        if taggable(rec.type):
            checked += 1
            tags = rec.inputs.get("tags") or {}
            assert {k: tags.get(k) for k in STACK_TAG_KEYS} == expected, f"{rec.type} {rec.name} lacks stack tags"
    assert checked >= 30


def test_no_duplicate_resource_names(shipped) -> None:
    _, run = shipped
    assert run.duplicate_names() == []


def test_outputs_are_complete_and_kubeconfig_is_secret(shipped) -> None:
    cfg, run = shipped
    missing = [k for k in REQUIRED_OUTPUTS if k not in run.outputs]
    assert missing == []
    assert out.KUBECONFIG in run.secret_outputs
    assert (out.SERVING_SERVICE_NAME in run.outputs) is cfg.serving.eks_declared
    assert (out.SAGEMAKER_ENDPOINT_NAME in run.outputs) is cfg.serving.sagemaker_declared
    assert (out.TRAINING_IMAGE in run.outputs) is bool(cfg.images.training_digest)
    assert run.outputs[out.GPU_POOLS] == {p.name: p.describe() for p in cfg.cluster.gpu_pools}


def test_each_serving_path_is_enabled_by_some_shipped_stack(run_stack) -> None:
    runs = [run_stack("dev"), run_stack("staging"), run_stack("prod", PROD_SERVING)]
    assert any(r.of_type(tok.K8S_DEPLOYMENT) and out.SERVING_SERVICE_NAME in r.outputs for r in runs)
    assert any(r.of_type(tok.SAGEMAKER_ENDPOINT) for r in runs)


def _builtin(api_version: str) -> bool:
    """Kubernetes' own API groups (core, apps, batch, policy, autoscaling, *.k8s.io); others are custom resources,
    validated against their CRD schemas in their component's tests."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


_SECRET_SIG = "4dabf18193072939515e22adb298388d"
"""Pulumi's wire marker of a secret value ({sig: "1b47...", "value": v}); the API server sees just v."""


def _unsecret(value: Any) -> Any:
    if isinstance(value, dict):
        if _SECRET_SIG in value:
            return _unsecret(value["value"])
        return {k: _unsecret(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unsecret(v) for v in value]
    return value


def test_every_kubernetes_object_validates_strictly(shipped) -> None:
    cfg, run = shipped
    objects = [
        r
        for r in run.resources
        if r.custom and r.type.startswith("kubernetes:") and _builtin(r.inputs.get("apiVersion", "x.y/v1"))
    ]
    assert len(objects) >= 5
    for rec in objects:
        try:
            kubernetes_validate.validate(_unsecret(rec.inputs), cfg.cluster.kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{rec.type} {rec.name}: {exc}")


def _pod_specs(run):
    """(kind, name, namespace, pod spec) of every workload the stack defines: our own objects, and the placement of
    the pods each pinned chart renders (from the values we give it)."""
    by_chart = {pinned.chart: key for key, pinned in CHARTS.items()}
    for rec in run.resources:
        kind = rec.inputs.get("kind")
        if kind in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield kind, rec.name, rec.inputs["metadata"].get("namespace"), rec.inputs["spec"]["template"]["spec"]
        elif rec.type == CHART_TYPE:
            key = by_chart[rec.inputs["chart"]]
            yield "Chart", rec.name, rec.inputs["namespace"], chart_pod_spec(key, rec.inputs["values"])


def _node_groups(run):
    return [r.inputs for r in run.of_type(tok.EKS_NODE_GROUP)]


def _tolerates(tolerations: list[dict], taint: dict) -> bool:
    effect = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute", "PREFER_NO_SCHEDULE": "PreferNoSchedule"}[
        taint["effect"]
    ]
    for t in tolerations:
        if t.get("effect") not in (None, "", effect):
            continue
        if t.get("operator") == "Exists" and t.get("key") in (None, taint["key"]):
            return True
        if t.get("key") == taint["key"] and t.get("value") == taint["value"]:
            return True
    return False


def _lands_on(spec: dict, group: dict) -> bool:
    labels = group.get("labels") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    return all(_tolerates(spec.get("tolerations") or [], t) for t in group.get("taints") or [])


def test_every_workload_lands_on_a_node_group_of_its_stack(shipped) -> None:
    """Catches the classic drift: a selector or toleration that no node group satisfies leaves pods Pending."""
    _, run = shipped
    groups = _node_groups(run)
    workloads = list(_pod_specs(run))
    assert workloads
    for kind, name, _, spec in workloads:
        targets = [g["nodeGroupName"] for g in groups if _lands_on(spec, g)]
        assert targets, f"{kind} {name} matches no node group (selector {spec.get('nodeSelector')})"
        requests_gpu = any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}) for c in spec["containers"])
        if requests_gpu:
            assert any(g.get("taints") for g in groups if g["nodeGroupName"] in targets), f"{name} GPU pod, no GPU pool"


def test_workload_service_accounts_are_bound_to_roles(shipped) -> None:
    """Pods in the platform namespaces that use a service account get AWS access only through Pod Identity."""
    _, run = shipped
    bound = {(a.inputs["namespace"], a.inputs["serviceAccount"]) for a in run.of_type(tok.EKS_POD_IDENTITY_ASSOCIATION)}
    service_accounts = {
        (r.inputs["metadata"]["namespace"], r.inputs["metadata"]["name"]) for r in run.of_type(tok.K8S_SERVICE_ACCOUNT)
    }
    platform_namespaces = {run.outputs[out.TRAINING_NAMESPACE], run.outputs[out.SERVING_NAMESPACE]}
    for kind, name, namespace, spec in _pod_specs(run):
        sa = spec.get("serviceAccountName")
        if namespace in platform_namespaces:
            assert sa, f"{kind} {name} runs with the default service account"
            assert (namespace, sa) in service_accounts, f"{kind} {name}: service account {sa} is not created"
            assert (namespace, sa) in bound, f"{kind} {name}: service account {sa} has no Pod Identity role"
    assert (run.outputs[out.TRAINING_NAMESPACE], run.outputs[out.TRAINING_SERVICE_ACCOUNT]) in bound
    assert (run.outputs[out.SERVING_NAMESPACE], run.outputs[out.SERVING_SERVICE_ACCOUNT]) in bound


def test_destroy_order_workloads_before_nodes_before_network(shipped) -> None:
    cfg, run = shipped
    cluster = run.one("llm-platform:infra:Cluster", "cluster")
    assert "llm-platform:infra:Network::network" in cluster.depends_on
    # Workloads before nodes: every Kubernetes object is the cluster layer's, destroyed before the AWS layer
    # (ops/teardown.py), and no node group is in the cluster layer.
    for rec in run.resources:
        if rec.type.startswith("kubernetes:"):
            assert rec.stack == f"{cfg.stack}-cluster", rec.name
    assert all(g.stack == cfg.stack for g in run.of_type(tok.EKS_NODE_GROUP))


def test_prod_references_its_images_by_digest(run_stack) -> None:
    # Tags can be re-pointed (or an immutable repository replaced); a digest is the image. Prod's Deployment, its
    # SageMaker model and the training image it exports all name `<repository>@sha256:<64 hex>`.
    run = run_stack("prod", PROD_SERVING)  # after its first deploy (the shipped file names no image yet)
    cfg = load_stack("prod", **PROD_SERVING)
    serving_repo, training_repo = run.outputs[out.SERVING_REPOSITORY_URL], run.outputs[out.TRAINING_REPOSITORY_URL]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", cfg.images.serving_digest)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", cfg.images.training_digest)
    expected = f"{serving_repo}@{cfg.images.serving_digest}"
    images = [
        c["image"]
        for d in run.of_type(tok.K8S_DEPLOYMENT)
        for c in d.inputs["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith(serving_repo)
    ]
    assert images and set(images) == {expected}
    assert run.one(tok.SAGEMAKER_MODEL).inputs["primaryContainer"]["image"] == expected
    assert run.outputs[out.TRAINING_IMAGE] == f"{training_repo}@{cfg.images.training_digest}"
    # A stack without digests keeps tags (and exports no training image).
    assert out.TRAINING_IMAGE not in run_stack("dev").outputs
