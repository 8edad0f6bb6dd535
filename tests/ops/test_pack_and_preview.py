"""The pulumi-policy wrappers run the same rules; `ops.preview` shows verdicts and exits 3 on mandatory ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pulumi_policy import (
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from facts import pulumi_types as tok
from ops import preview
from policy import pack
from policy.rules import RULES, Res, StackContext, evaluate
from tests.helpers import REPO_ROOT, STACKS_DIR

OPTS = PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])


def by_name(name: str, kind: type) -> object:
    return next(p for p in pack.policies() if p.name == name and isinstance(p, kind))


def test_every_rule_becomes_a_policy_at_its_level() -> None:
    policies = pack.policies()
    assert {p.name for p in policies} == {r.name for r in RULES}
    assert not (REPO_ROOT / "policy" / "__main__.py").read_text().count("def ")  # only builds the pack


def test_resource_policy_reports_through_pulumi_policy() -> None:
    reported: list[tuple[str, str | None]] = []
    args = ResourceValidationArgs(
        tok.EKS_CLUSTER, {"vpcConfig": {"endpointPublicAccess": True}}, "urn:x", "cluster-eks", OPTS, None
    )
    by_name("eks-endpoint-not-public", ResourceValidationPolicy).validate(
        args, lambda m, u=None: reported.append((m, u))
    )
    assert reported and "cluster-eks" in reported[0][0]


def test_stack_policy_uses_policy_config_for_the_budget() -> None:
    props = {
        "instanceTypes": ["p5.48xlarge"],
        "scalingConfig": {"minSize": 0, "maxSize": 2, "desiredSize": 0},
        "taints": [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}],
    }
    group = PolicyResource(tok.EKS_NODE_GROUP, props, "urn:ng", "training", OPTS, None, None, [], {})
    reported: list[tuple[str, str | None]] = []
    policy = by_name("gpu-budget", StackValidationPolicy)
    policy.validate(StackValidationArgs([group], {"maxGpus": 8}), lambda m, u=None: reported.append((m, u)))
    assert reported and reported[0][1] == "urn:ng" and "16 GPUs" in reported[0][0]


def test_pack_reads_the_stack_config_from_pulumi_config(monkeypatch: pytest.MonkeyPatch) -> None:
    values = yaml.safe_load((STACKS_DIR / "Pulumi.prod.yaml").read_text())["config"]
    env = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(env))
    monkeypatch.setenv("PULUMI_STACK", "prod")
    pack.stack_context_from_env.cache_clear()
    try:
        assert pack.stack_context_from_env() == StackContext(stack="prod", production=True, max_gpus=40)
        assert pack.context_for({"maxGpus": 8}).max_gpus == 8
    finally:
        pack.stack_context_from_env.cache_clear()


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_shipped_stacks_pass_every_mandatory_rule(stack: str) -> None:
    report, _ = preview.preview(stack)
    failures = [v["message"] for r in report["policy"]["rules"] if r["level"] == "mandatory" for v in r["violations"]]
    assert failures == []
    assert report["policy"]["passed"]
    assert report["cost"]["idle_monthly"] > 0 and report["cost"]["peak_monthly"] >= report["cost"]["idle_monthly"]


def test_preview_exits_3_on_a_mandatory_violation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Config validation already rejects what it can (open API CIDRs, unprotected prod data, over-budget GPUs), so
    the bad resource is injected next to the real program's: an untainted GPU node group."""
    bad_stack = tmp_path / "Pulumi.dev.yaml"
    bad_stack.write_text((STACKS_DIR / "Pulumi.dev.yaml").read_text())
    rogue = Res(tok.EKS_NODE_GROUP, "rogue-gpus", {"instanceTypes": ["g6.xlarge"], "taints": []})
    monkeypatch.setattr(preview, "evaluate", lambda resources, ctx: evaluate([*resources, rogue], ctx))
    assert preview.main(["dev", "--config-file", str(bad_stack), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    rule = next(r for r in report["policy"]["rules"] if r["name"] == "gpu-node-groups-tainted")
    assert rule["status"] == "fail" and "rogue-gpus" in rule["violations"][0]["message"]
    assert not report["policy"]["passed"]


def test_advisory_only_verdicts_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    values = yaml.safe_load((STACKS_DIR / "Pulumi.prod.yaml").read_text())
    values["config"]["llm-platform:natGateways"] = "single"  # allowed by config, advised against by policy
    stack_file = tmp_path / "Pulumi.prod.yaml"
    stack_file.write_text(yaml.safe_dump(values))
    assert preview.main(["prod", "--config-file", str(stack_file)]) == 0
    out = capsys.readouterr().out
    assert "single-nat-in-production" in out and "Policy: PASSED" in out and "idle $" in out


SHIPPED = sorted(p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in STACKS_DIR.glob("Pulumi.*.yaml"))


@pytest.mark.parametrize("stack", SHIPPED)
def test_every_shipped_stack_passes_its_first_run(stack: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m ops.preview STACK --first-run`: both layers against an empty account (no images, models, secrets or
    cluster) pass every preview-time check and mandatory policy, so the runbook's first `pulumi up` can start."""
    assert preview.main([stack, "--first-run", "--json"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert set(report["layers"]) == {"aws", "cluster"}
    assert any(r.startswith("aws:eks/cluster:Cluster::") for r in report["layers"]["aws"])
    assert not any(r.startswith("kubernetes:") for r in report["layers"]["aws"])


def test_first_run_is_an_empty_account_and_fails_a_stack_that_names_unpushed_artifacts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = yaml.safe_load((STACKS_DIR / "Pulumi.prod.yaml").read_text())["config"]
    values["llm-platform:servingImageTag"] = "1.0.0"
    values["llm-platform:servingImageDigest"] = "sha256:" + "a" * 64
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump({"config": values}))
    assert preview.main(["prod", "--config-file", str(path), "--json"]) == 0  # a later run: everything is there
    capsys.readouterr()
    assert preview.main(["prod", "--config-file", str(path), "--first-run"]) == 2
    err = capsys.readouterr().err
    assert "no image llmp-prod/serving:1.0.0 in ECR" in err and "Traceback" not in err


@pytest.mark.parametrize("stack", SHIPPED)
def test_no_stack_file_names_an_image_before_its_first_deploy(stack: str) -> None:
    """The runbook's order: the first `up` creates the repository and bucket, then images are pushed and their tag and
    digests set. A shipped stack file with a tag or digest could not pass its own first run."""
    config = yaml.safe_load((STACKS_DIR / f"Pulumi.{stack}.yaml").read_text())["config"]
    for key in ("servingImageTag", "servingImageDigest", "trainingImageDigest"):
        assert not config.get(f"llm-platform:{key}"), f"{stack}: {key}"
