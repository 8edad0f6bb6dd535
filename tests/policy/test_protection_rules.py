"""The production audit-trail and replication rules fire on a production stack without them (or with a weakened
trail) and stay quiet on the shipped production stack."""

from __future__ import annotations

import pytest

from facts import pulumi_types as tok
from infra.config import load_stack
from ops.preview import preview
from policy.rules import RULES_BY_NAME, Res, StackContext, resources_from_report

PROD = StackContext(stack="prod", production=True, max_gpus=40)
DEV = StackContext(stack="dev", production=False, max_gpus=4)


def messages(rule: str, resources: list[Res], ctx: StackContext = PROD) -> list[str]:
    return [f.message for f in RULES_BY_NAME[rule].check(resources, ctx)]


@pytest.fixture(scope="module")
def prod_inventory() -> list[Res]:
    report, _ = preview("prod")
    return resources_from_report(report)


def _replace(inventory: list[Res], typ: str, name: str, **props) -> list[Res]:
    return [
        Res(r.type, r.name, {**r.props, **props}, r.protect) if (r.type, r.name) == (typ, name) else r
        for r in inventory
    ]


def test_shipped_prod_passes(prod_inventory: list[Res]) -> None:
    assert messages("production-audit-trail", prod_inventory) == []
    assert messages("production-replication", prod_inventory) == []


def test_prod_without_a_trail_fails(prod_inventory: list[Res]) -> None:
    without = [r for r in prod_inventory if r.type != tok.CLOUDTRAIL_TRAIL]
    [msg] = messages("production-audit-trail", without)
    assert "auditTrail" in msg
    assert messages("production-audit-trail", without, DEV) == []  # dev may go without


def test_trail_without_validation_or_key_or_compliance_lock_fails(prod_inventory: list[Res]) -> None:
    [msg] = messages(
        "production-audit-trail",
        _replace(prod_inventory, tok.CLOUDTRAIL_TRAIL, "audit-trail", enableLogFileValidation=False),
    )
    assert "validate log files" in msg
    [msg] = messages(
        "production-audit-trail", _replace(prod_inventory, tok.CLOUDTRAIL_TRAIL, "audit-trail", kmsKeyId=None)
    )
    assert "KMS" in msg
    governance = _replace(
        prod_inventory,
        tok.S3_BUCKET_OBJECT_LOCK_CONFIGURATION,
        "audit-object-lock",
        rule={"defaultRetention": {"mode": "GOVERNANCE", "days": 365}},
    )
    [msg] = messages("production-audit-trail", governance)
    assert "COMPLIANCE" in msg
    unlocked = [r for r in prod_inventory if r.type != tok.S3_BUCKET_OBJECT_LOCK_CONFIGURATION]
    [msg] = messages("production-audit-trail", unlocked)
    assert "Object Lock" in msg


def test_prod_without_replication_fails_per_bucket(prod_inventory: list[Res]) -> None:
    without = [r for r in prod_inventory if r.type != tok.S3_BUCKET_REPLICATION_CONFIG]
    found = messages("production-replication", without)
    assert len(found) == 2 and all("backupReplicaRegion" in m for m in found)
    assert any("models" in m for m in found) and any("checkpoints" in m for m in found)


def test_config_and_policy_agree_on_production() -> None:
    # The config refuses what the rules would fail: a production stack file cannot even get to the policy.
    cfg = load_stack("prod")
    assert cfg.protection.audit_trail and cfg.protection.backup_replica_region
