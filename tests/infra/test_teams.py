"""Teams as config: the access entries and their scopes per team and level, the job-launcher Role (strict schema),
the IAM documents checked against an allow/deny table with moto's IAM policy evaluation, the config's checks and the
policy rule that caps a team at its access level."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from moto.iam.access_control import IAMPolicy, PermissionResult

from facts import pulumi_types as tok
from facts.cluster import SERVING_NAMESPACE, TRAINING_NAMESPACE
from infra.config import ConfigError, load_stack
from infra.team_rbac import JOB_LAUNCHER_ROLE, job_launcher_objects
from infra.teams import kubernetes_group
from ops.mocks import Run
from policy.rules import RULES_BY_NAME, Res, StackContext

ACCOUNT = "123456789012"
EKS = "arn:aws:eks::aws:cluster-access-policy/"
ROLE_X, ROLE_Y = f"arn:aws:iam::{ACCOUNT}:role/x", f"arn:aws:iam::{ACCOUNT}:role/y"
ADMINS = f"arn:aws:iam::{ACCOUNT}:role/platform-admins"
"""Break-glass admin of the shipped dev stack (clusterAdminArns)."""


def team(name: str, access: str, namespaces: list[str], *arns: str) -> str:
    roles = list(arns) or [f"arn:aws:iam::{ACCOUNT}:role/{name}"]
    return json.dumps({"name": name, "access": access, "namespaces": namespaces, "iamRoleArns": roles})


@pytest.fixture(scope="module")
def prod_run() -> Run:
    from ops.preview import preview

    return preview("prod")[1]


def _entries(run: Run) -> dict[str, dict]:
    return {r.inputs["principalArn"]: r.inputs for r in run.of_type(tok.EKS_ACCESS_ENTRY) if "teams" in r.name}


def _associations(run: Run, principal: str) -> dict[str, dict]:
    return {
        r.inputs["policyArn"].removeprefix(EKS): r.inputs["accessScope"]
        for r in run.of_type(tok.EKS_ACCESS_POLICY_ASSOCIATION)
        if r.inputs["principalArn"] == principal
    }


# -- EKS access --------------------------------------------------------------------------------------------------


def test_each_team_gets_namespace_scoped_access_for_its_level(prod_run: Run) -> None:
    cfg = load_stack("prod")
    entries = _entries(prod_run)
    assert set(entries) == {arn for t in cfg.teams.teams for arn in t.role_arns}
    for t in cfg.teams.teams:
        (arn,) = t.role_arns
        assert entries[arn]["type"] == "STANDARD"
        assert entries[arn]["kubernetesGroups"] == [kubernetes_group(t)]
        assert entries[arn]["tags"]["llm-platform:access"] == t.access
        scopes = _associations(prod_run, arn)
        for scope in scopes.values():
            assert scope["type"] == "namespace"  # never cluster-wide
        expected = {
            # ml-engineer: View in serving only; the training namespace is our narrower Role, not a managed policy.
            "ml-research": {"AmazonEKSViewPolicy": [SERVING_NAMESPACE]},
            "serving-oncall": {"AmazonEKSAdminPolicy": [SERVING_NAMESPACE]},
            "auditors": {"AmazonEKSViewPolicy": [TRAINING_NAMESPACE, SERVING_NAMESPACE, "monitoring"]},
        }[t.name]
        assert {p: s["namespaces"] for p, s in scopes.items()} == expected
    assert not any(
        "ClusterAdmin" in r.inputs["policyArn"]
        for r in prod_run.of_type(tok.EKS_ACCESS_POLICY_ASSOCIATION)
        if "teams" in r.name
    )


def test_ml_engineers_launch_jobs_and_read_logs_in_training_only(prod_run: Run) -> None:
    cfg = load_stack("prod")
    objects = job_launcher_objects(cfg.teams)
    role, binding = objects
    for obj in objects:
        kubernetes_validate.validate(obj, cfg.cluster.kubernetes_version, strict=True)
        assert obj["metadata"]["namespace"] == TRAINING_NAMESPACE
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert {("batch", "jobs", "create"), ("batch", "jobs", "delete"), ("", "pods/log", "get")} <= granted
    for forbidden in ("secrets", "pods/exec", "deployments", "serviceaccounts", "roles", "rolebindings"):
        assert not any(r == forbidden for _, r, _ in granted), forbidden
    assert binding["roleRef"]["name"] == JOB_LAUNCHER_ROLE
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "llm-platform:team:ml-research"}
    ]
    recorded = [r for r in prod_run.resources if r.parent == "team-rbac"]
    assert sorted(r.inputs["metadata"]["name"] for r in recorded) == [JOB_LAUNCHER_ROLE, "team-ml-research"]


# -- IAM: an allow/deny table, evaluated by moto's IAM policy engine ----------------------------------------------


def _document(run: Run, team_name: str) -> str:
    return run.one(tok.IAM_POLICY, f"teams-{team_name}").inputs["policy"]


def _allowed(document: str, action: str, resource: str, context: dict[str, str] | None = None) -> PermissionResult:
    return IAMPolicy(document).is_action_permitted(action, resource, incoming_condition_values=context)


ALLOW, NO, DENY = PermissionResult.PERMITTED, "not allowed", PermissionResult.DENIED
"""NO: not permitted (neutral: implicitly denied, or denied by a condition). DENY: an explicit Deny statement."""


def _table(cfg) -> list[tuple[str, str, dict, dict[str, object]]]:
    o = lambda kind: f"arn:aws:s3:::{cfg.name_prefix}-{kind}-{ACCOUNT}-{cfg.region}"  # noqa: E731
    sm = f"arn:aws:sagemaker:{cfg.region}:{ACCOUNT}"
    ours = {"aws:RequestTag/llm-platform:stack": cfg.stack}
    theirs = {"aws:RequestTag/llm-platform:stack": "other"}
    mine = {"aws:ResourceTag/llm-platform:stack": cfg.stack}
    not_mine = {"aws:ResourceTag/llm-platform:stack": "other"}
    via_s3 = {"kms:ViaService": f"s3.{cfg.region}.amazonaws.com"}
    to_sm = {"iam:PassedToService": "sagemaker.amazonaws.com"}
    v, m, a = "auditors", "ml-research", "serving-oncall"
    return [
        # action, resource, context, expected per team (viewer, ml-engineer, admin)
        ("s3:ListBucket", o("models"), {}, {v: ALLOW, m: ALLOW, a: ALLOW}),
        ("s3:GetObject", o("datasets") + "/d/part-0", {}, {v: NO, m: ALLOW, a: ALLOW}),
        ("s3:PutObject", o("datasets") + "/d/part-0", {}, {v: NO, m: ALLOW, a: ALLOW}),
        ("s3:PutObject", o("checkpoints") + "/run/step-10", {}, {v: NO, m: ALLOW, a: ALLOW}),
        ("s3:DeleteObject", o("checkpoints") + "/run/step-10", {}, {v: NO, m: ALLOW, a: ALLOW}),
        ("s3:GetObject", o("models") + "/llama/config.json", {}, {v: NO, m: ALLOW, a: ALLOW}),
        ("s3:PutObject", o("models") + "/llama/config.json", {}, {v: NO, m: NO, a: NO}),  # training role only
        ("s3:DeleteObject", o("models") + "/llama/config.json", {}, {v: NO, m: NO, a: NO}),
        ("s3:GetObject", "arn:aws:s3:::someone-elses-bucket/x", {}, {v: NO, m: NO, a: NO}),
        ("sagemaker:CreateTrainingJob", f"{sm}:training-job/run-1", ours, {v: NO, m: ALLOW, a: ALLOW}),
        ("sagemaker:CreateTrainingJob", f"{sm}:training-job/run-1", theirs, {v: NO, m: NO, a: NO}),
        ("sagemaker:UpdateEndpoint", f"{sm}:endpoint/{cfg.name_prefix}-serving", {}, {v: DENY, m: DENY, a: ALLOW}),
        ("sagemaker:DeleteEndpoint", f"{sm}:endpoint/{cfg.name_prefix}-serving", {}, {v: DENY, m: DENY, a: NO}),
        ("sagemaker:UpdateEndpoint", f"{sm}:endpoint/other-serving", {}, {v: NO, m: NO, a: NO}),
        (
            "iam:PassRole",
            f"arn:aws:iam::{ACCOUNT}:role/{cfg.name_prefix}-sagemaker",
            to_sm,
            {v: NO, m: ALLOW, a: ALLOW},
        ),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{cfg.name_prefix}-training", to_sm, {v: NO, m: NO, a: NO}),
        # Data preparation on SageMaker (ops/prepare_job.py): a Processing job of this stack's tag, run as the
        # prepare role, passed to SageMaker only; its logs readable; another stack's job neither created nor stopped.
        ("sagemaker:CreateProcessingJob", f"{sm}:processing-job/c4-prep", ours, {v: NO, m: ALLOW, a: ALLOW}),
        ("sagemaker:CreateProcessingJob", f"{sm}:processing-job/c4-prep", theirs, {v: NO, m: NO, a: NO}),
        ("sagemaker:AddTags", f"{sm}:processing-job/c4-prep", ours, {v: NO, m: ALLOW, a: ALLOW}),
        ("sagemaker:AddTags", f"{sm}:processing-job/c4-prep", theirs, {v: NO, m: NO, a: NO}),
        ("sagemaker:StopProcessingJob", f"{sm}:processing-job/c4-prep", mine, {v: NO, m: ALLOW, a: ALLOW}),
        ("sagemaker:StopProcessingJob", f"{sm}:processing-job/c4-prep", not_mine, {v: NO, m: NO, a: NO}),
        ("sagemaker:DescribeProcessingJob", f"{sm}:processing-job/c4-prep", mine, {v: ALLOW, m: ALLOW, a: ALLOW}),
        ("sagemaker:DescribeProcessingJob", f"{sm}:processing-job/c4-prep", not_mine, {v: NO, m: NO, a: NO}),
        ("sagemaker:DeleteProcessingJob", f"{sm}:processing-job/c4-prep", mine, {v: NO, m: NO, a: NO}),
        (
            "iam:PassRole",
            f"arn:aws:iam::{ACCOUNT}:role/{cfg.name_prefix}-sagemaker-prepare",
            to_sm,
            {v: NO, m: ALLOW, a: ALLOW},
        ),
        (
            "iam:PassRole",
            f"arn:aws:iam::{ACCOUNT}:role/{cfg.name_prefix}-sagemaker-prepare",
            {"iam:PassedToService": "ec2.amazonaws.com"},
            {v: NO, m: NO, a: NO},
        ),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{cfg.name_prefix}-data-prepare", to_sm, {v: NO, m: NO, a: NO}),
        (
            "logs:GetLogEvents",
            f"arn:aws:logs:{cfg.region}:{ACCOUNT}:log-group:/aws/sagemaker/ProcessingJobs:log-stream:c4-prep/algo-1",
            {},
            {v: NO, m: ALLOW, a: ALLOW},
        ),
        (
            "logs:GetLogEvents",
            f"arn:aws:logs:{cfg.region}:{ACCOUNT}:log-group:/aws/lambda/other:log-stream:x",
            {},
            {v: NO, m: NO, a: NO},
        ),
        ("kms:Decrypt", "KEY", via_s3, {v: NO, m: ALLOW, a: ALLOW}),
        ("kms:Decrypt", "arn:aws:kms:us-east-1:123456789012:key/another", via_s3, {v: NO, m: NO, a: NO}),
        (
            "eks:DescribeCluster",
            f"arn:aws:eks:{cfg.region}:{ACCOUNT}:cluster/{cfg.name_prefix}",
            {},
            {v: ALLOW, m: ALLOW, a: ALLOW},
        ),
        (
            "eks:DeleteCluster",
            f"arn:aws:eks:{cfg.region}:{ACCOUNT}:cluster/{cfg.name_prefix}",
            {},
            {v: NO, m: NO, a: NO},
        ),
    ]


def test_iam_documents_match_the_allow_deny_table(prod_run: Run) -> None:
    cfg = load_stack("prod")
    key = prod_run.outputs["kms_key_arn"]
    documents = {t.name: _document(prod_run, t.name) for t in cfg.teams.teams}
    wrong = []
    for action, resource, context, expected in _table(cfg):
        resource = key if resource == "KEY" else resource
        for team_name, want in expected.items():
            got = _allowed(documents[team_name], action, resource, context)
            ok = got == want if want is not NO else got != ALLOW
            if not ok:
                wrong.append(
                    f"{team_name}: {action} on {resource} -> {got.name}, expected {getattr(want, 'name', want)}"
                )
    assert not wrong, "\n".join(wrong)


def test_team_policies_are_attached_to_the_team_roles(prod_run: Run) -> None:
    attachments = {
        r.inputs["role"]: r.inputs["policyArn"]
        for r in prod_run.of_type(tok.IAM_ROLE_POLICY_ATTACHMENT)
        if r.parent == "teams"
    }
    assert attachments == {
        name: f"arn:aws:iam::{ACCOUNT}:policy/llmp-prod-team-{name}"
        for name in ("ml-research", "serving-oncall", "auditors")
    }


# -- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teams", "complaint"),
    [
        (["not json"], "must be a JSON object"),
        ([team("ml", "root", [TRAINING_NAMESPACE])], "access must be one of"),
        ([team("ml", "ml-engineer", [SERVING_NAMESPACE])], f"launches jobs in {TRAINING_NAMESPACE}"),
        ([team("ml", "viewer", ["kube-system"])], "namespaces must list"),
        ([team("ml", "viewer", [TRAINING_NAMESPACE], f"arn:aws:iam::{ACCOUNT}:user/bob")], "not IAM users"),
        (
            [team("a", "viewer", [TRAINING_NAMESPACE], ROLE_X), team("b", "admin", [TRAINING_NAMESPACE], ROLE_X)],
            "already in another team",
        ),
        ([team("a", "viewer", [TRAINING_NAMESPACE], ADMINS)], "clusterAdminArns"),
        (
            [team("a", "viewer", [TRAINING_NAMESPACE]), team("a", "admin", [SERVING_NAMESPACE], ROLE_Y)],
            "a second team named",
        ),
    ],
)
def test_bad_teams_are_refused_with_the_key_named(teams: list[str], complaint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_stack("dev", teams=teams)
    assert "llm-platform:teams" in str(err.value) and complaint in str(err.value)


def test_no_teams_no_resources(run_stack) -> None:
    run = run_stack("dev", {"llm-platform:teams": []})
    assert not [r for r in run.resources if r.parent in ("teams", "team-rbac")]


# -- the policy rule ---------------------------------------------------------------------------------------------


def _violations(resources: list[Res]) -> list[str]:
    rule = RULES_BY_NAME["team-grants-within-access-level"]
    return [f.message for f in rule.check(resources, StackContext(stack="prod", production=True))]


def _policy(level: str, statements: list[dict]) -> Res:
    doc = json.dumps({"Version": "2012-10-17", "Statement": statements})
    return Res(tok.IAM_POLICY, f"teams-{level}", {"policy": doc, "tags": {"llm-platform:access": level}})


def test_rule_passes_the_shipped_teams(prod_run: Run) -> None:
    resources = [Res(r.type, r.name, r.inputs, r.protect) for r in prod_run.resources]
    assert _violations(resources) == []


def test_rule_fails_grants_beyond_the_level() -> None:
    models = "arn:aws:s3:::llmp-prod-models-123456789012-us-east-1/*"
    datasets = "arn:aws:s3:::llmp-prod-datasets-123456789012-us-east-1/*"
    read = {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": datasets}
    assert _violations([_policy("ml-engineer", [read])]) == []
    [msg] = _violations([_policy("viewer", [read])])
    assert "s3:GetObject" in msg and "viewer" in msg
    [msg] = _violations([_policy("admin", [{"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": models}])])
    assert "only training" in msg
    [msg] = _violations([_policy("ml-engineer", [{"Effect": "Allow", "Action": "s3:*", "Resource": datasets}])])
    assert "s3:*" in msg
    [msg] = _violations(
        [_policy("ml-engineer", [{"Effect": "Allow", "Action": ["sagemaker:UpdateEndpoint"], "Resource": "*"}])]
    )
    assert "UpdateEndpoint" in msg
    [msg] = _violations(
        [_policy("admin", [{"Effect": "Allow", "Action": ["iam:PassRole"], "Resource": "arn:aws:iam::1:role/r"}])]
    )
    assert "any service" in msg
    [msg] = _violations(
        [_policy("viewer", [{"Effect": "Allow", "Action": ["sagemaker:CreateProcessingJob"], "Resource": "*"}])]
    )
    assert "CreateProcessingJob" in msg and "viewer" in msg
    processing = ["sagemaker:CreateProcessingJob", "sagemaker:StopProcessingJob", "sagemaker:DescribeProcessingJob"]
    assert _violations([_policy("ml-engineer", [{"Effect": "Allow", "Action": processing, "Resource": "*"}])]) == []
    # A Deny never exceeds anything.
    assert _violations([_policy("viewer", [{"Effect": "Deny", "Action": "s3:*", "Resource": "*"}])]) == []


def test_rule_fails_eks_access_beyond_the_level() -> None:
    arn = f"arn:aws:iam::{ACCOUNT}:role/ml"
    entry = Res(
        tok.EKS_ACCESS_ENTRY, "teams-ml-0", {"principalArn": arn, "tags": {"llm-platform:access": "ml-engineer"}}
    )

    def assoc(policy: str, scope: dict) -> Res:
        return Res(
            tok.EKS_ACCESS_POLICY_ASSOCIATION,
            "a",
            {"principalArn": arn, "policyArn": EKS + policy, "accessScope": scope},
        )

    ns = {"type": "namespace", "namespaces": [SERVING_NAMESPACE]}
    assert _violations([entry, assoc("AmazonEKSViewPolicy", ns)]) == []
    [msg] = _violations([entry, assoc("AmazonEKSEditPolicy", ns)])
    assert "may not get AmazonEKSEditPolicy" in msg
    [msg] = _violations([entry, assoc("AmazonEKSViewPolicy", {"type": "cluster"})])
    assert "namespace-scoped" in msg
    # Break-glass admins (clusterAdminArns' entries carry no access tag) are not a team's business.
    admin = Res(tok.EKS_ACCESS_ENTRY, "cluster-admin-0", {"principalArn": "arn:aws:iam::1:role/admins"})
    cluster_admin = Res(
        tok.EKS_ACCESS_POLICY_ASSOCIATION,
        "b",
        {
            "principalArn": "arn:aws:iam::1:role/admins",
            "policyArn": EKS + "AmazonEKSClusterAdminPolicy",
            "accessScope": {"type": "cluster"},
        },
    )
    assert _violations([admin, cluster_admin]) == []
