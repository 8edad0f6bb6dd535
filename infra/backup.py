"""Backup: the models and checkpoints buckets replicated to a second region (S3 Cross-Region Replication).

Why replication and not an AWS Backup plan for S3 (docs/operations.md, "Backup and restore", has the numbers):
- RPO: replication copies each new object version asynchronously, most within 15 minutes (S3 user guide,
  "Replicating objects within and across Regions"); AWS Backup's continuous S3 backups restore to a point in time
  but only inside the source region, and a copy to a second region is a scheduled copy job (RPO of the schedule).
- RTO: the replica is a normal bucket: `python -m ops.restore` copies a model prefix back with CopyObject, or a
  service reads it in place; an AWS Backup restore is a restore job into a bucket, then the same copy.
- Cost: replica storage (STANDARD_IA here, models and checkpoints are read back only on a restore) plus
  inter-region transfer once per version; AWS Backup for S3 bills backup storage per GB-month at a higher rate and
  still needs the copy job and a second vault for a regional outage.

Deletes are not replicated (DeleteMarkerReplication disabled): a deleted prefix in the primary bucket, by mistake or
by a compromised deploy role, stays readable in the replica. The replica buckets are versioned (replication requires
it) and encrypted with their own KMS key in the replica region, so losing the primary region's key loses nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from infra.storage import deny_insecure_transport, private_bucket_controls

REPLICATED_KINDS = ("models", "checkpoints")
"""The buckets whose loss costs GPU-days: trained models and training checkpoints. Datasets are re-derivable from
their sources and are not replicated."""
REPLICA_STORAGE_CLASS = "STANDARD_IA"
"""Replica objects are read only during a restore: infrequent-access storage at ~55% of STANDARD's price."""


def replica_bucket_name(name_prefix: str, kind: str, account_id: str, replica_region: str) -> str:
    """The replica bucket of `kind`: derivable by tools (ops.restore) like the primary buckets' names."""
    return f"{name_prefix}-{kind}-replica-{account_id}-{replica_region}"


@dataclass(kw_only=True)
class BackupArgs:
    name_prefix: str
    """Prefix of bucket, key and role names (StackConfig.name_prefix)."""
    stack: str
    region: str
    """The primary region (where the source buckets and the replication configuration live)."""
    replica_region: str
    """ProtectionConfig.backup_replica_region: never the primary region (infra/config.py)."""
    account_id: str
    partition: str
    bucket_names: dict[str, pulumi.Input[str]]
    """The primary buckets by kind (Storage.bucket_names); only REPLICATED_KINDS are read."""
    bucket_arns: dict[str, pulumi.Input[str]]
    source_kms_key_arn: pulumi.Input[str]
    """The primary buckets' KMS key: replication decrypts with it."""
    protect_data: bool
    """StorageConfig.protect_data: replica buckets and key are protected and retained like the primaries."""
    tags: dict[str, str]
    depends_on: list[pulumi.Resource] = field(default_factory=list)
    """The primary buckets' versioning (replication needs it on the source first): the Storage component."""


class Backup(pulumi.ComponentResource):
    """Replica buckets for models and checkpoints in a second region, their KMS key, the replication role and the
    replication rules on the primary buckets."""

    replica_bucket_names: dict[str, pulumi.Output[str]]
    """Replica bucket names by kind (models, checkpoints); exported for ops.restore."""
    replica_kms_key_arn: pulumi.Output[str]

    def __init__(self, name: str, args: BackupArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Backup", name, None, opts)
        self._base, self._args = name, args
        self._data_opts = pulumi.ResourceOptions(
            parent=self, protect=args.protect_data, retain_on_delete=args.protect_data
        )
        self.replica_key = self._create_replica_key()
        replicas = {kind: self._create_replica_bucket(kind) for kind in REPLICATED_KINDS}
        role = self._create_role({k: b.arn for k, (b, _) in replicas.items()})
        for kind, (bucket, versioning) in replicas.items():
            self._replicate(kind, bucket, role, versioning)

        self.replica_bucket_names = {k: b.bucket for k, (b, _) in replicas.items()}
        self.replica_kms_key_arn = self.replica_key.arn
        self.register_outputs(
            {
                "replica_kms_key_arn": self.replica_kms_key_arn,
                **{f"{k}_replica": v for k, v in self.replica_bucket_names.items()},
            }
        )

    def _create_replica_key(self) -> aws.kms.Key:
        a = self._args
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "AccountAdministers",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:{a.partition}:iam::{a.account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ],
        }
        key = aws.kms.Key(
            f"{self._base}-replica-key",
            region=a.replica_region,
            description=f"llm-platform {a.stack}: replica buckets of models and checkpoints ({a.replica_region})",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            policy=json.dumps(policy),
            tags=a.tags,
            opts=self._data_opts,
        )
        aws.kms.Alias(
            f"{self._base}-replica-key-alias",
            region=a.replica_region,
            name=f"alias/{a.name_prefix}-replica",
            target_key_id=key.key_id,
            opts=pulumi.ResourceOptions(parent=self),
        )
        return key

    def _create_replica_bucket(self, kind: str) -> tuple[aws.s3.Bucket, aws.s3.BucketVersioning]:
        a = self._args
        child = pulumi.ResourceOptions(parent=self)
        region = a.replica_region
        bucket = aws.s3.Bucket(
            f"{self._base}-{kind}-replica",
            region=region,
            bucket=replica_bucket_name(a.name_prefix, kind, a.account_id, region),
            force_destroy=False,
            tags={**a.tags, "llm-platform:data": f"{kind}-replica"},
            opts=self._data_opts,
        )
        # Replication requires versioning on the destination as well as the source.
        controls = private_bucket_controls(
            f"{self._base}-{kind}-replica", bucket, self.replica_key.arn, child, region=region
        )
        aws.s3.BucketPolicy(
            f"{self._base}-{kind}-replica-policy",
            region=region,
            bucket=bucket.id,
            policy=pulumi.Output.json_dumps(
                {"Version": "2012-10-17", "Statement": [deny_insecure_transport(bucket.arn)]}
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[controls.public_access]),
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{self._base}-{kind}-replica-lifecycle",
            region=region,
            bucket=bucket.id,
            rules=[
                {
                    "id": "abort-incomplete-multipart-uploads",
                    "status": "Enabled",
                    "filter": {},
                    "abort_incomplete_multipart_upload": {"days_after_initiation": 3},
                },
                {
                    # Older versions are the point-in-time history of the replica; keep them as long as the primary.
                    "id": "expire-noncurrent-versions",
                    "status": "Enabled",
                    "filter": {},
                    "noncurrent_version_expiration": {"noncurrent_days": 90},
                },
            ],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[controls.versioning]),
        )
        return bucket, controls.versioning

    def _create_role(self, replica_arns: dict[str, pulumi.Output[str]]) -> aws.iam.Role:
        """The role S3 assumes to replicate: read the source versions, write replicas, nothing else (S3 user guide,
        "Setting up permissions for live replication", and "Replicating objects created with server-side
        encryption (SSE-KMS)" for the two KMS statements)."""
        a = self._args
        role = aws.iam.Role(
            f"{self._base}-replication-role",
            name=f"{a.name_prefix}-replication",
            assume_role_policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "s3.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                            "Condition": {"StringEquals": {"aws:SourceAccount": a.account_id}},
                        }
                    ],
                }
            ),
            tags=a.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        statements: list[dict] = []
        for kind in REPLICATED_KINDS:
            source = pulumi.Output.from_input(a.bucket_arns[kind])
            replica = replica_arns[kind]
            title = kind.title()
            statements += [
                {
                    "Sid": f"ReadReplicationConfig{title}",
                    "Effect": "Allow",
                    "Action": ["s3:GetReplicationConfiguration", "s3:ListBucket"],
                    "Resource": source,
                },
                {
                    "Sid": f"ReadSourceVersions{title}",
                    "Effect": "Allow",
                    "Action": [
                        "s3:GetObjectVersionForReplication",
                        "s3:GetObjectVersionAcl",
                        "s3:GetObjectVersionTagging",
                    ],
                    "Resource": source.apply(lambda arn: f"{arn}/*"),
                },
                {
                    # No s3:ReplicateDelete: delete markers are not replicated (see the module docstring).
                    "Sid": f"WriteReplicas{title}",
                    "Effect": "Allow",
                    "Action": ["s3:ReplicateObject", "s3:ReplicateTags"],
                    "Resource": replica.apply(lambda arn: f"{arn}/*"),
                },
            ]
        source_prefixes = [
            pulumi.Output.from_input(a.bucket_arns[k]).apply(lambda arn: f"{arn}/*") for k in REPLICATED_KINDS
        ]
        replica_prefixes = [replica_arns[k].apply(lambda arn: f"{arn}/*") for k in REPLICATED_KINDS]
        statements += [
            {
                "Sid": "DecryptSourceViaS3",
                "Effect": "Allow",
                "Action": ["kms:Decrypt"],
                "Resource": a.source_kms_key_arn,
                "Condition": {
                    "StringEquals": {"kms:ViaService": f"s3.{a.region}.amazonaws.com"},
                    "StringLike": {"kms:EncryptionContext:aws:s3:arn": source_prefixes},
                },
            },
            {
                "Sid": "EncryptReplicasViaS3",
                "Effect": "Allow",
                "Action": ["kms:Encrypt", "kms:GenerateDataKey"],
                "Resource": self.replica_key.arn,
                "Condition": {
                    "StringEquals": {"kms:ViaService": f"s3.{a.replica_region}.amazonaws.com"},
                    "StringLike": {"kms:EncryptionContext:aws:s3:arn": replica_prefixes},
                },
            },
        ]
        self.role_policy = aws.iam.RolePolicy(
            f"{self._base}-replication-policy",
            role=role.id,
            policy=pulumi.Output.json_dumps({"Version": "2012-10-17", "Statement": statements}),
            opts=pulumi.ResourceOptions(parent=self),
        )
        return role

    def _replicate(
        self, kind: str, replica: aws.s3.Bucket, role: aws.iam.Role, replica_versioning: aws.s3.BucketVersioning
    ) -> aws.s3.BucketReplicationConfig:
        a = self._args
        return aws.s3.BucketReplicationConfig(
            f"{self._base}-{kind}-replication",
            bucket=a.bucket_names[kind],
            role=role.arn,
            rules=[
                {
                    "id": f"{kind}-to-{a.replica_region}",
                    "status": "Enabled",
                    "priority": 1,
                    "filter": {},
                    # A delete in the primary must not hide the replica's copy: that is what the replica is for.
                    "delete_marker_replication": {"status": "Disabled"},
                    # Our objects are SSE-KMS; without this S3 silently skips them.
                    "source_selection_criteria": {"sse_kms_encrypted_objects": {"status": "Enabled"}},
                    "destination": {
                        "bucket": replica.arn,
                        "storage_class": REPLICA_STORAGE_CLASS,
                        "encryption_configuration": {"replica_kms_key_id": self.replica_key.arn},
                    },
                }
            ],
            # The source's versioning (in Storage), the destination's versioning and the role's policy must exist
            # first, or S3 rejects the configuration.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[replica_versioning, self.role_policy, *a.depends_on]),
        )
