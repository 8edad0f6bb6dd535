"""Team RBAC: the Kubernetes Roles that EKS's managed access policies cannot express (cluster layer).

An ml-engineer launches and deletes training Jobs and reads their pods and logs in llm-training, and nothing more
there: AmazonEKSEditPolicy would also let them read Secrets and replace Deployments. The access entry (infra/teams.py)
puts the engineer's role in the Kubernetes group `llm-platform:team:<name>`; this RoleBinding gives that group the
`llm-platform-job-launcher` Role in the training namespace (EKS user guide, "Associate access entries with Kubernetes
groups": an access entry's kubernetesGroups are bound with ordinary RBAC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from facts.cluster import TRAINING_NAMESPACE
from infra import k8s_objects
from infra.config import TeamsConfig
from infra.teams import kubernetes_group

JOB_LAUNCHER_ROLE = "llm-platform-job-launcher"
JOB_LAUNCHER_RULES: list[dict[str, Any]] = [
    # `python -m ops.launch_training` applies an Indexed Job and its headless Service with `kubectl apply`
    # (get, then create or patch; ops/training_k8s_job.py), and an engineer deletes them when done.
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "delete", "get", "list", "patch", "watch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "delete", "get", "list", "patch"]},
    {"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]
"""No Secrets, no pods/exec, no Deployments, no ServiceAccounts: what `python -m ops.launch_training` needs."""


@dataclass(kw_only=True)
class TeamRbacArgs:
    teams: TeamsConfig
    provider: pulumi.ProviderResource
    depends_on: list[pulumi.Resource]
    """The training namespace (KubernetesBase)."""


def job_launcher_objects(teams: TeamsConfig) -> list[dict[str, Any]]:
    """The Role and one RoleBinding per ml-engineer team, as manifests (empty without such a team)."""
    engineers = [t for t in teams.teams if t.access == "ml-engineer" and TRAINING_NAMESPACE in t.namespaces]
    if not engineers:
        return []
    labels = dict(k8s_objects.MANAGED_BY)
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": k8s_objects.metadata(JOB_LAUNCHER_ROLE, TRAINING_NAMESPACE, labels),
            "rules": JOB_LAUNCHER_RULES,
        }
    ]
    for team in engineers:
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": k8s_objects.metadata(f"team-{team.name}", TRAINING_NAMESPACE, labels),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": JOB_LAUNCHER_ROLE},
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": kubernetes_group(team)}
                ],
            }
        )
    return objects


class TeamRbac(pulumi.ComponentResource):
    """The job-launcher Role and the teams' RoleBindings in the training namespace."""

    def __init__(self, name: str, args: TeamRbacArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:TeamRbac", name, None, opts)
        child = pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=args.depends_on)
        for obj in job_launcher_objects(args.teams):
            k8s_objects.apply(f"{name}-{obj['kind'].lower()}-{obj['metadata']['name']}", obj, child)
        self.register_outputs({})
