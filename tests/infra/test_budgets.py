"""The stack's cost budget under the mock engine: amount, scope (the stack tag, in Budgets' filter syntax), alert
thresholds and subscribers per stack; cost-allocation tag activation is an account-level step (ops/account.py),
checked at the request level against the Cost Explorer API model."""

from __future__ import annotations

import io
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from facts import pulumi_types as tok
from facts.tags import STACK_TAG, STACK_TAG_KEYS, stack_tags
from infra.budgets import Budgets, BudgetsArgs, stack_cost_filter
from infra.config import ConfigError, StackConfig
from infra.config import load_stack as config
from ops.account import activation_request
from ops.account import main as account_main
from ops.mocks import Run
from tests.helpers import run_component

BUDGET = tok.BUDGETS_BUDGET
COST_TAG = tok.COSTEXPLORER_COST_ALLOCATION_TAG


def run_budgets(cfg: StackConfig) -> Run:
    def program() -> dict[str, Any]:
        args = BudgetsArgs(
            cfg.budget,
            cfg.observability.alert_emails,
            cfg.name_prefix,
            cfg.stack,
            stack_tags(cfg.stack, cfg.environment),
        )
        budgets = Budgets("budgets", args)
        return {"budget": budgets.budget_name}

    return run_component(cfg, program)


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


def test_no_stack_activates_cost_allocation_tags(stack: tuple[StackConfig, Run]) -> None:
    """Activation is account-level (payer account, keys seen by Billing first): never part of a stack's `up`."""
    _, run = stack
    assert run.of_type(COST_TAG) == []
    assert run.one(BUDGET).depends_on == []


def test_the_old_stack_key_says_where_activation_went() -> None:
    with pytest.raises(ConfigError, match=r"activateCostAllocationTags: no longer a stack setting; .*ops.account"):
        config("dev", activateCostAllocationTags=True)


def _ce_stub() -> tuple[Any, Stubber]:
    ce = boto3.client("ce", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    return ce, Stubber(ce)


def test_account_step_activates_every_stack_tag_key() -> None:
    """The request is checked against the Cost Explorer API model by botocore's Stubber."""
    ce, stub = _ce_stub()
    stub.add_response("update_cost_allocation_tags_status", {"Errors": []}, activation_request())
    out = io.StringIO()
    with stub:
        assert account_main(["activate-cost-allocation-tags"], out=out, ce=ce) == 0
    stub.assert_no_pending_responses()
    assert [s["TagKey"] for s in activation_request()["CostAllocationTagsStatus"]] == list(STACK_TAG_KEYS)
    assert "activated 4" in out.getvalue()


def test_account_step_explains_keys_billing_has_not_seen_and_non_payer_accounts() -> None:
    ce, stub = _ce_stub()
    stub.add_response(
        "update_cost_allocation_tags_status",
        {"Errors": [{"TagKey": STACK_TAG, "Code": "TagKeysNotFound", "Message": "Tag keys not found"}]},
        activation_request(),
    )
    stub.add_client_error("update_cost_allocation_tags_status", "AccessDeniedException", "not the payer")
    err = io.StringIO()
    with stub:
        assert account_main(["activate-cost-allocation-tags"], err=err, ce=ce) == 1
        assert account_main(["activate-cost-allocation-tags"], err=err, ce=ce) == 1
    assert "up to 24 hours after the first" in err.getvalue()
    assert "payer (management) account" in err.getvalue()


def test_account_step_dry_run_changes_nothing() -> None:
    out = io.StringIO()
    assert account_main(["activate-cost-allocation-tags", "--dry-run"], out=out, ce=object()) == 0
    assert "would call ce:UpdateCostAllocationTagsStatus" in out.getvalue()


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
