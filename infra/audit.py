"""Audit: a CloudTrail trail into a bucket nobody can rewrite.

Management events of the account (who changed an IAM role, a node group, a bucket policy) and S3 data events on the
datasets and models buckets (who read a model, who deleted a dataset object) go to a bucket with S3 Object Lock:
every log file is locked for auditRetentionDays in GOVERNANCE (dev) or COMPLIANCE (production) mode, and log-file
validation writes signed digest files so a changed or removed file is detected (`aws cloudtrail validate-logs`).
The files are encrypted with the trail's own KMS key.

EKS control-plane audit logs (the Kubernetes API's own trail: who exec'd into a pod, who read a Secret) are enabled
in infra/cluster.py (CONTROL_PLANE_LOG_TYPES) with controlPlaneLogRetentionDays.

References (AWS docs, CloudTrail user guide):
- "Amazon S3 bucket policy for CloudTrail": the AWSCloudTrailAclCheck / AWSCloudTrailWrite statements with the
  aws:SourceArn condition, and the `AWSLogs/<account>/` key prefix CloudTrail writes under.
- "Configure AWS KMS key policies for CloudTrail": GenerateDataKey* for cloudtrail.amazonaws.com with the
  aws:cloudtrail:arn encryption context and aws:SourceArn; Decrypt for principals of the account.
- "Logging data events": AWS::S3::Object data resources as `arn:aws:s3:::<bucket>/`.
- S3 user guide, "Locking objects with Object Lock": Object Lock is enabled at bucket creation and needs
  versioning; COMPLIANCE retention cannot be shortened or removed by any user, the root user included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.config import ProtectionConfig
from infra.storage import deny_insecure_transport, private_bucket_controls

AUDITED_DATA_KINDS = ("datasets", "models")
"""Buckets whose object reads and writes are data events on the trail (checkpoints are written every few minutes by
training: their events would dominate the bill and say little about people)."""

_PROTECT_ACTIONS_GOVERNANCE = ("s3:DeleteBucket", "s3:BypassGovernanceRetention")
_PROTECT_ACTIONS_COMPLIANCE = (
    *_PROTECT_ACTIONS_GOVERNANCE,
    "s3:DeleteBucketPolicy",
    "s3:PutBucketPolicy",
    "s3:PutBucketObjectLockConfiguration",
    "s3:PutBucketVersioning",
)
"""Denied to every principal of the account, the deploy role included. In COMPLIANCE mode the policy also freezes
itself: only the account root can change or remove a bucket policy that denies it (S3 user guide, "Bucket policy
examples": the root user can always delete a bucket policy), so a compromised deploy role can neither delete the bucket
nor rewrite the policy first. GOVERNANCE mode (dev) leaves the policy editable, so a dev stack's trail bucket can be
retired deliberately once its retention has passed."""


def trail_name(name_prefix: str) -> str:
    return f"{name_prefix}-audit"


def trail_bucket_prefix(name_prefix: str) -> str:
    """S3 appends a unique suffix (bucket_prefix is at most 37 characters)."""
    return f"{name_prefix}-audit-"


@dataclass(kw_only=True)
class AuditArgs:
    protection: ProtectionConfig
    """Lock mode and retention of the trail's files."""
    name_prefix: str
    stack: str
    region: str
    account_id: str
    partition: str
    bucket_arns: dict[str, pulumi.Input[str]]
    """The data buckets by kind (Storage.bucket_arns); AUDITED_DATA_KINDS get data events."""
    protect_data: bool
    """StorageConfig.protect_data: the trail bucket and key are protected like the data."""
    tags: dict[str, str]


class Audit(pulumi.ComponentResource):
    """The stack's CloudTrail trail, its KMS key and its Object Lock bucket."""

    trail_arn: pulumi.Output[str]
    bucket_name: pulumi.Output[str]
    kms_key_arn: pulumi.Output[str]

    def __init__(self, name: str, args: AuditArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Audit", name, None, opts)
        self._base, self._args = name, args
        a = args
        self._trail_arn = f"arn:{a.partition}:cloudtrail:{a.region}:{a.account_id}:trail/{trail_name(a.name_prefix)}"
        # The record outlives the stack: a destroy forgets the bucket and its settings, it never deletes them (and
        # could not: the policy denies it).
        self._keep = pulumi.ResourceOptions(parent=self, protect=a.protect_data, retain_on_delete=True)
        self.key = self._create_key()
        bucket, policy = self._create_bucket()
        trail = aws.cloudtrail.Trail(
            f"{self._base}-trail",
            name=trail_name(a.name_prefix),
            s3_bucket_name=bucket.bucket,
            kms_key_id=self.key.arn,
            enable_log_file_validation=True,
            include_global_service_events=True,  # IAM and STS are global services: their events are the point
            is_multi_region_trail=True,  # a resource created in another region is still recorded
            event_selectors=[
                {
                    "read_write_type": "All",
                    "include_management_events": True,
                    # Object-level reads, writes and deletes on the data buckets (auditS3DataEvents; off: the
                    # management events only, free for an account's first trail).
                    "data_resources": [
                        {
                            "type": "AWS::S3::Object",
                            "values": [
                                pulumi.Output.from_input(a.bucket_arns[k]).apply(lambda arn: f"{arn}/")
                                for k in AUDITED_DATA_KINDS
                            ],
                        }
                    ]
                    if a.protection.audit_s3_data_events
                    else [],
                }
            ],
            tags=a.tags,
            # CloudTrail checks at creation that it may write to the bucket and use the key.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[policy, self.key]),
        )
        self.trail_arn = trail.arn
        self.bucket_name = bucket.bucket
        self.kms_key_arn = self.key.arn
        self.register_outputs(
            {"trail_arn": self.trail_arn, "bucket_name": self.bucket_name, "kms_key_arn": self.kms_key_arn}
        )

    def _create_key(self) -> aws.kms.Key:
        a = self._args
        trails = f"arn:{a.partition}:cloudtrail:*:{a.account_id}:trail/*"
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "AccountAdministers",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:{a.partition}:iam::{a.account_id}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Sid": "CloudTrailEncryptsLogs",
                    "Effect": "Allow",
                    "Principal": {"Service": "cloudtrail.amazonaws.com"},
                    "Action": "kms:GenerateDataKey*",
                    "Resource": "*",
                    "Condition": {
                        "StringEquals": {"aws:SourceArn": self._trail_arn},
                        "StringLike": {"kms:EncryptionContext:aws:cloudtrail:arn": trails},
                    },
                },
                {
                    "Sid": "CloudTrailDescribesKey",
                    "Effect": "Allow",
                    "Principal": {"Service": "cloudtrail.amazonaws.com"},
                    "Action": "kms:DescribeKey",
                    "Resource": "*",
                    "Condition": {"StringEquals": {"aws:SourceArn": self._trail_arn}},
                },
                {
                    # Reading the logs needs kms:Decrypt granted by IAM as well (auditors' roles).
                    "Sid": "AccountDecryptsLogs",
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:{a.partition}:iam::{a.account_id}:root"},
                    "Action": ["kms:Decrypt", "kms:ReEncryptFrom"],
                    "Resource": "*",
                    "Condition": {
                        "StringEquals": {"kms:CallerAccount": a.account_id},
                        "StringLike": {"kms:EncryptionContext:aws:cloudtrail:arn": trails},
                    },
                },
            ],
        }
        key = aws.kms.Key(
            f"{self._base}-key",
            description=f"llm-platform {a.stack}: CloudTrail log files",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            policy=json.dumps(policy),
            tags=a.tags,
            opts=pulumi.ResourceOptions(parent=self, protect=a.protect_data, retain_on_delete=True),
        )
        aws.kms.Alias(
            f"{self._base}-key-alias",
            name=f"alias/{a.name_prefix}-audit",
            target_key_id=key.key_id,
            opts=pulumi.ResourceOptions(parent=self),
        )
        return key

    def _create_bucket(self) -> tuple[aws.s3.Bucket, aws.s3.BucketPolicy]:
        a, p = self._args, self._args.protection
        bucket = aws.s3.Bucket(
            f"{self._base}-bucket",
            # A prefix, not a fixed name: the bucket outlives its stack (retained, and undeletable until its files
            # expire), so a stack created again under the same name must get a new bucket, not collide with it.
            bucket_prefix=trail_bucket_prefix(a.name_prefix),
            object_lock_enabled=True,  # only possible at creation
            force_destroy=False,
            tags={**a.tags, "llm-platform:data": "audit"},
            opts=self._keep,
        )
        controls = private_bucket_controls(self._base, bucket, self.key.arn, self._keep)
        public_access, versioning = controls.public_access, controls.versioning
        lock = aws.s3.BucketObjectLockConfiguration(
            f"{self._base}-object-lock",
            bucket=bucket.id,
            object_lock_enabled="Enabled",
            rule={"default_retention": {"mode": p.audit_lock_mode, "days": p.audit_retention_days}},
            opts=pulumi.ResourceOptions.merge(self._keep, pulumi.ResourceOptions(depends_on=[versioning])),
        )
        aws.s3.BucketLifecycleConfiguration(
            f"{self._base}-lifecycle",
            bucket=bucket.id,
            rules=[
                {
                    # After the lock ends the files go: a delete marker first, the version a day later.
                    "id": "expire-after-retention",
                    "status": "Enabled",
                    "filter": {},
                    "expiration": {"days": p.audit_retention_days + 1},
                    "noncurrent_version_expiration": {"noncurrent_days": 1},
                }
            ],
            opts=pulumi.ResourceOptions.merge(self._keep, pulumi.ResourceOptions(depends_on=[lock])),
        )
        policy = aws.s3.BucketPolicy(
            f"{self._base}-policy",
            bucket=bucket.id,
            policy=pulumi.Output.json_dumps(self._bucket_policy(bucket.arn)),
            # Last: a COMPLIANCE policy forbids changing the lock and versioning settings after it.
            opts=pulumi.ResourceOptions.merge(
                self._keep, pulumi.ResourceOptions(depends_on=[public_access, lock, versioning])
            ),
        )
        return bucket, policy

    def _bucket_policy(self, bucket_arn: pulumi.Output[str]) -> dict[str, Any]:
        a = self._args
        objects = bucket_arn.apply(lambda arn: f"{arn}/*")
        protect = (
            _PROTECT_ACTIONS_COMPLIANCE if a.protection.audit_lock_mode == "COMPLIANCE" else _PROTECT_ACTIONS_GOVERNANCE
        )
        return {
            "Version": "2012-10-17",
            "Statement": [
                deny_insecure_transport(bucket_arn),
                {
                    "Sid": "AWSCloudTrailAclCheck",
                    "Effect": "Allow",
                    "Principal": {"Service": "cloudtrail.amazonaws.com"},
                    "Action": "s3:GetBucketAcl",
                    "Resource": bucket_arn,
                    "Condition": {"StringEquals": {"aws:SourceArn": self._trail_arn}},
                },
                {
                    "Sid": "AWSCloudTrailWrite",
                    "Effect": "Allow",
                    "Principal": {"Service": "cloudtrail.amazonaws.com"},
                    "Action": "s3:PutObject",
                    "Resource": bucket_arn.apply(lambda arn: f"{arn}/AWSLogs/{a.account_id}/*"),
                    "Condition": {
                        "StringEquals": {
                            "s3:x-amz-acl": "bucket-owner-full-control",
                            "aws:SourceArn": self._trail_arn,
                        }
                    },
                },
                {
                    "Sid": "NobodyDeletesTheTrail",
                    "Effect": "Deny",
                    "Principal": "*",
                    "Action": list(protect),
                    "Resource": [bucket_arn, objects],
                },
            ],
        }
