"""Spend: a monthly AWS Budgets cost budget per stack, scoped by the stack tag every resource carries, with alerts
before the money is gone (80% actual) and when the month is heading over (100% forecast); and, once per account,
activation of the platform's tag keys as cost-allocation tags (without it, Budgets and Cost Explorer cannot filter
on them at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.config import StackConfig
from infra.tags import STACK_TAG, STACK_TAG_KEYS

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
    config: StackConfig
    """Validated stack config: budget amount, alert e-mails, whether this stack activates the cost-allocation tags."""
    tags: dict[str, str]
    """Stack tags (the budget is tagged like everything else; its filter keys on the stack tag)."""


class Budgets(pulumi.ComponentResource):
    budget_name: pulumi.Output[str]

    def __init__(self, name: str, args: BudgetsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Budgets", name, None, opts)
        cfg = args.config
        child = pulumi.ResourceOptions(parent=self)
        activations = []
        if cfg.budget.activate_cost_allocation_tags:
            # Account-wide state: exactly one stack per account sets activateCostAllocationTags. A key can only be
            # activated after AWS has seen it on a resource (up to 24 h after the first `pulumi up`).
            for i, key in enumerate(STACK_TAG_KEYS):
                activations.append(
                    aws.costexplorer.CostAllocationTag(f"{name}-tag-{i}", tag_key=key, status="Active", opts=child)
                )
        emails = list(cfg.observability.alert_emails)
        budget = aws.budgets.Budget(
            f"{name}-monthly",
            name=f"{cfg.name_prefix}-monthly",
            budget_type="COST",
            limit_amount=f"{cfg.budget.monthly_usd}.0",
            limit_unit="USD",
            time_unit="MONTHLY",
            cost_filters=[aws.budgets.BudgetCostFilterArgs(**stack_cost_filter(cfg.stack))],
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
            opts=pulumi.ResourceOptions(parent=self, depends_on=activations),
        )
        self.budget_name = budget.name
        self.register_outputs({"budget_name": self.budget_name})
