"""Regions without prices, misspelled instance types and placeholder values: each is said plainly, never a
traceback or a silent $0.00."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pulumi
import pytest
import yaml
from pulumi.runtime import config as runtime_config

from infra import preflight
from infra.config import ConfigError, load_stack, load_stack_file
from ops import cost
from ops import preview as preview_cli


def _stack_file(tmp_path: Path, **changes: object) -> Path:
    values, _ = load_stack_file("dev")
    values.update({(k if ":" in k else f"llm-platform:{k}"): v for k, v in changes.items()})
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump({"config": values}))
    return path


def _preview(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = preview_cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_a_region_without_prices_previews_with_cost_unknown_and_how_to_add_it(tmp_path: Path) -> None:
    est = cost.estimate([], "eu-central-1")
    assert est["idle_monthly"] is None and est["peak_monthly"] is None
    assert est["unknown"].startswith("unknown for eu-central-1")
    code, out, err = _preview("dev", "--config-file", str(_stack_file(tmp_path, **{"aws:region": "eu-central-1"})))
    assert code == 0, err
    assert "unknown for eu-central-1" in out and "ops/prices.json" in out and "Traceback" not in err


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("systemInstanceType", "t3.larg", "did you mean t3.large"),
        ("sagemakerInstanceType", "ml.g5.xlargee", "did you mean ml.g5.xlarge"),
    ],
)
def test_an_instance_type_the_api_does_not_know_is_a_config_error_naming_the_key(
    tmp_path: Path, key: str, value: str, hint: str
) -> None:
    with pytest.raises(ConfigError, match=rf"llm-platform:{key} = '{value}'.*{hint}"):
        load_stack("dev", **{key: value})
    code, _, err = _preview("dev", "--config-file", str(_stack_file(tmp_path, **{key: value})))
    assert code == 2 and f"llm-platform:{key}" in err and hint in err and "Traceback" not in err
    assert load_stack("dev", systemInstanceType="m7g.large").cluster.system_instance_type == "m7g.large"


def test_the_shipped_stack_files_placeholders_are_found() -> None:
    values, _ = load_stack_file("dev")
    found = preflight.placeholders(values)
    assert any(f.startswith("llm-platform:clusterAdminArns") and "123456789012" in f for f in found)
    assert any(f.startswith("llm-platform:deployerRepository") and "example-org" in f for f in found)
    own = {**values, "llm-platform:clusterAdminArns": ["arn:aws:iam::210987654321:role/admins"]}
    assert not any("clusterAdminArns" in f for f in preflight.placeholders(own))


@pytest.mark.parametrize("dry_run", [True, False])
def test_placeholders_warn_in_a_preview_and_are_refused_by_up(monkeypatch: pytest.MonkeyPatch, dry_run: bool) -> None:
    values, _ = load_stack_file("dev")
    monkeypatch.setattr(runtime_config, "get_config_env", lambda: {k: str(v) for k, v in values.items()})
    monkeypatch.setattr(runtime_config, "CONFIG", SimpleNamespace(get=dict))
    monkeypatch.setattr(pulumi.runtime, "is_dry_run", lambda: dry_run)
    monkeypatch.setattr(preflight, "_mock_account", lambda: None)  # the real engine
    warnings: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **k: warnings.append(msg))
    cfg = load_stack("dev")
    if dry_run:
        preflight.check_placeholders(cfg)
        assert warnings and "123456789012" in warnings[0]
    else:
        with pytest.raises(preflight.PreflightError, match="placeholders: replace them"):
            preflight.check_placeholders(cfg)
