"""Teams: people's access by role, in the AWS layer: EKS access entries with namespace-scoped access policies, and an
IAM policy per team on exactly this stack's buckets, key, cluster and SageMaker resources.

- viewer: AmazonEKSViewPolicy in its namespaces (read everything but Secrets); AWS: list the buckets, describe the
  cluster, the stack's training and processing jobs and endpoint.
- ml-engineer: in llm-training our Role (Jobs create/delete, pods and logs read; infra/team_rbac.py), elsewhere
  AmazonEKSViewPolicy; AWS: datasets and checkpoints read/write/delete, models read, SageMaker training jobs tagged
  for this stack run as the stack's execution role, SageMaker Processing (data preparation) jobs tagged for this
  stack run as its prepare role, endpoint changes explicitly denied.
- admin: AmazonEKSAdminPolicy in its namespaces (everything in them, Secrets included; not the namespace itself, not
  cluster-scoped objects); AWS: ml-engineer's, plus updating the SageMaker endpoint.

Models are written only by the training role (a Job in llm-training runs as the trainer service account); no person's
policy grants s3:PutObject on the models bucket. AmazonEKSEditPolicy is not used: its Kubernetes `edit` rights include
reading Secrets and replacing any Deployment, which is what ml-engineer must not do (EKS user guide, "Review access
policy permissions": AmazonEKSEditPolicy, AmazonEKSViewPolicy, AmazonEKSAdminPolicy).

Cluster-wide admin stays with clusterAdminArns (break-glass, infra/cluster.py); a team never gets
AmazonEKSClusterAdminPolicy. The policy pack's `team-grants-within-access-level` rule checks the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from facts.cluster import TRAINING_NAMESPACE
from facts.tags import STACK_TAG
from infra.config import Team, TeamsConfig

EKS_POLICY = "arn:aws:eks::aws:cluster-access-policy/{}"
VIEW = EKS_POLICY.format("AmazonEKSViewPolicy")
ADMIN = EKS_POLICY.format("AmazonEKSAdminPolicy")
ACCESS_TAG = "llm-platform:access"
TEAM_TAG = "llm-platform:team"

READ = ["s3:GetObject", "s3:GetObjectVersion"]
WRITE = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
DELETE = ["s3:DeleteObject"]
LIST = ["s3:ListBucket", "s3:GetBucketLocation"]

S3_ACCESS: dict[str, dict[str, list[str]]] = {
    "viewer": {},
    "ml-engineer": {"datasets": READ + WRITE + DELETE, "checkpoints": READ + WRITE + DELETE, "models": READ},
    "admin": {"datasets": READ + WRITE + DELETE, "checkpoints": READ + WRITE + DELETE, "models": READ},
}
"""Object actions per bucket kind and access level (every level may list the three buckets)."""
ENDPOINT_CHANGES = [
    "sagemaker:CreateEndpoint",
    "sagemaker:UpdateEndpoint",
    "sagemaker:DeleteEndpoint",
    "sagemaker:UpdateEndpointWeightsAndCapacities",
    "sagemaker:CreateEndpointConfig",
    "sagemaker:DeleteEndpointConfig",
]


def kubernetes_group(team: Team) -> str:
    """The Kubernetes group a team's access entries carry: infra/team_rbac.py binds its Roles to it."""
    return f"llm-platform:team:{team.name}"


def eks_policies(team: Team) -> dict[str, tuple[str, ...]]:
    """EKS access policy ARN -> the namespaces it is associated with, for one team."""
    if team.access == "admin":
        return {ADMIN: team.namespaces}
    if team.access == "ml-engineer":
        # llm-training gets our narrower Role instead (infra/team_rbac.py).
        read_only = tuple(n for n in team.namespaces if n != TRAINING_NAMESPACE)
        return {VIEW: read_only} if read_only else {}
    return {VIEW: team.namespaces}


@dataclass(frozen=True)
class StackArns:
    """The ARNs of this stack a team's IAM policy is scoped to."""

    region: str
    account_id: str
    partition: str
    stack: str
    name_prefix: str
    bucket_arns: dict[str, Any]
    kms_key_arn: Any
    cluster_arn: Any
    sagemaker_role_arn: Any
    sagemaker_prepare_role_arn: Any
    """The role SageMaker Processing jobs of `ops.launch_training --job prepare` run as (infra/identity.py)."""


def iam_statements(access: str, s: StackArns) -> list[dict[str, Any]]:
    """The IAM statements for one access level (values may be Outputs: json_dumps resolves them)."""
    sm = f"arn:{s.partition}:sagemaker:{s.region}:{s.account_id}"
    statements: list[dict[str, Any]] = [
        {"Sid": "DescribeCluster", "Effect": "Allow", "Action": ["eks:DescribeCluster"], "Resource": s.cluster_arn},
        {
            "Sid": "ListBuckets",
            "Effect": "Allow",
            "Action": LIST,
            "Resource": [s.bucket_arns[k] for k in ("datasets", "checkpoints", "models")],
        },
        {
            # Describe calls take no request tags; the stack's resources are named/tagged, so read by name prefix.
            "Sid": "DescribeSageMaker",
            "Effect": "Allow",
            "Action": [
                "sagemaker:DescribeTrainingJob",
                "sagemaker:DescribeProcessingJob",
                "sagemaker:DescribeEndpoint",
            ],
            "Resource": [f"{sm}:training-job/*", f"{sm}:processing-job/*", f"{sm}:endpoint/{s.name_prefix}-*"],
            "Condition": {"StringEquals": {f"aws:ResourceTag/{STACK_TAG}": s.stack}},
        },
    ]
    for kind, actions in S3_ACCESS[access].items():
        arn = pulumi.Output.from_input(s.bucket_arns[kind])
        statements.append(
            {
                "Sid": f"Objects{kind.title()}",
                "Effect": "Allow",
                "Action": actions,
                "Resource": arn.apply(lambda a: f"{a}/*"),
            }
        )
    if S3_ACCESS[access]:
        writes = any(a in WRITE for actions in S3_ACCESS[access].values() for a in actions)
        statements.append(
            {
                "Sid": "UseProjectKeyViaS3",
                "Effect": "Allow",
                "Action": ["kms:Decrypt", *(["kms:GenerateDataKey"] if writes else [])],
                "Resource": s.kms_key_arn,
                "Condition": {"StringEquals": {"kms:ViaService": f"s3.{s.region}.amazonaws.com"}},
            }
        )
    if access in ("ml-engineer", "admin"):
        # ops.launch_training tags every job with the stack tags: the tag is what scopes a new job to us.
        # Training jobs run as the stack's execution role, which pulls only this stack's ECR repositories
        # (infra/identity.py): that is what "our roles and images" rests on (CreateTrainingJob has no condition key
        # for the image).
        statements += _sagemaker_job_statements(s, "TrainingJob", "PassExecutionRoleToSageMaker", s.sagemaker_role_arn)
        # Data preparation on SageMaker (`ops.launch_training --job prepare --platform sagemaker`,
        # ops/prepare_job.py) is a Processing job running as the stack's prepare role (S3: read datasets and models,
        # write datasets/prepared/; infra/identity.py), tagged with the stack tags like a training job. Action names,
        # the processing-job resource and its condition keys (aws:RequestTag/${TagKey} on CreateProcessingJob and
        # AddTags, aws:ResourceTag/${TagKey} on StopProcessingJob and DescribeProcessingJob): Service Authorization
        # Reference, "Actions, resources, and condition keys for Amazon SageMaker AI"
        # (https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonsagemaker.html).
        statements += _sagemaker_job_statements(
            s, "ProcessingJob", "PassPrepareRoleToSageMaker", s.sagemaker_prepare_role_arn
        )
    endpoints = [f"{sm}:endpoint/{s.name_prefix}-*", f"{sm}:endpoint-config/{s.name_prefix}-*"]
    if access == "admin":
        statements.append(
            {
                "Sid": "RollOutTheEndpoint",
                "Effect": "Allow",
                "Action": [
                    "sagemaker:UpdateEndpoint",
                    "sagemaker:UpdateEndpointWeightsAndCapacities",
                    "sagemaker:CreateEndpointConfig",
                    "sagemaker:DescribeEndpointConfig",
                ],
                "Resource": endpoints,
            }
        )
    else:
        # Explicit: no later grant (another policy on the same role) can let this team change serving.
        statements.append(
            {"Sid": "NoEndpointChanges", "Effect": "Deny", "Action": ENDPOINT_CHANGES, "Resource": endpoints}
        )
    return statements


SAGEMAKER_JOB_RESOURCES = {"TrainingJob": "training-job", "ProcessingJob": "processing-job"}
"""SageMaker job kind (as in its API actions) -> its IAM resource type (in its ARN)."""


def _sagemaker_job_statements(s: StackArns, job: str, pass_sid: str, role_arn: Any) -> list[dict[str, Any]]:
    """What a team needs to run one kind of SageMaker job (`job`: "TrainingJob" or "ProcessingJob") of this stack:
    create it (and tag it) only with this stack's tag in the request, stop it only when it carries that tag, pass
    `role_arn` (and only it) to SageMaker as the job's role, and read the job kind's CloudWatch logs."""
    arn = f"arn:{s.partition}:sagemaker:{s.region}:{s.account_id}:{SAGEMAKER_JOB_RESOURCES[job]}/*"
    return [
        {
            "Sid": f"Create{job}sOfThisStack",
            "Effect": "Allow",
            "Action": [f"sagemaker:Create{job}", "sagemaker:AddTags"],
            "Resource": arn,
            "Condition": {"StringEquals": {f"aws:RequestTag/{STACK_TAG}": s.stack}},
        },
        {
            "Sid": f"Stop{job}sOfThisStack",
            "Effect": "Allow",
            "Action": [f"sagemaker:Stop{job}"],
            "Resource": arn,
            "Condition": {"StringEquals": {f"aws:ResourceTag/{STACK_TAG}": s.stack}},
        },
        {
            "Sid": pass_sid,
            "Effect": "Allow",
            "Action": ["iam:PassRole"],
            "Resource": role_arn,
            "Condition": {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
        },
        {
            "Sid": f"Read{job}Logs",
            "Effect": "Allow",
            "Action": ["logs:GetLogEvents", "logs:FilterLogEvents", "logs:DescribeLogStreams"],
            "Resource": f"arn:{s.partition}:logs:{s.region}:{s.account_id}:log-group:/aws/sagemaker/{job}s:*",
        },
    ]


def role_name(arn: str) -> str:
    """The role name of a role ARN (the last path segment: `arn:aws:iam::1:role/path/name` -> `name`)."""
    return arn.rsplit("/", 1)[-1]


@dataclass(kw_only=True)
class TeamAccessArgs:
    teams: TeamsConfig
    arns: StackArns
    cluster_name: pulumi.Input[str]
    tags: dict[str, str]


class TeamAccess(pulumi.ComponentResource):
    """Access entries, namespace-scoped access policy associations and IAM policies for every configured team."""

    def __init__(self, name: str, args: TeamAccessArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:TeamAccess", name, None, opts)
        self._base, self._args = name, args
        self.policy_arns: dict[str, pulumi.Output[str]] = {}
        for team in args.teams.teams:
            self.policy_arns[team.name] = self._create_team(team)
        self.register_outputs({"policy_arns": self.policy_arns})

    def _create_team(self, team: Team) -> pulumi.Output[str]:
        a = self._args
        tags = {**a.tags, ACCESS_TAG: team.access, TEAM_TAG: team.name}
        child = pulumi.ResourceOptions(parent=self)
        policy = aws.iam.Policy(
            f"{self._base}-{team.name}",
            name=f"{a.arns.name_prefix}-team-{team.name}",
            description=f"llm-platform {a.arns.stack}: team {team.name} ({team.access})",
            policy=pulumi.Output.json_dumps(
                {"Version": "2012-10-17", "Statement": iam_statements(team.access, a.arns)}
            ),
            tags=tags,
            opts=child,
        )
        for i, arn in enumerate(team.role_arns):
            aws.iam.RolePolicyAttachment(
                f"{self._base}-{team.name}-{i}", role=role_name(arn), policy_arn=policy.arn, opts=child
            )
            entry = aws.eks.AccessEntry(
                f"{self._base}-{team.name}-{i}",
                cluster_name=a.cluster_name,
                principal_arn=arn,
                type="STANDARD",
                kubernetes_groups=[kubernetes_group(team)],
                tags=tags,
                opts=child,
            )
            for policy_arn, namespaces in eks_policies(team).items():
                aws.eks.AccessPolicyAssociation(
                    f"{self._base}-{team.name}-{i}-{policy_arn.rsplit('/', 1)[-1]}",
                    cluster_name=a.cluster_name,
                    principal_arn=entry.principal_arn,
                    policy_arn=policy_arn,
                    access_scope={"type": "namespace", "namespaces": list(namespaces)},
                    opts=child,
                )
        return policy.arn


def describe(teams: TeamsConfig) -> list[dict[str, Any]]:
    """Who can do what, one row per team (ops.preview prints it)."""
    rows = []
    for team in teams.teams:
        kube = [
            f"{p.rsplit('/', 1)[-1].removeprefix('AmazonEKS').removesuffix('Policy')} in {', '.join(ns)}"
            for p, ns in eks_policies(team).items()
        ]
        if team.access == "ml-engineer":
            kube.insert(0, f"Jobs create/delete, pods and logs read in {TRAINING_NAMESPACE}")
        s3 = [f"{kind} {'+'.join(_verbs(actions))}" for kind, actions in S3_ACCESS[team.access].items()]
        sagemaker = {
            "viewer": "describe",
            "ml-engineer": "training and data-preparation jobs (this stack's tag), no endpoint changes",
            "admin": "training and data-preparation jobs, endpoint updates",
        }[team.access]
        rows.append(
            {
                "team": team.name,
                "access": team.access,
                "roles": len(team.role_arns),
                "kubernetes": "; ".join(kube),
                "s3": ", ".join(s3) or "list only",
                "sagemaker": sagemaker,
            }
        )
    return rows


def _verbs(actions: list[str]) -> list[str]:
    verbs = []
    for verb, group in (("read", READ), ("write", WRITE), ("delete", DELETE)):
        if set(group) <= set(actions):
            verbs.append(verb)
    return verbs


__all__ = ["StackArns", "TeamAccess", "TeamAccessArgs", "describe", "eks_policies", "iam_statements"]
