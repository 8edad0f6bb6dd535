"""Storage component: KMS key and the three data buckets, locked down."""

from __future__ import annotations

import json

from facts import pulumi_types as tok
from infra.storage import BUCKET_KINDS


def _for_bucket(run, typ: str, bucket: str):
    found = [r for r in run.of_type(typ) if r.inputs.get("bucket") == bucket]
    assert len(found) == 1, (typ, bucket, found)
    return found[0]


def test_key_rotates_and_is_scoped(shipped) -> None:
    cfg, run = shipped
    key = run.one(tok.KMS_KEY, "storage-key")
    assert key.inputs["enableKeyRotation"] is True
    policy = json.loads(key.inputs["policy"])
    logs = next(s for s in policy["Statement"] if s["Sid"] == "CloudWatchLogsEncrypt")
    assert logs["Principal"] == {"Service": f"logs.{cfg.region}.amazonaws.com"}
    assert "ArnLike" in logs["Condition"]
    assert key.protect == cfg.storage.protect_data


def test_every_bucket_is_encrypted_private_versioned_and_tls_only(shipped) -> None:
    cfg, run = shipped
    buckets = [b for b in run.of_type(tok.S3_BUCKET) if b.parent == "storage"]  # audit and backup: their own tests
    assert sorted(b.name for b in buckets) == sorted(f"storage-{k}" for k in BUCKET_KINDS)
    for bucket in buckets:
        name = bucket.inputs["bucket"]
        assert name.startswith(f"llmp-{cfg.stack}-") and len(name) <= 63
        sse = _for_bucket(run, tok.S3_BUCKET_SERVER_SIDE_ENCRYPTION_CONFIGURATION, name)
        rule = sse.inputs["rules"][0]
        assert rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "aws:kms"
        assert rule["applyServerSideEncryptionByDefault"]["kmsMasterKeyId"] == run.outputs["kms_key_arn"]
        pab = _for_bucket(run, tok.S3_BUCKET_PUBLIC_ACCESS_BLOCK, name)
        assert all(
            pab.inputs[k] is True
            for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
        )
        versioning = _for_bucket(run, tok.S3_BUCKET_VERSIONING, name)
        assert versioning.inputs["versioningConfiguration"]["status"] == "Enabled"
        policy = json.loads(_for_bucket(run, tok.S3_BUCKET_POLICY, name).inputs["policy"])
        deny = policy["Statement"][0]
        assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        assert f"arn:aws:s3:::{name}/*" in deny["Resource"]
        ownership = _for_bucket(run, tok.S3_BUCKET_OWNERSHIP_CONTROLS, name)
        assert ownership.inputs["rule"]["objectOwnership"] == "BucketOwnerEnforced"


def test_lifecycle_aborts_uploads_and_expires_old_checkpoints(shipped) -> None:
    cfg, run = shipped
    checkpoints = run.outputs["checkpoints_bucket"]
    rules = _for_bucket(run, tok.S3_BUCKET_LIFECYCLE_CONFIGURATION, checkpoints)
    by_id = {r["id"]: r for r in rules.inputs["rules"]}
    assert by_id["abort-incomplete-multipart-uploads"]["abortIncompleteMultipartUpload"]["daysAfterInitiation"] == 3
    expiry = by_id["expire-noncurrent-versions"]["noncurrentVersionExpiration"]["noncurrentDays"]
    assert expiry == cfg.storage.checkpoint_noncurrent_days


def test_force_destroy_and_protection_follow_config(run_stack) -> None:
    dev = [b for b in run_stack("dev").of_type(tok.S3_BUCKET) if b.parent == "storage"]
    prod = [b for b in run_stack("prod").of_type(tok.S3_BUCKET) if b.parent == "storage"]
    assert all(b.inputs["forceDestroy"] is True and not b.protect for b in dev)
    assert all(b.inputs["forceDestroy"] is False and b.protect and b.retain_on_delete for b in prod)
