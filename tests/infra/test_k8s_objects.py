"""infra.k8s_objects: the one way the program writes its own Kubernetes objects. An object written as a wire-form dict
is registered as the typed resource of its kind, and the engine receives exactly that dict."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import pytest

from facts import pulumi_types as tok
from infra import k8s_objects
from ops.mocks import run_program
from tests.helpers import REPO_ROOT

OBJECTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ns": (
        tok.K8S_NAMESPACE,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": k8s_objects.metadata("x", labels={"a": "b"})},
    ),
    "sa": (
        tok.K8S_SERVICE_ACCOUNT,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": k8s_objects.metadata("sa", "x"),
            "automountServiceAccountToken": False,
        },
    ),
    "binding": (
        "kubernetes:rbac.authorization.k8s.io/v1:ClusterRoleBinding",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "b"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "r"},
            "subjects": [{"kind": "User", "name": "u", "apiGroup": "rbac.authorization.k8s.io"}],
        },
    ),
    "pdb": (
        tok.K8S_POD_DISRUPTION_BUDGET,
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": k8s_objects.metadata("p", "x", annotations={"k": "v"}),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "a"}}},
        },
    ),
}


def test_apply_registers_the_typed_resource_with_the_object_as_written() -> None:
    names: dict[str, Any] = {}

    def program() -> dict[str, Any]:
        provider = k8s.Provider("k8s", kubeconfig="{}")
        opts = pulumi.ResourceOptions(provider=provider)
        for key, (_, obj) in OBJECTS.items():
            names[key] = k8s_objects.apply(key, obj, opts).metadata.name
        return dict(names)

    run = run_program(program, {}, "dev", "llm-platform", "us-east-1")
    for key, (type_, obj) in OBJECTS.items():
        rec = run.one(type_, key)
        assert rec.inputs == obj and rec.provider and "k8s" in rec.provider
        assert run.outputs[key] == obj["metadata"]["name"]


def test_a_kind_or_field_it_does_not_know_is_an_error_not_a_guess() -> None:
    opts = pulumi.ResourceOptions()
    with pytest.raises(ValueError, match="Pod"):
        k8s_objects.apply("p", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}, opts)
    with pytest.raises(ValueError, match="binaryData"):
        k8s_objects.apply(
            "c", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "binaryData": {}}, opts
        )


WRITTEN_ANOTHER_WAY: dict[str, set[str]] = {}
"""Typed pulumi-kubernetes objects still written outside infra/k8s_objects.py."""


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def test_the_program_writes_its_kubernetes_objects_one_way() -> None:
    """Only infra/k8s_objects.py constructs typed Kubernetes objects; charts (`k8s.helm`) and the provider are not
    objects we write."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO_ROOT / "infra").rglob("*.py")):
        rel = str(path.relative_to(REPO_ROOT))
        if rel == "infra/k8s_objects.py":
            continue
        for node in ast.walk(ast.parse(Path(path).read_text(), rel)):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name.startswith("k8s.") and not name.startswith(("k8s.helm.", "k8s.Provider")):
                    found.setdefault(rel, set()).add(name)
    another_way = {rel: calls - WRITTEN_ANOTHER_WAY.get(rel, set()) for rel, calls in found.items()}
    assert not {rel: calls for rel, calls in another_way.items() if calls}, "use infra.k8s_objects.apply"
