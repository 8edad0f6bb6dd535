"""Storage: the project KMS key and the datasets, checkpoints and models buckets."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.config import StorageConfig

BUCKET_KINDS = ("datasets", "checkpoints", "models")


def deny_insecure_transport(bucket_arn: pulumi.Input[str]) -> dict[str, object]:
    """The bucket-policy statement every bucket here starts with: any request without TLS is denied, to everyone (S3
    user guide, "Enforce encryption of data in transit": the aws:SecureTransport condition key)."""
    arn = pulumi.Output.from_input(bucket_arn)
    return {
        "Sid": "DenyInsecureTransport",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:*",
        "Resource": [arn, arn.apply(lambda a: f"{a}/*")],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }


@dataclass
class BucketControls:
    public_access: aws.s3.BucketPublicAccessBlock
    """A bucket policy write must wait for it (S3 rejects one while public access settings are changing)."""
    versioning: aws.s3.BucketVersioning
    """Lifecycle rules on versions, replication and object lock need it first."""


def private_bucket_controls(
    stem: str,
    bucket: aws.s3.Bucket,
    kms_key_arn: pulumi.Input[str],
    opts: pulumi.ResourceOptions,
    region: str | None = None,
) -> BucketControls:
    """The controls every bucket of the platform has, as resources named `<stem>-public-access`, `-ownership`,
    `-encryption` and `-versioning`: all public access blocked, ACLs off (access is decided by IAM alone), SSE-KMS
    with the given key and an S3 bucket key (cuts KMS request cost by orders of magnitude for checkpoint-heavy
    writes), versioning on. `region` places them with a bucket in another region (the replicas of infra/backup.py)."""
    where = {"region": region} if region else {}
    public_access = aws.s3.BucketPublicAccessBlock(
        f"{stem}-public-access",
        **where,
        bucket=bucket.id,
        block_public_acls=True,
        block_public_policy=True,
        ignore_public_acls=True,
        restrict_public_buckets=True,
        opts=opts,
    )
    aws.s3.BucketOwnershipControls(
        f"{stem}-ownership", **where, bucket=bucket.id, rule={"object_ownership": "BucketOwnerEnforced"}, opts=opts
    )
    aws.s3.BucketServerSideEncryptionConfiguration(
        f"{stem}-encryption",
        **where,
        bucket=bucket.id,
        rules=[
            {
                "apply_server_side_encryption_by_default": {
                    "sse_algorithm": "aws:kms",
                    "kms_master_key_id": kms_key_arn,
                },
                "bucket_key_enabled": True,
            }
        ],
        opts=opts,
    )
    versioning = aws.s3.BucketVersioning(
        f"{stem}-versioning", **where, bucket=bucket.id, versioning_configuration={"status": "Enabled"}, opts=opts
    )
    return BucketControls(public_access, versioning)


@dataclass
class StorageArgs:
    storage: StorageConfig
    """Bucket deletion and data protection, checkpoint version expiry."""
    name_prefix: str
    """Prefix of the key alias and bucket names (StackConfig.name_prefix)."""
    stack: str
    region: str
    account_id: str
    """Account the stack deploys into: part of bucket names (globally unique) and of the key policy."""
    partition: str
    tags: dict[str, str]


class Storage(pulumi.ComponentResource):
    """The stack's KMS key and its datasets, checkpoints and models buckets (versioned, KMS-encrypted, private,
    TLS-only); protected and retained on delete when protectData is set."""

    kms_key_arn: pulumi.Output[str]
    """The stack's KMS key: buckets, registries, log groups, EKS Secrets and SageMaker volumes use it; exported."""
    bucket_names: dict[str, pulumi.Output[str]]
    """Bucket names by kind (datasets, checkpoints, models): exported for the launchers and serving."""
    bucket_arns: dict[str, pulumi.Output[str]]
    """Bucket ARNs by kind: the workload roles' policies and the S3 gateway endpoint policy admit them."""

    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Storage", name, None, opts)
        self._base, self._spec = name, args
        # Data outlives environments in production: `protect` makes `pulumi destroy` refuse, `retain_on_delete`
        # keeps the data even if someone removes the resource from the program.
        self._data_opts = pulumi.ResourceOptions(
            parent=self, protect=args.storage.protect_data, retain_on_delete=args.storage.protect_data
        )
        self.kms_key = self._create_key()
        self.buckets = {kind: self._create_bucket(kind) for kind in BUCKET_KINDS}

        self.kms_key_arn = self.kms_key.arn
        self.bucket_names = {k: b.bucket for k, b in self.buckets.items()}
        self.bucket_arns = {k: b.arn for k, b in self.buckets.items()}
        self.register_outputs(
            {"kms_key_arn": self.kms_key_arn, **{f"{k}_bucket": v for k, v in self.bucket_names.items()}}
        )

    def _create_key(self) -> aws.kms.Key:
        a = self._spec
        root = f"arn:{a.partition}:iam::{a.account_id}:root"
        log_groups = f"arn:{a.partition}:logs:{a.region}:{a.account_id}:log-group:*"
        # The account root keeps administration (so IAM policies can grant use); CloudWatch Logs may use the key
        # only for this account's log groups in this region (flow logs, EKS control-plane logs).
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "AccountAdministers",
                    "Effect": "Allow",
                    "Principal": {"AWS": root},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Sid": "CloudWatchLogsEncrypt",
                    "Effect": "Allow",
                    "Principal": {"Service": f"logs.{a.region}.amazonaws.com"},
                    "Action": [
                        "kms:Encrypt*",
                        "kms:Decrypt*",
                        "kms:ReEncrypt*",
                        "kms:GenerateDataKey*",
                        "kms:Describe*",
                    ],
                    "Resource": "*",
                    "Condition": {"ArnLike": {"kms:EncryptionContext:aws:logs:arn": log_groups}},
                },
            ],
        }
        key = aws.kms.Key(
            f"{self._base}-key",
            description=f"llm-platform {a.stack}: buckets, registries, logs, EKS secrets, SageMaker volumes",
            enable_key_rotation=True,
            deletion_window_in_days=30 if a.storage.protect_data else 7,
            policy=json.dumps(policy),
            tags=a.tags,
            opts=self._data_opts,
        )
        aws.kms.Alias(
            f"{self._base}-key-alias",
            name=f"alias/{a.name_prefix}",
            target_key_id=key.key_id,
            opts=pulumi.ResourceOptions(parent=self),
        )
        return key

    def _create_bucket(self, kind: str) -> aws.s3.Bucket:
        a = self._spec
        child = pulumi.ResourceOptions(parent=self)
        bucket = aws.s3.Bucket(
            f"{self._base}-{kind}",
            # Bucket names are global: account and region make them unique without a random suffix, so tools
            # can derive them and teardown can recognise them.
            bucket=f"{a.name_prefix}-{kind}-{a.account_id}-{a.region}",
            force_destroy=a.storage.force_destroy,
            tags={**a.tags, "llm-platform:data": kind},
            opts=self._data_opts,
        )
        controls = private_bucket_controls(f"{self._base}-{kind}", bucket, self.kms_key.arn, child)
        aws.s3.BucketPolicy(
            f"{self._base}-{kind}-policy",
            bucket=bucket.id,
            policy=pulumi.Output.json_dumps(
                {"Version": "2012-10-17", "Statement": [deny_insecure_transport(bucket.arn)]}
            ),
            # S3 rejects a policy write while public access settings are changing.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[controls.public_access]),
        )
        noncurrent_days = a.storage.checkpoint_noncurrent_days if kind == "checkpoints" else 90
        aws.s3.BucketLifecycleConfiguration(
            f"{self._base}-{kind}-lifecycle",
            bucket=bucket.id,
            rules=[
                {
                    "id": "abort-incomplete-multipart-uploads",
                    "status": "Enabled",
                    "filter": {},
                    "abort_incomplete_multipart_upload": {"days_after_initiation": 3},
                },
                {
                    # Checkpoints are rewritten constantly; old versions are only worth a few days of rollback.
                    "id": "expire-noncurrent-versions",
                    "status": "Enabled",
                    "filter": {},
                    "noncurrent_version_expiration": {"noncurrent_days": noncurrent_days},
                },
            ],
            # Lifecycle rules on versions need versioning to exist first.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[controls.versioning]),
        )
        return bucket
