"""One-time, account-level steps that must not be part of any environment stack's `pulumi up`.

    python -m ops.account activate-cost-allocation-tags [--dry-run]

Cost-allocation tag activation is account-wide, may only be done by the payer (management) account of an AWS
Organization, and works only for keys Billing has already seen on a resource (up to 24 hours after the first tagged
resource exists): as a resource in a stack it fails every first `up` (AWS Billing User Guide, "Activating
user-defined cost allocation tags"; Cost Explorer API, UpdateCostAllocationTagsStatus). Run it once per payer account
with the payer account's credentials, a day after the first stack is up (docs/first-deploy.md, step 9).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from facts.tags import STACK_TAG_KEYS

NOT_SEEN_HINT = (
    "Billing has not seen this key on a resource yet: it can be activated up to 24 hours after the first "
    "`pulumi up` of a stack; run this again then"
)
NOT_PAYER_HINT = (
    "only the payer (management) account of an AWS Organization may activate cost-allocation tags: run this with "
    "that account's credentials"
)


def activation_request(keys: tuple[str, ...] = STACK_TAG_KEYS) -> dict[str, Any]:
    """The UpdateCostAllocationTagsStatus request that activates the platform's tag keys."""
    return {"CostAllocationTagsStatus": [{"TagKey": key, "Status": "Active"} for key in keys]}


def activate(ce: Any, keys: tuple[str, ...] = STACK_TAG_KEYS) -> list[str]:
    """Activate `keys` with a Cost Explorer client; return one problem per key that could not be (empty: done)."""
    try:
        response = ce.update_cost_allocation_tags_status(**activation_request(keys))
    except ce.exceptions.ClientError as exc:
        code = exc.response["Error"]["Code"]
        if code in ("AccessDeniedException", "AccessDenied"):
            return [f"{code}: {NOT_PAYER_HINT}"]
        raise
    problems = []
    for error in response.get("Errors", []):
        hint = NOT_SEEN_HINT if "not found" in error.get("Message", "").lower() else error.get("Message", "")
        problems.append(f"{error['TagKey']}: {error.get('Code', 'error')}: {hint}")
    return problems


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr, ce: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.account", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    act = sub.add_parser("activate-cost-allocation-tags", help="activate the llm-platform:* tag keys (payer account)")
    act.add_argument("--dry-run", action="store_true", help="print the request, change nothing")
    args = parser.parse_args(argv)

    request = activation_request()
    if args.dry_run:
        keys = ", ".join(s["TagKey"] for s in request["CostAllocationTagsStatus"])
        print(f"would call ce:UpdateCostAllocationTagsStatus activating: {keys}", file=out)
        return 0
    if ce is None:
        import boto3

        ce = boto3.client("ce", region_name="us-east-1")  # Cost Explorer's API lives in us-east-1
    problems = activate(ce)
    for problem in problems:
        print(f"error: {problem}", file=err)
    if not problems:
        print(f"activated {len(STACK_TAG_KEYS)} cost-allocation tag keys", file=out)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
