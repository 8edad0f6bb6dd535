"""What `ops.preview` shows about people, audit and backup: who can do what (infra/teams.py) and what the audit trail
and the backup replicas add to the monthly bill (ops/cost.py lines)."""

from __future__ import annotations

from typing import Any

from infra.config import StackConfig

PROTECTION_ITEMS = ("CloudTrail", "S3 replica storage", "S3 replication transfer")
"""Cost items (by their first words) that exist because of the audit trail and the backup replicas."""
PROTECTION_RESOURCES = ("audit-", "backup-")
"""Logical-name prefixes of the Audit and Backup components' resources (their KMS keys included)."""


def people_report(cfg: StackConfig, cost: dict[str, Any]) -> dict[str, Any]:
    """The teams' rights and the added monthly cost of audit and backup, JSON-ready."""
    from infra.teams import describe  # late: pulumi_aws is already imported by the program run

    added = [
        row
        for row in cost["items"]
        if row["item"].startswith(PROTECTION_ITEMS) or row["resource"].startswith(PROTECTION_RESOURCES)
    ]
    return {
        "teams": describe(cfg.teams),
        "audit_and_backup_monthly": round(sum(r["idle_monthly"] for r in added), 2),
        "audit_and_backup_items": [f"{r['item']} ({r['resource']}): ${r['idle_monthly']:,.2f}" for r in added],
    }


def render(people: dict[str, Any]) -> str:
    lines = ["Who can do what (teams; cluster-wide admin is clusterAdminArns only):"]
    if not people["teams"]:
        lines.append("  no teams configured (llm-platform:teams)")
    for row in people["teams"]:
        lines.append(f"  {row['team']} [{row['access']}, {row['roles']} role(s)]")
        lines.append(f"      kubernetes: {row['kubernetes']}")
        lines.append(f"      s3: {row['s3']}; models are written only by the training role")
        lines.append(f"      sagemaker: {row['sagemaker']}")
    lines.append(
        f"Audit trail and backup add ${people['audit_and_backup_monthly']:,.2f}/month (in the estimate above):"
    )
    lines += [f"  - {item}" for item in people["audit_and_backup_items"]]
    return "\n".join(lines)
