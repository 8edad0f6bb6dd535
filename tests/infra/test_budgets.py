"""The stack's cost budget under the mock engine: amount, scope (the stack tag, in Budgets' filter syntax), alert
thresholds and subscribers per stack; cost-allocation tag activation only where config says (once per account)."""

from __future__ import annotations

from typing import Any

import pytest

from infra.budgets import Budgets, BudgetsArgs, stack_cost_filter
from infra.config import ConfigError, StackConfig
from infra.config import load_stack as config
from infra.mocks import Run, run_program
from infra.tags import STACK_TAG, STACK_TAG_KEYS, stack_tags

BUDGET = "aws:budgets/budget:Budget"
COST_TAG = "aws:costexplorer/costAllocationTag:CostAllocationTag"


def run_budgets(cfg: StackConfig) -> Run:
    def program() -> dict[str, Any]:
        budgets = Budgets("budgets", BudgetsArgs(cfg, stack_tags(cfg.stack, cfg.environment)))
        return {"budget": budgets.budget_name}

    return run_program(program, {}, cfg.stack, cfg.project, cfg.region)


@pytest.fixture(params=("dev", "staging", "prod"))
def stack(request: pytest.FixtureRequest) -> tuple[StackConfig, Run]:
    cfg = config(request.param)
    return cfg, run_budgets(cfg)


def test_monthly_cost_budget_scoped_to_the_stack(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    budget = run.one(BUDGET).inputs
    assert run.outputs["budget"] == budget["name"] == f"{cfg.name_prefix}-monthly"
    assert (budget["budgetType"], budget["timeUnit"], budget["limitUnit"]) == ("COST", "MONTHLY", "USD")
    assert float(budget["limitAmount"]) == cfg.budget.monthly_usd
    # Budgets' tag filter: user-defined tags are `user:<key>`, and key and value are joined by `$`.
    assert budget["costFilters"] == [{"name": "TagKeyValue", "values": [f"user:llm-platform:stack${cfg.stack}"]}]
    assert stack_cost_filter(cfg.stack)["values"][0] == f"user:{STACK_TAG}${stack_tags(cfg.stack, 'x')[STACK_TAG]}"
    assert budget["tags"] == stack_tags(cfg.stack, cfg.environment)


def test_alerts_before_the_money_is_gone(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    notes = {(n["notificationType"], n["threshold"]): n for n in run.one(BUDGET).inputs["notifications"]}
    assert set(notes) == {("ACTUAL", 80), ("FORECASTED", 100)}
    for note in notes.values():
        assert note["thresholdType"] == "PERCENTAGE" and note["comparisonOperator"] == "GREATER_THAN"
        assert note["subscriberEmailAddresses"] == list(cfg.observability.alert_emails)


def test_cost_allocation_tags_activated_once_per_account(stack: tuple[StackConfig, Run]) -> None:
    cfg, run = stack
    activated = sorted(r.inputs["tagKey"] for r in run.of_type(COST_TAG))
    if cfg.budget.activate_cost_allocation_tags:
        assert activated == sorted(STACK_TAG_KEYS)
        assert all(r.inputs["status"] == "Active" for r in run.of_type(COST_TAG))
        assert all(f"{COST_TAG}::{r.name}" in run.one(BUDGET).depends_on for r in run.of_type(COST_TAG))
    else:
        assert activated == []
    # The shipped stacks share one account: exactly one of them activates the tags.
    assert sum(config(s).budget.activate_cost_allocation_tags for s in ("dev", "staging", "prod")) == 1


def test_no_subscribers_means_no_notifications() -> None:
    run = run_budgets(config("dev", alertEmails=[]))
    assert "notifications" not in run.one(BUDGET).inputs or not run.one(BUDGET).inputs["notifications"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"monthlyBudgetUsd": 0}, "llm-platform:monthlyBudgetUsd = 0: must be at least 1"),
        ({"alertEmails": ["ops"]}, "llm-platform:alertEmails contains 'ops': not an e-mail address"),
    ],
)
def test_config_rules(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config("dev", **overrides)
