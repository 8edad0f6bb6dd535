"""Spend: a monthly AWS Budgets cost budget per stack, scoped by the stack tag every resource carries, with alerts
before the money is gone (80% actual) and when the month is heading over (100% forecast).

Activating the platform's tag keys as cost-allocation tags (without which the budget's tag filter matches nothing) is
not done here: it is account-wide, only the payer account of an AWS Organization may do it, and Billing must have
seen the keys first (up to 24 hours after the first tagged resource), so it would fail any first `pulumi up`. It is a
one-time step per payer account: `python -m ops.account activate-cost-allocation-tags` (ops/account.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from facts.tags import STACK_TAG
from infra.config import BudgetConfig

NOTIFICATIONS = (
    # (notification type, threshold %): actual spend crossing 80% leaves a fifth of the month's money to react;
    # the forecast crossing 100% catches a GPU pool left at its maximum early in the month.
    ("ACTUAL", 80),
    ("FORECASTED", 100),
)


def stack_cost_filter(stack: str) -> dict[str, Any]:
    """Budgets' TagKeyValue filter: `user:<tag key>$<tag value>` (user-defined tags carry the `user:` prefix)."""
    return {"name": "TagKeyValue", "values": [f"user:{STACK_TAG}${stack}"]}


@dataclass
class BudgetsArgs:
    budget: BudgetConfig
    """The monthly amount."""
    alert_emails: Sequence[str]
    """Who is told at the thresholds (alertEmails); none: the budget still shows in the console."""
    name_prefix: str
    """Prefix of the budget's name."""
    stack: str
    """The stack whose tagged costs count."""
    tags: dict[str, str]
    """Stack tags (the budget is tagged like everything else; its filter keys on the stack tag)."""


class Budgets(pulumi.ComponentResource):
    """The stack's monthly cost budget, filtered on its stack tag, with e-mail notifications at forecast and actual
    thresholds."""

    budget_name: pulumi.Output[str]
    """The budget's name (AWS Budgets console, Cost Explorer)."""

    def __init__(self, name: str, args: BudgetsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Budgets", name, None, opts)
        emails = list(args.alert_emails)
        budget = aws.budgets.Budget(
            f"{name}-monthly",
            name=f"{args.name_prefix}-monthly",
            budget_type="COST",
            limit_amount=f"{args.budget.monthly_usd}.0",
            limit_unit="USD",
            time_unit="MONTHLY",
            cost_filters=[aws.budgets.BudgetCostFilterArgs(**stack_cost_filter(args.stack))],
            # Amortized, credits and refunds left out: what the stack consumes, not what credits cover or RI upfronts.
            cost_types=aws.budgets.BudgetCostTypesArgs(include_credit=False, include_refund=False, use_amortized=True),
            # A notification must have a subscriber; with no alert e-mails configured the budget still shows in
            # the console and Cost Explorer.
            notifications=[
                aws.budgets.BudgetNotificationArgs(
                    notification_type=kind,
                    threshold=threshold,
                    threshold_type="PERCENTAGE",
                    comparison_operator="GREATER_THAN",
                    subscriber_email_addresses=emails,
                )
                for kind, threshold in NOTIFICATIONS
            ]
            if emails
            else None,
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.budget_name = budget.name
        self.register_outputs({"budget_name": self.budget_name})
