"""Cost estimate from recorded resources, and the PR-comment comparison of two preview reports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from facts import pulumi_types as tok
from facts.instance_types import GPU_INSTANCE_TYPES
from ops import cost, preview
from ops.compare import compare_markdown


@pytest.fixture(scope="module")
def dev_report() -> dict:
    report, _ = preview.preview("dev")
    return json.loads(json.dumps(report, default=str))


def test_price_table_names_its_source_and_covers_every_gpu_type() -> None:
    table = cost.price_table()
    assert table["source"] and table["recorded"] and table["hours_per_month"] == 730
    for region in ("us-east-1", "us-west-2", "eu-west-1"):
        prices = table["regions"][region]
        assert set(GPU_INSTANCE_TYPES) <= set(prices["ec2_hour"])
        assert {"t3.large", "m7i.large", "m7i.xlarge"} <= set(prices["ec2_hour"])


def test_node_groups_cost_at_min_and_max() -> None:
    group = {
        "type": tok.EKS_NODE_GROUP,
        "name": "gpu",
        "inputs": {"instanceTypes": ["g6.xlarge"], "scalingConfig": {"minSize": 1.0, "maxSize": 3.0}},
    }
    est = cost.estimate([group], "us-east-1")
    # g6.xlarge on demand in us-east-1: $0.8048/h, 730 h a month; one node idle, three at peak.
    assert est["idle_monthly"] == pytest.approx(587.50, abs=0.01)
    assert est["peak_monthly"] == pytest.approx(1762.51, abs=0.01)
    spot = copy.deepcopy(group)
    spot["inputs"]["capacityType"] = "SPOT"
    spot_idle = cost.estimate([spot], "us-east-1")["idle_monthly"]
    assert spot_idle < est["idle_monthly"]
    assert spot_idle == pytest.approx(234.99, abs=0.01)  # the recorded 60% spot discount: $0.3219/h


def test_sagemaker_uses_autoscaling_bounds() -> None:
    resources = [
        {
            "type": tok.SAGEMAKER_ENDPOINT_CONFIGURATION,
            "name": "sm",
            "inputs": {"productionVariants": [{"variantName": "main", "instanceType": "ml.g5.xlarge",
                                               "initialInstanceCount": 1.0}]},
        },
        {
            "type": tok.APPAUTOSCALING_TARGET,
            "name": "sm-target",
            "inputs": {"resourceId": "endpoint/llmp-dev/variant/main", "minCapacity": 1.0, "maxCapacity": 4.0},
        },
    ]  # fmt: skip
    est = cost.estimate(resources, "us-east-1")
    assert est["peak_monthly"] == pytest.approx(est["idle_monthly"] * 4, abs=0.05)
    # ml.g5.xlarge hosting in us-east-1: $1.408/h x 730 h, one instance idle, four at peak.
    assert est["idle_monthly"] == pytest.approx(1027.84, abs=0.01)
    assert est["peak_monthly"] == pytest.approx(4111.36, abs=0.01)


def test_dev_estimate_lists_items_and_assumptions(dev_report: dict) -> None:
    c = dev_report["cost"]
    items = {i["item"].split(" ")[0] for i in c["items"]}
    assert {"EKS", "NAT", "node", "KMS", "flow-log", "S3"} <= items
    assert "interface" not in items  # dev: interfaceEndpoints false (tests/ops/test_dev_idle_cost.py)
    assert any(i["assumption"] for i in c["items"]) and c["assumptions"] and "Recorded" in c["price_source"]
    assert 0 < c["idle_monthly"] < c["peak_monthly"]


def test_compare_reports_changes_policy_and_cost(dev_report: dict) -> None:
    head = copy.deepcopy(dev_report)
    resources = head["resources"]
    group = next(r for r in resources if r["type"] == tok.EKS_NODE_GROUP and r["name"].endswith("inference"))
    group["inputs"]["scalingConfig"]["maxSize"] = 4.0
    removed = next(r for r in resources if r["type"] == tok.EC2_VPC_ENDPOINT and r["name"] == "network-s3")
    resources.remove(removed)
    resources.append({"type": tok.EC2_NAT_GATEWAY, "name": "network-nat-1", "parent": None,
                      "inputs": {}, "protect": False, "retain_on_delete": False, "depends_on": []})  # fmt: skip
    head["cost"] = cost.estimate(resources, "us-east-1")
    head["policy"] = copy.deepcopy(head["policy"])
    rule = next(r for r in head["policy"]["rules"] if r["name"] == "gpu-node-groups-tainted")
    rule["violations"].append({"rule": rule["name"], "level": "mandatory", "resource_type": group["type"],
                               "resource_name": group["name"], "message": "untainted"})  # fmt: skip
    head["policy"]["passed"] = False

    md = compare_markdown(dev_report, head)
    assert md.startswith("### `dev`")
    assert "dev: +1 ~1 -1 resources" in md
    old = json.dumps(dev_report_group(dev_report, group["name"])["inputs"]["scalingConfig"], separators=(",", ":"),
                     sort_keys=True)  # fmt: skip
    new = json.dumps(group["inputs"]["scalingConfig"], separators=(",", ":"), sort_keys=True)
    assert f"| ~ | `aws:eks/nodeGroup:NodeGroup` | `{group['name']}` | `scalingConfig`: `{old}` → `{new}` |" in md
    assert '"maxSize":2' in old and '"maxSize":4.0' in new
    assert f"| - | `aws:ec2/vpcEndpoint:VpcEndpoint` | `{removed['name']}` |" in md
    assert "| + | `aws:ec2/natGateway:NatGateway` | `network-nat-1` |" in md
    assert "1 new mandatory violation(s)" in md and "| new | mandatory | `gpu-node-groups-tainted`" in md
    # Stated, not recomputed: the S3 gateway endpoint is free, a NAT gateway is $0.045/h x 730 h = $32.85 idle and
    # peak; two more spot g6.xlarge at peak add 2 x 730 h x $0.3219/h (the item rounds to cents: $469.98).
    assert "(+$32.85/mo), peak" in md and "(+$502.83/mo)**" in md
    assert "**Monthly cost delta**" in md
    assert "| `network-nat-1` | NAT gateway | +$32.85 | +$32.85 |" in md
    assert "| `cluster-inference` | node group g6.xlarge spot | +$0.00 | +$469.98 |" in md
    assert "| **total** | | **+$32.85** | **+$502.83** |" in md
    # ...and the other way round, the same amounts go negative.
    back = compare_markdown(head, dev_report)
    assert "(-$32.85/mo), peak" in back and "(-$502.83/mo)**" in back


def dev_report_group(report: dict, name: str) -> dict:
    return next(r for r in report["resources"] if r["type"] == tok.EKS_NODE_GROUP and r["name"] == name)


def test_compare_cli_usage_errors_and_a_different_stack(dev_report: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ops.compare", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    proc = run("a", "b")  # used to print nothing and exit 0
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read a") and "Traceback" not in proc.stderr
    assert run().returncode == 2 and "usage: python -m ops.compare" in run().stderr
    (tmp_path / "x.json").write_text("{}")
    proc = run(str(tmp_path / "x.json"), str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "not an `ops.preview STACK --json` report" in proc.stderr
    base, head = tmp_path / "dev.json", tmp_path / "staging.json"
    base.write_text(json.dumps(dev_report))
    head.write_text(json.dumps({**dev_report, "stack": "staging"}))
    proc = run(str(base), str(head))
    assert proc.returncode == 0 and "**Warning:** comparing stack `staging` against a base report of stack `dev`" in (
        proc.stdout
    )
    assert "Warning" not in run(str(base), str(base)).stdout
    unpriced = {**dev_report, "cost": cost.estimate([], "eu-central-1")}
    assert f"idle ${dev_report['cost']['idle_monthly']:,.2f} → unknown" in compare_markdown(dev_report, unpriced)


def test_compare_cli_against_itself(dev_report: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.json"
    base.write_text(json.dumps(dev_report))
    assert preview.main(["dev", "--compare", str(base)]) == 0
    out = capsys.readouterr().out
    assert "dev: +0 ~0 -0 resources, policy: no new violations" in out and "(+$0.00/mo)" in out
