"""The audit trail (CloudTrail, its Object Lock bucket and key, EKS audit logs) and the cross-region replication of
models and checkpoints, per shipped stack, as the program declares them under the mock engine."""

from __future__ import annotations

import json

import pytest

from facts import pulumi_types as tok
from infra import outputs as out
from infra.audit import AUDITED_DATA_KINDS
from infra.backup import REPLICA_STORAGE_CLASS, REPLICATED_KINDS
from infra.cluster import CONTROL_PLANE_LOG_TYPES
from infra.config import ConfigError, load_stack
from policy.iam import iam_document_violations

ACCOUNT = "123456789012"


def _doc(rec, key: str = "policy") -> dict:
    return json.loads(rec.inputs[key])


def _statement(doc: dict, sid: str) -> dict:
    return next(s for s in doc["Statement"] if s["Sid"] == sid)


# -- audit ---------------------------------------------------------------------------------------------------------


def test_trail_records_management_and_data_events_with_validation(shipped) -> None:
    cfg, run = shipped
    trail = run.one(tok.CLOUDTRAIL_TRAIL, "audit-trail").inputs
    assert trail["enableLogFileValidation"] is True
    assert trail["isMultiRegionTrail"] is True and trail["includeGlobalServiceEvents"] is True
    assert trail["kmsKeyId"] == run.one(tok.KMS_KEY, "audit-key").state["arn"]
    assert trail["s3BucketName"] == run.outputs[out.AUDIT_TRAIL_BUCKET]
    (selector,) = trail["eventSelectors"]
    assert selector["includeManagementEvents"] is True and selector["readWriteType"] == "All"
    if not cfg.protection.audit_s3_data_events:  # dev: management events only (auditS3DataEvents false)
        assert selector["dataResources"] == []
        return
    (data,) = selector["dataResources"]
    assert data["type"] == "AWS::S3::Object"
    assert data["values"] == [f"arn:aws:s3:::{run.outputs[f'{k}_bucket']}/" for k in AUDITED_DATA_KINDS]


def test_data_events_are_on_in_production_and_off_only_by_choice() -> None:
    assert [s for s in ("dev", "staging", "prod") if not load_stack(s).protection.audit_s3_data_events] == ["dev"]
    with pytest.raises(ConfigError, match=r"auditS3DataEvents.*must be true when production is true"):
        load_stack("prod", auditS3DataEvents=False)


def test_trail_bucket_is_locked_for_the_configured_retention(shipped) -> None:
    cfg, run = shipped
    bucket = run.one(tok.S3_BUCKET, "audit-bucket")
    assert bucket.inputs["objectLockEnabled"] is True and bucket.inputs["forceDestroy"] is False
    # Retained beyond the stack: a recreated stack gets a fresh bucket instead of colliding with the old one.
    assert bucket.inputs["bucketPrefix"] == f"{cfg.name_prefix}-audit-" and "bucket" not in bucket.inputs
    assert run.outputs[out.AUDIT_TRAIL_BUCKET].startswith(bucket.inputs["bucketPrefix"])
    assert bucket.retain_on_delete and bucket.protect is cfg.storage.protect_data
    lock = run.one(tok.S3_BUCKET_OBJECT_LOCK_CONFIGURATION).inputs
    retention = lock["rule"]["defaultRetention"]
    assert retention == {"mode": cfg.protection.audit_lock_mode, "days": cfg.protection.audit_retention_days}
    assert lock["objectLockEnabled"] == "Enabled"
    assert (
        run.one(tok.S3_BUCKET_VERSIONING, "audit-versioning").inputs["versioningConfiguration"]["status"] == "Enabled"
    )
    expiry = run.one(tok.S3_BUCKET_LIFECYCLE_CONFIGURATION, "audit-lifecycle").inputs["rules"][0]["expiration"]
    assert expiry["days"] > cfg.protection.audit_retention_days  # never asks S3 to expire a locked file


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_prod_locks_in_compliance_mode_and_dev_in_governance(run_stack, stack: str) -> None:
    lock = run_stack(stack).one(tok.S3_BUCKET_OBJECT_LOCK_CONFIGURATION).inputs["rule"]["defaultRetention"]
    assert lock["mode"] == {"dev": "GOVERNANCE", "prod": "COMPLIANCE"}[stack]


def test_trail_bucket_policy_follows_the_cloudtrail_documentation_and_denies_deletion(shipped) -> None:
    cfg, run = shipped
    bucket = run.outputs[out.AUDIT_TRAIL_BUCKET]
    arn = f"arn:aws:s3:::{bucket}"
    trail_arn = f"arn:aws:cloudtrail:{cfg.region}:{ACCOUNT}:trail/{cfg.name_prefix}-audit"
    policy = _doc(run.one(tok.S3_BUCKET_POLICY, "audit-policy"))
    acl = _statement(policy, "AWSCloudTrailAclCheck")
    assert acl["Principal"] == {"Service": "cloudtrail.amazonaws.com"} and acl["Action"] == "s3:GetBucketAcl"
    assert acl["Condition"] == {"StringEquals": {"aws:SourceArn": trail_arn}}
    write = _statement(policy, "AWSCloudTrailWrite")
    assert write["Resource"] == f"{arn}/AWSLogs/{ACCOUNT}/*"
    assert write["Condition"]["StringEquals"] == {
        "s3:x-amz-acl": "bucket-owner-full-control",
        "aws:SourceArn": trail_arn,
    }
    deny = _statement(policy, "NobodyDeletesTheTrail")
    assert deny["Effect"] == "Deny" and deny["Principal"] == "*"  # the deploy role is one of "*"
    assert {"s3:DeleteBucket", "s3:BypassGovernanceRetention"} <= set(deny["Action"])
    frozen = {"s3:PutBucketPolicy", "s3:DeleteBucketPolicy", "s3:PutBucketObjectLockConfiguration"}
    assert (frozen <= set(deny["Action"])) is (cfg.protection.audit_lock_mode == "COMPLIANCE")
    # Every setting of the trail bucket is retained on delete: a destroy never calls the denied APIs.
    companions = [r for r in run.resources if r.parent == "audit" and r.type.startswith("aws:s3/")]
    assert len(companions) >= 7 and all(r.retain_on_delete for r in companions)


def test_trail_key_lets_only_this_trail_encrypt(shipped) -> None:
    cfg, run = shipped
    key = run.one(tok.KMS_KEY, "audit-key")
    policy = _doc(key)
    assert iam_document_violations(policy, key_policy=True) == []
    encrypt = _statement(policy, "CloudTrailEncryptsLogs")
    assert encrypt["Action"] == "kms:GenerateDataKey*"
    assert encrypt["Condition"]["StringEquals"]["aws:SourceArn"].endswith(f":trail/{cfg.name_prefix}-audit")
    assert encrypt["Condition"]["StringLike"] == {
        "kms:EncryptionContext:aws:cloudtrail:arn": f"arn:aws:cloudtrail:*:{ACCOUNT}:trail/*"
    }
    assert key.inputs["enableKeyRotation"] is True


def test_eks_audit_logs_are_on_with_the_configured_retention(shipped) -> None:
    cfg, run = shipped
    cluster = run.one(tok.EKS_CLUSTER).inputs
    assert {"audit", "authenticator"} <= set(cluster["enabledClusterLogTypes"]) == set(CONTROL_PLANE_LOG_TYPES)
    group = next(g for g in run.of_type(tok.CLOUDWATCH_LOG_GROUP) if g.name == "cluster-control-plane-logs")
    assert group.inputs["retentionInDays"] == cfg.cluster.control_plane_log_retention_days


def test_trail_can_be_turned_off_outside_production(run_stack) -> None:
    run = run_stack("dev", {"llm-platform:auditTrail": False})
    assert run.of_type(tok.CLOUDTRAIL_TRAIL) == [] and out.AUDIT_TRAIL_BUCKET not in run.outputs


# -- backup --------------------------------------------------------------------------------------------------------


def test_prod_replicates_models_and_checkpoints_to_its_second_region(run_stack) -> None:
    cfg, run = load_stack("prod"), run_stack("prod")
    replica_region = cfg.protection.backup_replica_region
    assert replica_region and replica_region != cfg.region
    replica_key = run.one(tok.KMS_KEY, "backup-replica-key")
    assert replica_key.inputs["region"] == replica_region and replica_key.protect
    role = run.one(tok.IAM_ROLE, "backup-replication-role")
    assert _doc(role, "assumeRolePolicy")["Statement"][0]["Principal"] == {"Service": "s3.amazonaws.com"}
    for kind in REPLICATED_KINDS:
        replica = run.one(tok.S3_BUCKET, f"backup-{kind}-replica")
        assert replica.inputs["region"] == replica_region and replica.protect and replica.retain_on_delete
        name = replica.inputs["bucket"]
        assert run.outputs[f"{kind}_replica_bucket"] == name
        versioning = run.one(tok.S3_BUCKET_VERSIONING, f"backup-{kind}-replica-versioning").inputs
        assert versioning["versioningConfiguration"]["status"] == "Enabled" and versioning["region"] == replica_region
        sse = run.one(tok.S3_BUCKET_SERVER_SIDE_ENCRYPTION_CONFIGURATION, f"backup-{kind}-replica-encryption")
        assert (
            sse.inputs["rules"][0]["applyServerSideEncryptionByDefault"]["kmsMasterKeyId"] == replica_key.state["arn"]
        )

        config = run.one(tok.S3_BUCKET_REPLICATION_CONFIG, f"backup-{kind}-replication")
        assert config.inputs["bucket"] == run.outputs[f"{kind}_bucket"]
        assert config.inputs["role"] == role.state["arn"]
        (rule,) = config.inputs["rules"]
        assert rule["status"] == "Enabled"
        assert rule["deleteMarkerReplication"] == {"status": "Disabled"}  # a primary delete leaves the replica whole
        assert rule["sourceSelectionCriteria"] == {"sseKmsEncryptedObjects": {"status": "Enabled"}}
        dest = rule["destination"]
        assert dest["bucket"] == f"arn:aws:s3:::{name}" and dest["storageClass"] == REPLICA_STORAGE_CLASS
        assert dest["encryptionConfiguration"] == {"replicaKmsKeyId": replica_key.state["arn"]}
    assert "datasets_replica_bucket" not in run.outputs


def test_replication_role_reads_sources_writes_replicas_and_nothing_else(run_stack) -> None:
    cfg, run = load_stack("prod"), run_stack("prod")
    policy = _doc(run.one(tok.IAM_ROLE_POLICY, "backup-replication-policy"))
    assert iam_document_violations(policy) == []
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert "s3:ReplicateDelete" not in actions and "s3:DeleteObject" not in actions
    decrypt = _statement(policy, "DecryptSourceViaS3")
    assert decrypt["Resource"] == run.outputs[out.KMS_KEY_ARN]
    assert decrypt["Condition"]["StringEquals"] == {"kms:ViaService": f"s3.{cfg.region}.amazonaws.com"}
    encrypt = _statement(policy, "EncryptReplicasViaS3")
    assert encrypt["Condition"]["StringEquals"] == {
        "kms:ViaService": f"s3.{cfg.protection.backup_replica_region}.amazonaws.com"
    }
    resources = {
        r for s in policy["Statement"] for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])
    }
    assert not any("datasets" in r for r in resources)


def test_dev_has_no_replica(run_stack) -> None:
    run = run_stack("dev")
    assert run.of_type(tok.S3_BUCKET_REPLICATION_CONFIG) == [] and out.MODELS_REPLICA_BUCKET not in run.outputs


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"backupReplicaRegion": ""}, "backupReplicaRegion"),
        ({"backupReplicaRegion": "us-east-1"}, "must differ from aws:region"),
        ({"backupReplicaRegion": "mars-1"}, "not an AWS region"),
        ({"auditLockMode": "GOVERNANCE"}, "must be COMPLIANCE when production"),
        ({"auditTrail": False}, "auditTrail"),
        ({"auditRetentionDays": 0}, "auditRetentionDays"),
    ],
)
def test_production_protection_is_not_optional(overrides: dict, complaint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_stack("prod", **overrides)
    assert complaint in str(err.value)
