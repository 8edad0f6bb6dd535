"""Dev idles under $150 without changing prod or staging: no interface endpoints (the NAT carries that traffic, at a
per-GB price the preview shows), system nodes sized from the system pods' requests and on spot, one NAT, an audit
trail of management events only. The preview lists what dev saves against prod's shape and what it gives up."""

from __future__ import annotations

from typing import Any

import pytest

from infra.config import load_stack
from ops import cost
from ops.preview import preview

BEFORE = 311.72
"""The dev estimate before this change (2 x t3.large system nodes, 5 interface endpoints x 2 zones)."""


@pytest.fixture(scope="module")
def dev_report() -> dict[str, Any]:
    report, _ = preview("dev")
    return report


def test_dev_idles_at_less_than_before_and_says_what_it_gives_up(dev_report: dict[str, Any]) -> None:
    idle = dev_report["cost"]["idle_monthly"]
    assert idle < 150 < BEFORE  # the goal; the preview says $140.26
    items = {i["item"] for i in dev_report["cost"]["items"]}
    assert not any(i.startswith("interface endpoint") for i in items)
    assert sum(i.startswith("NAT gateway") for i in items) == 1
    saved = {r["what"].split(" (")[0]: r for r in dev_report["tradeoffs"]}
    assert saved["no interface endpoints"]["saves"] == pytest.approx(73.0)
    assert "$0.045/GB" in saved["no interface endpoints"]["gives_up"]
    assert saved["one NAT gateway, not one per zone"]["saves"] == pytest.approx(32.85)
    assert saved["system nodes 2 x t3a.medium"]["saves"] == pytest.approx(3 * 730 * 0.2016 - 2 * 730 * 0.0376, abs=0.01)
    assert saved["system nodes on spot"]["saves"] == pytest.approx(2 * 730 * 0.0376 * 0.6, abs=0.01)
    assert "reclaimed" in saved["system nodes on spot"]["gives_up"]
    assert saved["audit trail without S3 data events"]["saves"] == pytest.approx(10.0)
    system = next(r for r in dev_report["resources"] if r["name"] == "cluster-system")
    assert system["inputs"]["capacityType"] == "SPOT"


def test_prod_and_staging_shapes_are_unchanged() -> None:
    for stack in ("prod", "staging"):
        cfg = load_stack(stack)
        assert cfg.network.interface_endpoints is True
        assert cfg.network.nat_gateways == "perAz"
    assert load_stack("prod").cluster.system_instance_type == "m7i.xlarge"
    assert {load_stack(s).cluster.system_capacity_type for s in ("prod", "staging")} == {"ON_DEMAND"}
    assert all(load_stack(s).protection.audit_s3_data_events for s in ("prod", "staging"))
    assert cost.tradeoffs(load_stack("prod"), load_stack("prod")) == []


def test_dev_system_nodes_hold_the_system_pods_requests_with_one_node_lost(dev_report: dict[str, Any]) -> None:
    """The requests the charts set (the rest set none), all on one t3a.medium (4 GiB, ~3.3 GiB allocatable)."""

    def requests(x: Any) -> list[dict[str, str]]:
        if isinstance(x, dict):
            found = [x["requests"]] if isinstance(x.get("requests"), dict) and "memory" in x["requests"] else []
            return found + [r for k, v in x.items() if k != "requests" for r in requests(v)]
        return [r for v in x for r in requests(v)] if isinstance(x, list) else []

    system_charts = [r for r in dev_report["resources"] if r["name"] in ("cluster-autoscaler-chart",
                                                                        "observability-prometheus")]  # fmt: skip
    mib = sum(
        int(req["memory"].removesuffix("Mi")) if req["memory"].endswith("Mi") else int(req["memory"][:-2]) * 1024
        for r in system_charts
        for req in requests(r["inputs"])
    )
    assert mib == 600 + 1024
    assert mib + 2 * 70 < 3.3 * 1024  # plus CoreDNS's two replicas
