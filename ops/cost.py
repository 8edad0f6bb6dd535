"""Monthly cost estimate of a stack, computed from the resources the program declares (as recorded by the mock engine).

Two totals: idle (every scalable thing at its minimum: node groups at min size, SageMaker variants at their
autoscaling minimum) and peak (everything at its maximum). Fixed hourly items (EKS control plane, NAT gateways,
interface endpoints) count in both; usage-based items (flow-log ingestion, S3 storage) are baselines whose quantities
are assumptions, listed as such. Prices come from `ops/prices.json` (source and recording date inside).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from facts import pulumi_types as tok
from policy.rules import as_list, one_block

PRICES_FILE = Path(__file__).resolve().parent / "prices.json"


@cache
def price_table() -> dict[str, Any]:
    return json.loads(PRICES_FILE.read_text())


@dataclass
class Item:
    item: str
    resource: str
    unit: str
    unit_price: float | None
    quantity_idle: float
    quantity_peak: float
    assumption: bool = False
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        price = self.unit_price or 0.0
        return {
            "item": self.item,
            "resource": self.resource,
            "unit": self.unit,
            "unit_price": self.unit_price,
            "quantity_idle": self.quantity_idle,
            "quantity_peak": self.quantity_peak,
            "idle_monthly": round(price * self.quantity_idle, 2),
            "peak_monthly": round(price * self.quantity_peak, 2),
            "assumption": self.assumption,
            "note": self.note,
        }


def _num(value: Any, default: float = 0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def how_to_add_region(region: str) -> str:
    return (
        f'to price it, add a {region!r} entry under "regions" in ops/{PRICES_FILE.name} (copy "us-east-1" and '
        'replace each price with that region\'s from the AWS pricing pages named in "source")'
    )


def unknown(region: str) -> dict[str, Any]:
    """The estimate for a region without recorded prices: no totals (None), and how to add the prices."""
    table = price_table()
    return {
        "currency": table["currency"],
        "region": region,
        "unknown": f"unknown for {region}: no prices recorded; {how_to_add_region(region)}",
        "idle_monthly": None,
        "peak_monthly": None,
        "items": [],
        "assumptions": [],
        "price_source": f"{table['source']} Recorded {table['recorded']}.",
    }


def estimate(resources: Iterable[Mapping[str, Any]], region: str) -> dict[str, Any]:
    """Cost of the report's resources (`[{"type", "name", "inputs", ...}]`) in `region`, as JSON-ready data.
    A region without recorded prices gets `unknown(region)`: totals None and the way to add them."""
    table = price_table()
    if region not in table["regions"]:
        return unknown(region)
    p = table["regions"][region]
    a = table["assumptions"]
    hours = table["hours_per_month"]
    resources = list(resources)
    by_type: dict[str, list[Mapping[str, Any]]] = {}
    for r in resources:
        by_type.setdefault(r["type"], []).append(r)
    items: list[Item] = []
    unpriced: list[str] = []

    for r in by_type.get(tok.EKS_CLUSTER, []):
        items.append(Item("EKS control plane", r["name"], "cluster-hour", p["eks_cluster_hour"], hours, hours))
    for r in by_type.get(tok.EC2_NAT_GATEWAY, []):
        items.append(Item("NAT gateway", r["name"], "gateway-hour", p["nat_gateway_hour"], hours, hours))
    for r in by_type.get(tok.EC2_VPC_ENDPOINT, []):
        inputs = r.get("inputs") or {}
        if inputs.get("vpcEndpointType") != "Interface":
            continue  # gateway endpoints (S3, DynamoDB) are free
        azs = max(len(as_list(inputs.get("subnetIds"))), 1)
        service = str(inputs.get("serviceName", "")).rsplit(".", 1)[-1]
        items.append(
            Item(
                f"interface endpoint {service} x{azs} AZ",
                r["name"],
                "endpoint-AZ-hour",
                p["interface_endpoint_az_hour"],
                azs * hours,
                azs * hours,
            )
        )

    for r in by_type.get(tok.EKS_NODE_GROUP, []):
        inputs = r.get("inputs") or {}
        scaling = one_block(inputs.get("scalingConfig"))
        types = as_list(inputs.get("instanceTypes")) or ["t3.medium"]  # EKS's default for managed node groups
        itype = str(types[0])
        spot = inputs.get("capacityType") == "SPOT"
        price = p["ec2_hour"].get(itype)
        label = f"node group {itype}{' spot' if spot else ''}"
        note = f"priced as the first of {', '.join(map(str, types))}" if len(types) > 1 else ""
        if price is None:
            unpriced.append(itype)
            note = "no price recorded"
        elif spot:
            price = round(price * (1 - a["spot_discount"]), 4)
        lo, hi = _num(scaling.get("minSize")), _num(scaling.get("maxSize"))
        items.append(Item(label, r["name"], "instance-hour", price, lo * hours, hi * hours, note=note))

    targets = by_type.get(tok.APPAUTOSCALING_TARGET, [])
    for r in by_type.get(tok.SAGEMAKER_ENDPOINT_CONFIGURATION, []):
        for variant in as_list((r.get("inputs") or {}).get("productionVariants")):
            if not isinstance(variant, Mapping):
                continue
            itype = str(variant.get("instanceType"))
            count = _num(variant.get("initialInstanceCount"), 1)
            lo = hi = count
            vname = variant.get("variantName")
            for t in targets:
                tin = t.get("inputs") or {}
                rid = str(tin.get("resourceId", ""))
                if rid.startswith("endpoint/") and (not vname or rid.endswith(f"/variant/{vname}")):
                    lo, hi = _num(tin.get("minCapacity"), lo), _num(tin.get("maxCapacity"), hi)
            price = p["sagemaker_hour"].get(itype)
            if price is None:
                unpriced.append(itype)
            items.append(Item(f"SageMaker endpoint {itype}", r["name"], "instance-hour", price, lo * hours, hi * hours))

    for r in by_type.get(tok.KMS_KEY, []):
        items.append(Item("KMS key", r["name"], "key-month", p["kms_key_month"], 1, 1))

    flow_gb = a["flow_log_gb_month"]
    for r in by_type.get(tok.EC2_FLOW_LOG, []):
        items.append(
            Item(
                f"flow-log ingestion (assumed {flow_gb} GB/month)",
                r["name"],
                "GB ingested",
                p["cloudwatch_logs_ingest_gb"],
                flow_gb,
                flow_gb,
                assumption=True,
            )
        )
    bucket_gb = a["s3_gb_per_bucket"]
    for r in by_type.get(tok.S3_BUCKET, []):
        if _protection_items(r, p, a, items):
            continue
        items.append(
            Item(
                f"S3 storage (assumed {bucket_gb} GB)",
                r["name"],
                "GB-month",
                p["s3_standard_gb_month"],
                bucket_gb,
                bucket_gb,
                assumption=True,
            )
        )

    events = a["cloudtrail_data_events_month"]
    for r in by_type.get(tok.CLOUDTRAIL_TRAIL, []):
        selectors = as_list((r.get("inputs") or {}).get("eventSelectors"))
        if not any(isinstance(sel, Mapping) and sel.get("dataResources") for sel in selectors):
            continue  # management events only: the first copy in an account is free
        items.append(
            Item(
                f"CloudTrail S3 data events (assumed {events / 1e6:g}M/month)",
                r["name"],
                "100k events",
                p["cloudtrail_data_events_100k"],
                events / 100_000,
                events / 100_000,
                assumption=True,
                note="management events: the first copy in an account is free",
            )
        )

    rows = [i.as_json() for i in items]
    assumptions = [
        f"{hours} hours per month; on-demand Linux list prices for {region}, no savings plans or reserved capacity",
        a["spot_discount_note"],
        f"flow logs ingest {flow_gb} GB/month each (CloudWatch Logs ${p['cloudwatch_logs_ingest_gb']}/GB); "
        "log storage and EKS control-plane logs not counted",
        f"each S3 bucket holds {bucket_gb} GB (S3 Standard ${p['s3_standard_gb_month']}/GB-month); "
        "requests not counted",
        f"NAT data processing (${p['nat_gateway_gb']}/GB), data transfer, EBS volumes and load balancers created by "
        "Kubernetes controllers are not counted",
        "node groups with several instance types are priced as their first type",
    ]
    if unpriced:
        assumptions.append(f"no price recorded (counted as $0): {', '.join(sorted(set(unpriced)))}")
    return {
        "currency": table["currency"],
        "region": region,
        "idle_monthly": round(sum(r["idle_monthly"] for r in rows), 2),
        "peak_monthly": round(sum(r["peak_monthly"] for r in rows), 2),
        "items": rows,
        "assumptions": assumptions,
        "price_source": f"{table['source']} Recorded {table['recorded']}.",
    }


def _protection_items(r: Mapping[str, Any], p: Mapping[str, Any], a: Mapping[str, Any], items: list[Item]) -> bool:
    """Cost lines of the audit trail's bucket and the backup replicas (infra/audit.py, infra/backup.py), by their
    `llm-platform:data` tag; False for any other bucket."""
    data = ((r.get("inputs") or {}).get("tags") or {}).get("llm-platform:data", "")
    gb = a["s3_gb_per_bucket"]
    if data.endswith("-replica"):
        # A replica holds what its primary holds (same assumed size), in Standard-IA, and every byte crosses regions
        # once: counted as one full copy a month.
        items.append(
            Item(
                f"S3 replica storage, Standard-IA (assumed {gb} GB)",
                r["name"],
                "GB-month",
                p["s3_standard_ia_gb_month"],
                gb,
                gb,
                assumption=True,
            )
        )
        items.append(
            Item(
                f"S3 replication transfer (assumed {gb} GB/month)",
                r["name"],
                "GB",
                p["s3_inter_region_transfer_gb"],
                gb,
                gb,
                assumption=True,
            )
        )
        return True
    if data == "audit":
        logs = a["cloudtrail_log_gb_month"]
        items.append(
            Item(
                f"CloudTrail log storage (assumed {logs} GB)",
                r["name"],
                "GB-month",
                p["s3_standard_gb_month"],
                logs,
                logs,
                assumption=True,
            )
        )
        return True
    return False


def render(cost: Mapping[str, Any]) -> str:
    """Human-readable cost table for `ops.preview`."""
    if cost.get("unknown"):
        return f"Estimated monthly cost ({cost['currency']}, {cost['region']}): {cost['unknown']}"
    lines = [
        f"Estimated monthly cost ({cost['currency']}, {cost['region']}): "
        f"idle ${cost['idle_monthly']:,.2f}, peak ${cost['peak_monthly']:,.2f}"
    ]
    for row in cost["items"]:
        price = "n/a" if row["unit_price"] is None else f"${row['unit_price']:g}/{row['unit']}"
        qty = f"{row['quantity_idle']:g}" + (
            "" if row["quantity_idle"] == row["quantity_peak"] else f"-{row['quantity_peak']:g}"
        )
        mark = " *" if row["assumption"] else ""
        lines.append(
            f"  {row['item'][:52]:<52} {row['resource'][:34]:<34} {qty:>11} x {price:<26} "
            f"idle ${row['idle_monthly']:>10,.2f}  peak ${row['peak_monthly']:>10,.2f}{mark}"
        )
    lines.append("  (* baseline whose quantity is an assumption) Assumptions:")
    lines += [f"    - {a}" for a in cost["assumptions"]]
    lines.append(f"  Prices: {cost['price_source']}")
    return "\n".join(lines)


def tradeoffs(cfg: Any, prod: Any) -> list[dict[str, Any]]:
    """What a stack saves against prod's shape (`prod`: the prod StackConfig) per month at idle, and what it gives up
    for it: interface endpoints, NAT gateways per zone, system nodes. Saving None: a price is not recorded."""
    table = price_table()
    p = table["regions"].get(cfg.region)
    if p is None or cfg.stack == prod.stack:
        return []
    hours = table["hours_per_month"]
    n, pn = cfg.network, prod.network
    rows = []
    if pn.interface_endpoints and not n.interface_endpoints:
        from infra.network import INTERFACE_ENDPOINT_SERVICES

        count = len(INTERFACE_ENDPOINT_SERVICES)
        rows.append(
            {
                "what": f"no interface endpoints ({count} services x {n.az_count} zones)",
                "saves": round(count * n.az_count * hours * p["interface_endpoint_az_hour"], 2),
                "gives_up": f"ECR, STS, EKS Auth and Logs traffic goes through the NAT at ${p['nat_gateway_gb']}/GB "
                f"processed (a 10 GB image pull: ${10 * p['nat_gateway_gb']:.2f}); private-only egress is not "
                "rehearsed",
            }
        )
    if pn.nat_gateways == "perAz" and n.nat_gateways == "single" and n.az_count > 1:
        rows.append(
            {
                "what": "one NAT gateway, not one per zone",
                "saves": round((n.az_count - 1) * hours * p["nat_gateway_hour"], 2),
                "gives_up": "egress of every zone depends on one zone's NAT",
            }
        )
    c, pc = cfg.cluster, prod.cluster
    if (c.system_instance_type, c.system_node_count) != (pc.system_instance_type, pc.system_node_count):
        ours, theirs = p["ec2_hour"].get(c.system_instance_type), p["ec2_hour"].get(pc.system_instance_type)
        saves = None
        if ours is not None and theirs is not None:
            saves = round(hours * (pc.system_node_count * theirs - c.system_node_count * ours), 2)
        rows.append(
            {
                "what": f"system nodes {c.system_node_count} x {c.system_instance_type} "
                f"(prod: {pc.system_node_count} x {pc.system_instance_type})",
                "saves": saves,
                "gives_up": "headroom for controllers under load (burstable CPU on t-types); fewer nodes to "
                "spread controllers over",
            }
        )
    a, pa = cfg.protection, prod.protection
    if a.audit_trail and not a.audit_s3_data_events and pa.audit_trail and pa.audit_s3_data_events:
        events = table["assumptions"]["cloudtrail_data_events_month"]
        rows.append(
            {
                "what": "audit trail without S3 data events (management events only)",
                "saves": round(events / 100_000 * p["cloudtrail_data_events_100k"], 2),
                "gives_up": "no record of who read, wrote or deleted which object in the datasets and models "
                "buckets (IAM, EKS and bucket-level changes are still recorded)",
            }
        )
    if c.system_capacity_type == "SPOT" and pc.system_capacity_type != "SPOT":
        ours = p["ec2_hour"].get(c.system_instance_type)
        discount = table["assumptions"]["spot_discount"]
        rows.append(
            {
                "what": f"system nodes on spot (prod: {pc.system_capacity_type.lower().replace('_', '-')})",
                "saves": None if ours is None else round(hours * c.system_node_count * ours * discount, 2),
                "gives_up": "a reclaimed system node (2-minute notice) moves CoreDNS and the controllers to the "
                "other node; if spot capacity for the type runs out, the group waits at one node",
            }
        )
    return rows


def render_tradeoffs(stack: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"What {stack} saves against prod's shape (per month, idle), and what it gives up for it:"]
    for r in rows:
        saves = "unknown" if r["saves"] is None else f"${r['saves']:,.2f}"
        lines.append(f"  - {r['what']}: saves {saves}; gives up: {r['gives_up']}")
    return "\n".join(lines)
