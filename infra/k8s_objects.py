"""The one way this program writes its own Kubernetes objects (charts aside: infra/charts.py).

An object is a plain dict in wire form: `apiVersion`, `kind`, `metadata`, `spec`, ... spelled as in a manifest and the
API reference, which is also what the tests validate strictly against the Kubernetes schema of the configured version.
`apply` registers it as the typed pulumi-kubernetes resource of its kind (the Pulumi type token, so the URN, is that
resource's); `metadata`, `spec` and the other top-level fields go through unchanged, only their Python keyword names
differ (`roleRef` is `role_ref`), and `_KEYWORDS` spells those out. Values may be Pulumi outputs anywhere.

The helpers the components share live here too: the common labels and `metadata`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

MANAGED_BY = {"app.kubernetes.io/managed-by": "pulumi", "app.kubernetes.io/part-of": "llm-platform"}
"""Labels on the platform's own objects that have no labels of their own to carry."""

_RESOURCES: dict[tuple[str, str], type[pulumi.CustomResource]] = {
    ("v1", "Namespace"): k8s.core.v1.Namespace,
    ("v1", "ServiceAccount"): k8s.core.v1.ServiceAccount,
    ("v1", "ConfigMap"): k8s.core.v1.ConfigMap,
    ("v1", "Secret"): k8s.core.v1.Secret,
    ("v1", "Service"): k8s.core.v1.Service,
    ("v1", "ResourceQuota"): k8s.core.v1.ResourceQuota,
    ("apps/v1", "Deployment"): k8s.apps.v1.Deployment,
    ("policy/v1", "PodDisruptionBudget"): k8s.policy.v1.PodDisruptionBudget,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): k8s.autoscaling.v2.HorizontalPodAutoscaler,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s.networking.v1.NetworkPolicy,
    ("networking.k8s.io/v1", "Ingress"): k8s.networking.v1.Ingress,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): k8s.rbac.v1.ClusterRole,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): k8s.rbac.v1.ClusterRoleBinding,
    ("rbac.authorization.k8s.io/v1", "Role"): k8s.rbac.v1.Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s.rbac.v1.RoleBinding,
}
"""The kinds this program writes, by (apiVersion, kind): the typed resource each is registered as."""

_CUSTOM: set[tuple[str, str]] = {("keda.sh/v1alpha1", "ScaledObject")}
"""Custom resources this program writes (their CRDs come with a chart): registered as `apiextensions.CustomResource`,
which takes apiVersion and kind as arguments and gets the type token `kubernetes:<group>/<version>:<kind>`."""

_KEYWORDS = {
    "metadata": "metadata",
    "spec": "spec",
    "data": "data",
    "rules": "rules",
    "roleRef": "role_ref",
    "subjects": "subjects",
    "automountServiceAccountToken": "automount_service_account_token",
    "type": "type",
    "stringData": "string_data",
}
"""Top-level fields of those kinds (wire name -> keyword argument of the typed resource)."""


def apply(resource_name: str, obj: Mapping[str, Any], opts: pulumi.ResourceOptions) -> Any:
    """Register `obj` as the typed pulumi-kubernetes resource of its apiVersion and kind, and return that resource
    (its `.metadata` and other outputs are there as usual). `resource_name` is the Pulumi logical name: renaming it
    replaces the live object."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    fields = {key: value for key, value in obj.items() if key not in ("apiVersion", "kind")}
    if (api_version, kind) in _CUSTOM:
        return k8s.apiextensions.CustomResource(resource_name, api_version=api_version, kind=kind, **fields, opts=opts)
    resource = _RESOURCES.get((api_version, kind))
    if resource is None:
        raise ValueError(f"{resource_name}: {api_version} {kind} is not a kind infra.k8s_objects knows (add it)")
    unknown = sorted(set(fields) - set(_KEYWORDS))
    if unknown:
        raise ValueError(f"{resource_name}: no keyword known for the top-level fields {unknown} of {kind} (add them)")
    return resource(resource_name, **{_KEYWORDS[key]: value for key, value in fields.items()}, opts=opts)


def metadata(
    name: str,
    namespace: pulumi.Input[str] | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, pulumi.Input[str]] | None = None,
) -> dict[str, Any]:
    """An object's `metadata`, with only the fields given."""
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels is not None:
        meta["labels"] = dict(labels)
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    return meta
