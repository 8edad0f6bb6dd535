"""`datasets-written-only-under-prepared`: no workload or controller role changes the raw datasets; data
preparation's write under `prepared/` is the one allowed, and the shipped stacks pass it."""

from __future__ import annotations

import json

import pytest

from facts import pulumi_types as tok
from policy.rules import RULES_BY_NAME, Res, StackContext

CTX = StackContext(stack="dev", production=False, max_gpus=4)
DATASETS = "arn:aws:s3:::llmp-dev-datasets-123456789012-us-east-1"
RULE = RULES_BY_NAME["datasets-written-only-under-prepared"]


def role_policy(*statements: dict) -> Res:
    doc = {"Version": "2012-10-17", "Statement": list(statements)}
    return Res(tok.IAM_ROLE_POLICY, "identity-x-policy", {"role": "llmp-dev-x", "policy": json.dumps(doc)})


def messages(*resources: Res) -> list[str]:
    return [f.message for f in RULE.check(list(resources), CTX)]


def allow(actions: list[str], resource: str | list[str]) -> dict:
    return {"Sid": "S", "Effect": "Allow", "Action": actions, "Resource": resource}


def test_preparation_writes_under_prepared_and_reads_anywhere() -> None:
    assert messages(role_policy(allow(["s3:PutObject", "s3:DeleteObject"], f"{DATASETS}/prepared/*"))) == []
    assert messages(role_policy(allow(["s3:GetObject"], f"{DATASETS}/*"), allow(["s3:ListBucket"], DATASETS))) == []
    # Other buckets are other rules' business (the trainer writes checkpoints and models).
    assert messages(role_policy(allow(["s3:PutObject"], "arn:aws:s3:::llmp-dev-checkpoints-1-us-east-1/*"))) == []


@pytest.mark.parametrize(
    ("actions", "resource"),
    [
        (["s3:PutObject"], f"{DATASETS}/*"),
        (["s3:DeleteObjectVersion"], f"{DATASETS}/corpora/*"),
        (["s3:Put*"], f"{DATASETS}/*"),
        (["s3:*"], [f"{DATASETS}/prepared/*", f"{DATASETS}/*"]),
        (["*"], "*"),
    ],
)
def test_any_other_write_to_the_datasets_bucket_is_refused(actions: list[str], resource: str | list[str]) -> None:
    (message,) = messages(role_policy(allow(actions, resource)))
    assert "identity-x-policy" in message and "prepared/*" in message


def test_deny_statements_and_team_policies_are_not_this_rules() -> None:
    deny = {"Sid": "D", "Effect": "Deny", "Action": ["s3:PutObject"], "Resource": f"{DATASETS}/*"}
    assert messages(role_policy(deny)) == []
    team = Res(tok.IAM_POLICY, "team-x", {"policy": json.dumps({"Statement": [allow(["s3:PutObject"], DATASETS)]})})
    assert messages(team) == []


def test_the_dev_stack_passes_with_its_preparation_roles() -> None:
    from ops.preview import preview

    _, run = preview("dev")
    resources = [Res(r.type, r.name, r.inputs) for r in run.resources]
    names = {r.name for r in resources if r.type == tok.IAM_ROLE_POLICY}
    assert {"identity-data-prepare-policy", "identity-sagemaker-prepare-policy"} <= names
    assert messages(*resources) == []
