"""The cost estimate prices the audit trail and the backup replicas with their own lines, not as ordinary buckets."""

from __future__ import annotations

import pytest

from facts import pulumi_types as tok
from ops import cost


def _bucket(name: str, data: str) -> dict:
    return {"type": tok.S3_BUCKET, "name": name, "inputs": {"tags": {"llm-platform:data": data}}}


def test_trail_and_replicas_have_their_own_lines() -> None:
    table = cost.price_table()
    p, a = table["regions"]["us-east-1"], table["assumptions"]
    resources = [
        _bucket("storage-models", "models"),
        _bucket("backup-models-replica", "models-replica"),
        _bucket("audit-bucket", "audit"),
        {
            "type": tok.CLOUDTRAIL_TRAIL,
            "name": "audit-trail",
            "inputs": {"eventSelectors": [{"dataResources": [{"type": "AWS::S3::Object", "values": ["arn:x/"]}]}]},
        },
    ]
    rows = {(r["resource"], r["item"].split(" (")[0]): r for r in cost.estimate(resources, "us-east-1")["items"]}
    gb = a["s3_gb_per_bucket"]
    assert rows[("storage-models", "S3 storage")]["idle_monthly"] == pytest.approx(gb * p["s3_standard_gb_month"])
    replica = rows[("backup-models-replica", "S3 replica storage, Standard-IA")]
    assert replica["idle_monthly"] == pytest.approx(gb * p["s3_standard_ia_gb_month"])
    transfer = rows[("backup-models-replica", "S3 replication transfer")]
    assert transfer["idle_monthly"] == pytest.approx(gb * p["s3_inter_region_transfer_gb"])
    logs = rows[("audit-bucket", "CloudTrail log storage")]
    assert logs["quantity_idle"] == a["cloudtrail_log_gb_month"]
    events = rows[("audit-trail", "CloudTrail S3 data events")]
    assert events["idle_monthly"] == pytest.approx(
        a["cloudtrail_data_events_month"] / 1e5 * p["cloudtrail_data_events_100k"]
    )
    assert ("backup-models-replica", "S3 storage") not in rows


def test_a_trail_of_management_events_only_adds_no_data_event_line() -> None:
    # auditS3DataEvents false (dev): the account's first copy of management events is free.
    trail = {"type": tok.CLOUDTRAIL_TRAIL, "name": "audit-trail", "inputs": {"eventSelectors": [{"dataResources": []}]}}
    assert not [i for i in cost.estimate([trail], "us-east-1")["items"] if i["resource"] == "audit-trail"]


def test_preview_shows_who_can_do_what_and_the_added_cost() -> None:
    import contextlib
    import io

    from ops.preview import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["prod"]) == 0
    text = out.getvalue()
    assert "ml-research [ml-engineer, 1 role(s)]" in text
    assert "Jobs create/delete, pods and logs read in llm-training; View in llm-serving" in text
    assert "auditors [viewer" in text and "s3: list only" in text
    added = next(line for line in text.splitlines() if line.startswith("Audit trail and backup add $"))
    assert float(added.split("$")[1].split("/")[0].replace(",", "")) > 0
    assert "CloudTrail S3 data events" in text and "S3 replica storage" in text
