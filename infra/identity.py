"""Identity: least-privilege IAM roles for the cluster, its nodes, and the workloads that touch data.

Workload roles are assumed through EKS Pod Identity (`pods.eks.amazonaws.com`), bound to Kubernetes service
accounts in `infra/kubernetes_base.py`. Each role may touch exactly the buckets its job needs, through the
project KMS key, and only via S3. No `*FullAccess` managed policy, no wildcard action, no wildcard S3/KMS resource.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from facts.cluster import PREPARED_PREFIX

READ = ["s3:GetObject", "s3:GetObjectVersion"]
WRITE = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
DELETE = ["s3:DeleteObject"]
LIST = ["s3:ListBucket", "s3:GetBucketLocation"]


@dataclass
class IdentityArgs:
    name_prefix: str
    """Prefix of the role names (StackConfig.name_prefix)."""
    region: str
    account_id: str
    partition: str
    bucket_arns: dict[str, pulumi.Input[str]]
    """datasets, checkpoints, models."""
    repository_arns: dict[str, pulumi.Input[str]]
    """ECR repositories by image (training, serving): SageMaker pulls from them."""
    kms_key_arn: pulumi.Input[str]
    tags: dict[str, str]


def service_trust(service: str, extra_actions: tuple[str, ...] = (), condition: dict | None = None) -> str:
    """Trust policy letting one AWS service principal assume the role (with `condition`, e.g. aws:SourceAccount)."""
    statement: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": {"Service": service},
        "Action": ["sts:AssumeRole", *extra_actions],
    }
    if condition:
        statement["Condition"] = condition
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def pod_identity_trust(account_id: str) -> str:
    """Trust policy of every role a Kubernetes service account assumes through EKS Pod Identity (workloads and
    cluster controllers alike): only the Pod Identity service, only from this account."""
    return service_trust(
        "pods.eks.amazonaws.com",
        extra_actions=("sts:TagSession",),  # Pod Identity tags sessions with cluster/namespace/service account
        condition={"StringEquals": {"aws:SourceAccount": account_id}},
    )


def s3_statements(
    bucket_arns: dict[str, pulumi.Input[str]],
    access: dict[str, list[str]],
    kms_key_arn: pulumi.Input[str],
    region: str,
    *,
    prefix_access: dict[str, tuple[str, list[str]]] | None = None,
) -> list[dict[str, Any]]:
    """Statements granting `access[kind]` object actions on bucket `kind` (plus listing it), `prefix_access[kind] =
    (prefix, actions)` on the objects under `prefix/` of bucket `kind` only, and the KMS use S3 needs for SSE-KMS,
    restricted to calls made through S3 in this region."""
    statements: list[dict[str, Any]] = []
    for kind, actions in access.items():
        arn = pulumi.Output.from_input(bucket_arns[kind])
        statements.append({"Sid": f"List{kind.title()}", "Effect": "Allow", "Action": LIST, "Resource": arn})
        statements.append(
            {
                "Sid": f"Objects{kind.title()}",
                "Effect": "Allow",
                "Action": actions,
                "Resource": arn.apply(lambda a: f"{a}/*"),
            }
        )
    for kind, (prefix, actions) in (prefix_access or {}).items():
        arn = pulumi.Output.from_input(bucket_arns[kind])
        statements.append(
            {
                "Sid": f"Objects{kind.title()}{prefix.title()}Prefix",
                "Effect": "Allow",
                "Action": actions,
                "Resource": arn.apply(lambda a, p=prefix: f"{a}/{p}/*"),
            }
        )
    granted = [*access.values(), *(actions for _, actions in (prefix_access or {}).values())]
    writes = any(a in WRITE for actions in granted for a in actions)
    statements.append(
        {
            "Sid": "UseProjectKeyViaS3",
            "Effect": "Allow",
            "Action": ["kms:Decrypt", *(["kms:GenerateDataKey"] if writes else [])],
            "Resource": kms_key_arn,
            "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}},
        }
    )
    return statements


def policy_document(statements: list[dict[str, Any]]) -> pulumi.Output[str]:
    return pulumi.Output.json_dumps({"Version": "2012-10-17", "Statement": statements})


TRAINING_ACCESS = {"datasets": READ, "checkpoints": READ + WRITE + DELETE, "models": READ + WRITE}
"""Training reads datasets, reads/writes/prunes checkpoints (keep-last-K), writes the exported model."""
SERVING_ACCESS = {"models": READ}
PREPARE_ACCESS = {"datasets": READ, "models": READ}
"""Data preparation (training.prepare) reads the raw datasets and a model's tokenizer files (never its weights, but
S3 cannot tell them apart by action), and nothing else; its one write grant is PREPARE_WRITES."""
PREPARE_WRITES = {"datasets": (PREPARED_PREFIX, WRITE + DELETE)}
"""... under `prepared/` of the datasets bucket only: shards, manifest, and the per-file parts it deletes when done.
Prepared data is derived from the datasets and lives beside them: the trainer already reads that bucket (no new
grant for training), it is not replicated (models and checkpoints are; tokens can be rebuilt from their sources), and
raw data stays read-only to the job that derives from it. No write to models or checkpoints."""
PROCESSING_LOG_GROUP = "/aws/sagemaker/ProcessingJobs"
"""Where SageMaker Processing jobs log (one stream per job and instance)."""

CLUSTER_KEY_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ListGrants", "kms:DescribeKey"]
"""What the EKS cluster role needs on the secrets-encryption key: the control plane encrypts and decrypts Secrets
as itself, and checks its grants on the key at version upgrades, which otherwise fail
(aws/containers-roadmap#1533). The same four actions terraform-aws-eks attaches (`cluster_encryption` policy)."""


class Identity(pulumi.ComponentResource):
    """The stack's IAM roles: EKS control plane, nodes, the EBS CSI driver, the training, serving and data-preparation
    workloads (Pod Identity), SageMaker execution and SageMaker Processing (data preparation), each with
    least-privilege policies."""

    cluster_role_arn: pulumi.Output[str]
    """Role the EKS control plane assumes (infra/cluster.py)."""
    node_role_arn: pulumi.Output[str]
    """Role every node group's instances carry (infra/cluster.py)."""
    training_role_arn: pulumi.Output[str]
    """Pod Identity role of the training service account (infra/kubernetes_base.py); exported."""
    serving_role_arn: pulumi.Output[str]
    """Pod Identity role of the serving service account (infra/kubernetes_base.py); exported."""
    sagemaker_role_arn: pulumi.Output[str]
    """Execution role of the SageMaker model (infra/sagemaker_endpoint.py); exported for training jobs."""
    ebs_csi_role_arn: pulumi.Output[str]
    """Pod Identity role of the EBS CSI controller add-on (infra/cluster.py)."""
    prepare_role_arn: pulumi.Output[str]
    """Pod Identity role of the data-preparation service account (PREPARE_ACCESS, PREPARE_WRITES); exported."""
    sagemaker_prepare_role_arn: pulumi.Output[str]
    """Execution role of SageMaker Processing jobs that prepare data: the same S3 access, plus what Processing needs
    to run the training image (ECR pull, logs, metrics, the volume key); exported."""
    role_policies: dict[str, list[pulumi.Resource]]
    """Policy attachments and inline policies per role (cluster, node, sagemaker, ...). A consumer depends on them
    explicitly: depending on the role ARN alone lets AWS create the consumer before the role may do anything, and
    on destroy removes the permissions while the consumer still needs them to clean up."""

    def __init__(self, name: str, args: IdentityArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Identity", name, None, opts)
        self._base, self._spec = name, args
        managed = f"arn:{args.partition}:iam::aws:policy"
        workload_trust = pod_identity_trust(args.account_id)
        self.role_policies = {}

        self.cluster_role = self._role(
            "cluster",
            service_trust("eks.amazonaws.com", ("sts:TagSession",)),
            [f"{managed}/AmazonEKSClusterPolicy"],
            inline=[
                {
                    "Sid": "SecretsEncryptionKey",
                    "Effect": "Allow",
                    "Action": CLUSTER_KEY_ACTIONS,
                    "Resource": args.kms_key_arn,
                }
            ],
        )
        self.node_role = self._role(
            "node",
            service_trust("ec2.amazonaws.com"),
            [
                f"{managed}/AmazonEKSWorkerNodePolicy",
                # Pull-only (not ReadOnly): nodes need to fetch images, not list or describe registries.
                f"{managed}/AmazonEC2ContainerRegistryPullOnly",
                f"{managed}/AmazonEKS_CNI_Policy",
            ],
        )
        self.ebs_csi_role = self._role("ebs-csi", workload_trust, [f"{managed}/service-role/AmazonEBSCSIDriverPolicy"])
        self.training_role = self._role(
            "training",
            workload_trust,
            inline=s3_statements(args.bucket_arns, TRAINING_ACCESS, args.kms_key_arn, args.region),
        )
        self.serving_role = self._role(
            "serving",
            workload_trust,
            inline=s3_statements(args.bucket_arns, SERVING_ACCESS, args.kms_key_arn, args.region),
        )
        prepare_s3 = s3_statements(
            args.bucket_arns, PREPARE_ACCESS, args.kms_key_arn, args.region, prefix_access=PREPARE_WRITES
        )
        self.prepare_role = self._role("data-prepare", workload_trust, inline=prepare_s3)
        self.sagemaker_prepare_role = self._role(
            "sagemaker-prepare",
            service_trust(
                "sagemaker.amazonaws.com", condition={"StringEquals": {"aws:SourceAccount": args.account_id}}
            ),
            inline=prepare_s3 + self._processing_statements(),
        )
        self.sagemaker_role = self._role(
            "sagemaker",
            service_trust(
                "sagemaker.amazonaws.com", condition={"StringEquals": {"aws:SourceAccount": args.account_id}}
            ),
            inline=self._sagemaker_statements(),
        )

        self.cluster_role_arn = self.cluster_role.arn
        self.node_role_arn = self.node_role.arn
        self.training_role_arn = self.training_role.arn
        self.serving_role_arn = self.serving_role.arn
        self.sagemaker_role_arn = self.sagemaker_role.arn
        self.ebs_csi_role_arn = self.ebs_csi_role.arn
        self.prepare_role_arn = self.prepare_role.arn
        self.sagemaker_prepare_role_arn = self.sagemaker_prepare_role.arn
        self.register_outputs(
            {
                "cluster_role_arn": self.cluster_role_arn,
                "node_role_arn": self.node_role_arn,
                "training_role_arn": self.training_role_arn,
                "serving_role_arn": self.serving_role_arn,
                "sagemaker_role_arn": self.sagemaker_role_arn,
                "ebs_csi_role_arn": self.ebs_csi_role_arn,
                "prepare_role_arn": self.prepare_role_arn,
                "sagemaker_prepare_role_arn": self.sagemaker_prepare_role_arn,
            }
        )

    def _role(
        self,
        suffix: str,
        trust: str,
        managed_policy_arns: list[str] | None = None,
        inline: list[dict[str, Any]] | None = None,
    ) -> aws.iam.Role:
        policies: list[pulumi.Resource] = []
        role = aws.iam.Role(
            f"{self._base}-{suffix}",
            name=f"{self._spec.name_prefix}-{suffix}",
            assume_role_policy=trust,
            max_session_duration=3600,
            tags=self._spec.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        for i, arn in enumerate(managed_policy_arns or []):
            policies.append(
                aws.iam.RolePolicyAttachment(
                    f"{self._base}-{suffix}-managed-{i}",
                    role=role.name,
                    policy_arn=arn,
                    opts=pulumi.ResourceOptions(parent=self),
                )
            )
        if inline:
            policies.append(
                aws.iam.RolePolicy(
                    f"{self._base}-{suffix}-policy",
                    role=role.id,
                    policy=policy_document(inline),
                    opts=pulumi.ResourceOptions(parent=self),
                )
            )
        self.role_policies[suffix] = policies
        return role

    def _sagemaker_statements(self) -> list[dict[str, Any]]:
        """Training jobs (same data access as the EKS trainer) and endpoints (read models) share one role."""
        a = self._spec
        logs = f"arn:{a.partition}:logs:{a.region}:{a.account_id}:log-group:/aws/sagemaker/*"
        statements = s3_statements(a.bucket_arns, TRAINING_ACCESS, a.kms_key_arn, a.region)
        statements += [
            {
                # GetAuthorizationToken has no resource-level permissions: "*" is the only valid resource.
                "Sid": "EcrLogin",
                "Effect": "Allow",
                "Action": "ecr:GetAuthorizationToken",
                "Resource": "*",
            },
            {
                "Sid": "EcrPullProjectImages",
                "Effect": "Allow",
                "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
                "Resource": list(a.repository_arns.values()),
            },
            {
                # ECR images are encrypted with the project key; pulls decrypt through ECR.
                "Sid": "UseProjectKeyViaEcr",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": a.kms_key_arn,
                "Condition": {"StringEquals": {"kms:ViaService": f"ecr.{a.region}.amazonaws.com"}},
            },
            {
                "Sid": "SageMakerLogs",
                "Effect": "Allow",
                "Action": [
                    "logs:CreateLogGroup",
                    "logs:CreateLogStream",
                    "logs:PutLogEvents",
                    "logs:DescribeLogStreams",
                ],
                "Resource": [logs, f"{logs}:log-stream:*"],
            },
            {
                "Sid": "SageMakerMetrics",
                "Effect": "Allow",
                "Action": "cloudwatch:PutMetricData",
                "Resource": "*",
                "Condition": {"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*", "aws/sagemaker/*"]}},
            },
            {
                # Jobs and endpoints in our private subnets: SageMaker creates ENIs on the role's behalf. The EC2
                # describe/ENI APIs do not support resource-level scoping for these calls.
                "Sid": "VpcAccess",
                "Effect": "Allow",
                "Action": [
                    "ec2:CreateNetworkInterface",
                    "ec2:CreateNetworkInterfacePermission",
                    "ec2:DeleteNetworkInterface",
                    "ec2:DeleteNetworkInterfacePermission",
                    "ec2:DescribeNetworkInterfaces",
                    "ec2:DescribeVpcs",
                    "ec2:DescribeDhcpOptions",
                    "ec2:DescribeSubnets",
                    "ec2:DescribeSecurityGroups",
                ],
                "Resource": "*",
            },
        ]
        return statements

    def _processing_statements(self) -> list[dict[str, Any]]:
        """What a SageMaker Processing job needs besides its data (SageMaker Developer Guide, "How to use SageMaker
        AI execution roles", section "CreateProcessingJob API: Execution Role Permissions"
        (sagemaker-roles.html#sagemaker-roles-createprocessingjob-perms), scoped as that section suggests): pull the
        training image (its repository only), write the job's logs and metrics, and, because the request names the
        project key as VolumeKmsKeyId, kms:CreateGrant on that key, only for an AWS resource (the job's volume).
        No VPC permissions: the request names no VpcConfig (ops/prepare_job.py)."""
        a = self._spec
        group = f"arn:{a.partition}:logs:{a.region}:{a.account_id}:log-group:{PROCESSING_LOG_GROUP}"
        return [
            {
                # GetAuthorizationToken has no resource-level permissions: "*" is the only valid resource.
                "Sid": "EcrLogin",
                "Effect": "Allow",
                "Action": "ecr:GetAuthorizationToken",
                "Resource": "*",
            },
            {
                "Sid": "EcrPullTrainingImage",
                "Effect": "Allow",
                "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
                "Resource": a.repository_arns["training"],
            },
            {
                "Sid": "UseProjectKeyViaEcr",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": a.kms_key_arn,
                "Condition": {"StringEquals": {"kms:ViaService": f"ecr.{a.region}.amazonaws.com"}},
            },
            {
                "Sid": "ProcessingVolumeKey",
                "Effect": "Allow",
                "Action": ["kms:CreateGrant"],
                "Resource": a.kms_key_arn,
                "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}},
            },
            {
                "Sid": "ProcessingLogs",
                "Effect": "Allow",
                "Action": [
                    "logs:CreateLogGroup",
                    "logs:CreateLogStream",
                    "logs:PutLogEvents",
                    "logs:DescribeLogStreams",
                ],
                "Resource": [group, f"{group}:*"],
            },
            {
                "Sid": "ProcessingMetrics",
                "Effect": "Allow",
                "Action": "cloudwatch:PutMetricData",
                "Resource": "*",
                "Condition": {"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*", "aws/sagemaker/*"]}},
            },
        ]
