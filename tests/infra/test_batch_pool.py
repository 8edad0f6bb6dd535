"""The CPU batch pool (data preparation): a managed node group from zero, tainted so only batch pods land on it, with
the Cluster Autoscaler's node-template tags that let it start a node for a pending batch pod while the group has
none; its config keys are validated by name; an idle pool adds nothing to the idle cost."""

from __future__ import annotations

from typing import Any

import pytest

from facts import pulumi_types as tok
from facts.cluster import BATCH_POOL, BATCH_TAINT, POOL_LABEL, SYSTEM_POOL
from infra import outputs as out
from infra.cluster import SYSTEM_AMI_TYPE
from infra.cluster_autoscaler import batch_node_template_tags, max_nodes_total
from infra.config import ConfigError, load_config, load_stack_file
from ops import cost

P = "llm-platform:"
TEMPLATE = "k8s.io/cluster-autoscaler/node-template"


def _config(stack: str = "dev", **overrides: Any):
    values, source = load_stack_file(stack)
    values.update({P + k: v for k, v in overrides.items()})
    return load_config(values, stack, source)


def test_batch_node_group_scales_from_zero_tainted_and_labelled(shipped) -> None:
    cfg, run = shipped
    pool = cfg.cluster.batch_pool
    ng = run.one(tok.EKS_NODE_GROUP, f"cluster-{BATCH_POOL}").inputs
    assert ng["scalingConfig"] == {"minSize": 0, "desiredSize": 0, "maxSize": pool.max_size}
    assert ng["labels"] == {POOL_LABEL: BATCH_POOL}
    assert ng["taints"] == [{"key": BATCH_TAINT["key"], "value": BATCH_TAINT["value"], "effect": "NO_SCHEDULE"}]
    assert ng["instanceTypes"] == list(pool.instance_types) and ng["amiType"] == SYSTEM_AMI_TYPE
    assert ng["capacityType"] == pool.capacity_type
    # Spot by default in dev only (the stack files decide; prod and staging keep on-demand).
    assert (pool.capacity_type == "SPOT") is (cfg.stack == "dev")
    assert run.outputs[out.BATCH_POOL] == pool.describe()


def test_autoscaler_knows_the_empty_batch_group_by_its_template_tags(shipped) -> None:
    cfg, run = shipped
    asg = f"eks-{cfg.name_prefix}-{BATCH_POOL}-asg"  # the mocks' ASG name for the group (infra/cluster_autoscaler.py)
    on_group = {
        t.inputs["tag"]["key"]: t.inputs["tag"]
        for t in run.of_type(tok.AUTOSCALING_TAG)
        if t.inputs["autoscalingGroupName"] == asg
    }
    assert {k: v["value"] for k, v in on_group.items()} == {
        f"{TEMPLATE}/label/{POOL_LABEL}": BATCH_POOL,
        f"{TEMPLATE}/taint/{BATCH_TAINT['key']}": f"{BATCH_TAINT['value']}:{BATCH_TAINT['effect']}",
    }
    assert on_group == {
        k: {"key": k, "value": v, "propagateAtLaunch": False}
        for k, v in batch_node_template_tags(cfg.cluster.batch_pool).items()
    }
    # CA may reach the batch pool's maximum on top of the system and GPU pools.
    c = cfg.cluster
    assert max_nodes_total(c) == c.system_node_count + sum(p.max_size for p in c.gpu_pools) + c.batch_pool.max_size


def test_nothing_but_batch_pods_lands_there_and_the_system_pool_stays_untainted(shipped) -> None:
    _, run = shipped
    groups = {r.inputs["labels"][POOL_LABEL]: r.inputs for r in run.of_type(tok.EKS_NODE_GROUP)}
    assert not groups[SYSTEM_POOL].get("taints")
    others = {t["key"] for name, g in groups.items() if name != BATCH_POOL for t in g.get("taints") or []}
    assert BATCH_TAINT["key"] not in others


def test_an_idle_batch_pool_costs_nothing_and_its_maximum_is_priced(run_stack) -> None:
    run = run_stack("dev")
    report = cost.estimate([{"type": r.type, "name": r.name, "inputs": r.inputs} for r in run.resources], "us-east-1")
    (item,) = [i for i in report["items"] if i["resource"] == f"cluster-{BATCH_POOL}"]
    assert item["idle_monthly"] == 0
    assert item["peak_monthly"] > 0, "m7i.xlarge has a recorded price"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batchInstanceTypes": ["g6e.xlarge"]}, "batchInstanceTypes = ('g6e.xlarge',): g6e.xlarge: accelerated"),
        ({"batchInstanceTypes": ["m7g.xlarge"]}, "batchInstanceTypes = ('m7g.xlarge',): m7g.xlarge: Graviton"),
        ({"batchInstanceTypes": ["m7i.huge"]}, "batchInstanceTypes = ('m7i.huge',): 'm7i.huge' is not an instance"),
        ({"batchInstanceTypes": []}, "batchInstanceTypes = (): must list at least one CPU instance type"),
        ({"batchCapacityType": "spot"}, "batchCapacityType = 'spot': must be one of ON_DEMAND, SPOT"),
        ({"batchMaxSize": 0}, "batchMaxSize = 0: must be at least 1"),
        ({"batchNodeDiskGb": 10}, "batchNodeDiskGb = 10: must be between 20 and 16384"),
    ],
)
def test_bad_batch_keys_are_named(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _config(**overrides)
    assert f"{P}{message}" in str(exc.value)


def test_a_stack_can_size_its_batch_pool() -> None:
    pool = _config(batchInstanceTypes=["c7i.xlarge"], batchCapacityType="ON_DEMAND", batchMaxSize=10).cluster.batch_pool
    assert (pool.instance_types, pool.capacity_type, pool.max_size, pool.min_size) == (
        ("c7i.xlarge",),
        "ON_DEMAND",
        10,
        0,
    )
