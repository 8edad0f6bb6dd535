"""The scheduling contract: every workload the project defines can be placed on a pool the Cluster Autoscaler can
grow, in every shipped stack. `can_schedule` is checked on its own first (each rule can say no), then applied to the
serving Deployment recorded from the whole program and to the training Job that `ops/training_k8s_job.py` renders from
the stack's outputs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from facts import pulumi_types as tok
from facts.cluster import GPU_TAINT
from infra.charts import CHART_TYPE, CHARTS
from infra.config import StackConfig, load_config, load_stack_file
from infra.gpu_plugins import PLUGIN_RESOURCES
from ops.mocks import Run
from ops.training_k8s_job import TrainingJobSpec, render_training_job
from tests.helpers import chart_records
from tests.infra.scheduling import (
    EFA_RESOURCE,
    GPU_RESOURCE,
    can_schedule,
    chart_pod_spec,
    pod_requests,
    pool_capacity,
    quantity,
)

DEPLOYMENT = tok.K8S_DEPLOYMENT
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}


def pool(**overrides: Any) -> dict[str, Any]:
    base = {
        "name": "inference",
        "instance_types": ["g6.xlarge", "g6.2xlarge"],
        "capacity_type": "SPOT",
        "max_size": 2,
        "labels": {"llm-platform/pool": "inference", "llm-platform/purpose": "inference"},
        "taints": [dict(GPU_TAINT)],
        "efa": False,
    }
    return {**base, **overrides}


def gpu_pod(**overrides: Any) -> dict[str, Any]:
    spec = {
        "nodeSelector": {"llm-platform/pool": "inference"},
        "tolerations": [dict(GPU_TOLERATION)],
        "containers": [
            {
                "name": "server",
                "image": "x",
                "resources": {"requests": {"cpu": "2", "memory": "8Gi", GPU_RESOURCE: "1"}},
            }
        ],
    }
    spec.update(overrides)
    return spec


# -- the rules -----------------------------------------------------------------------------------------------------


def test_a_matching_pod_schedules() -> None:
    assert can_schedule(gpu_pod(), [pool()]) == (True, "inference")


def test_toleration_forms() -> None:
    exists = gpu_pod(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    assert can_schedule(exists, [pool()])[0]
    tolerate_all = gpu_pod(tolerations=[{"operator": "Exists"}])
    assert can_schedule(tolerate_all, [pool()])[0]
    wrong_value = gpu_pod(tolerations=[{**GPU_TOLERATION, "value": "yes"}])
    ok, why = can_schedule(wrong_value, [pool()])
    assert not ok and "not tolerated" in why


def test_untolerated_taint_is_refused() -> None:
    ok, why = can_schedule(gpu_pod(tolerations=[]), [pool()])
    assert not ok
    assert why == "inference: taint nvidia.com/gpu=true:NoSchedule not tolerated"


def test_node_selector_must_match_pool_labels() -> None:
    ok, why = can_schedule(gpu_pod(nodeSelector={"llm-platform/pool": "gpu"}), [pool()])
    assert not ok and "nodeSelector llm-platform/pool=gpu" in why
    # Well-known labels nodes carry count too.
    on_demand_only = gpu_pod(nodeSelector={"eks.amazonaws.com/capacityType": "ON_DEMAND"})
    assert not can_schedule(on_demand_only, [pool()])[0]
    assert can_schedule(on_demand_only, [pool(capacity_type="ON_DEMAND")])[0]


def test_required_node_affinity() -> None:
    def affinity(*exprs: dict[str, Any]) -> dict[str, Any]:
        return {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": list(exprs)}]
                }
            }
        }

    in_types = affinity({"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["g6.xlarge"]})
    # The pool may launch g6.2xlarge too, which the pod refuses: the ASG could hand CA a node the pod can't use.
    ok, why = can_schedule(gpu_pod(affinity=in_types), [pool()])
    assert not ok and "g6.2xlarge" in why
    assert can_schedule(gpu_pod(affinity=in_types), [pool(instance_types=["g6.xlarge"])])[0]
    not_training = affinity({"key": "llm-platform/purpose", "operator": "NotIn", "values": ["training"]})
    assert can_schedule(gpu_pod(affinity=not_training), [pool()])[0]
    needs_missing = affinity({"key": "example.com/missing", "operator": "Exists"})
    assert not can_schedule(gpu_pod(affinity=needs_missing), [pool()])[0]


def test_requests_must_fit_every_instance_type() -> None:
    two_gpus = gpu_pod()
    two_gpus["containers"][0]["resources"]["requests"][GPU_RESOURCE] = "2"
    ok, why = can_schedule(two_gpus, [pool()])
    assert not ok and "nvidia.com/gpu=2" in why
    # 14 GiB fits nothing: a g6.xlarge has 16 GiB of which the kubelet and DaemonSets keep ~2.5 GiB.
    big = gpu_pod()
    big["containers"][0]["resources"]["requests"]["memory"] = "14Gi"
    ok, why = can_schedule(big, [pool()])
    assert not ok and "memory" in why and "g6.xlarge" in why
    assert can_schedule(big, [pool(instance_types=["g6.2xlarge"])])[0]
    # CPU: all 4 vCPUs of a g6.xlarge are never allocatable.
    cpu = gpu_pod()
    cpu["containers"][0]["resources"]["requests"]["cpu"] = "4"
    assert not can_schedule(cpu, [pool()])[0]


def test_limits_count_as_requests_and_init_containers_take_the_max() -> None:
    spec = gpu_pod()
    spec["containers"][0]["resources"] = {"limits": {GPU_RESOURCE: "1", "cpu": "1"}}
    spec["initContainers"] = [{"name": "fetch", "image": "x", "resources": {"requests": {"cpu": "3"}}}]
    assert pod_requests(spec) == {GPU_RESOURCE: 1.0, "cpu": 3.0}
    assert quantity("500m") == 0.5 and quantity("2Gi") == 2 * 2**30 and quantity(3) == 3.0


def test_pool_at_zero_max_cannot_grow() -> None:
    ok, why = can_schedule(gpu_pod(), [pool(max_size=0)])
    assert not ok and why == "inference: max size is 0"


def test_extended_resources_need_a_device_plugin() -> None:
    efa_pod = gpu_pod(nodeSelector={})
    efa_pod["containers"][0]["resources"]["requests"][EFA_RESOURCE] = "1"
    efa_pool = pool(instance_types=["g6e.12xlarge"], efa=True)
    ok, why = can_schedule(efa_pod, [efa_pool])
    assert not ok and "no device plugin" in why
    assert can_schedule(efa_pod, [efa_pool], advertised=(GPU_RESOURCE, EFA_RESOURCE))[0]
    # ...and the node must actually have an EFA interface.
    assert not can_schedule(efa_pod, [pool(instance_types=["g6e.12xlarge"])], advertised=(GPU_RESOURCE, EFA_RESOURCE))[
        0
    ]


def test_first_fitting_pool_wins_and_every_refusal_is_explained() -> None:
    training = pool(name="training", labels={"llm-platform/pool": "training", "llm-platform/purpose": "training"})
    assert can_schedule(gpu_pod(), [training, pool()]) == (True, "inference")
    ok, why = can_schedule(gpu_pod(tolerations=[]), [training, pool()])
    assert not ok and why.count("not tolerated") == 2 and "training:" in why and "inference:" in why


def test_pool_capacity() -> None:
    assert pool_capacity(gpu_pod(), pool()) == 2
    two_per_node = gpu_pod()
    two_per_node["containers"][0]["resources"]["requests"] = {"cpu": "1", GPU_RESOURCE: "1"}
    assert pool_capacity(two_per_node, pool(instance_types=["g6e.12xlarge"], max_size=3)) == 12


# -- the project's workloads in every shipped stack ----------------------------------------------------------------


def serving_pod(run: Run) -> dict[str, Any] | None:
    deployments = [r for r in run.of_type(DEPLOYMENT) if r.parent == "serving-eks"]
    if not deployments:
        return None
    (deployment,) = deployments
    return deployment.inputs["spec"]["template"]["spec"]


def test_serving_deployment_schedules_in_every_stack(
    shipped: tuple[StackConfig, Run], run_stack: Callable[..., Run]
) -> None:
    cfg, run = shipped
    spec = serving_pod(run)
    if spec is None:
        # Not serving on EKS (yet): prove its pool would take the Deployment once servingOnEks and an image are set.
        assert not cfg.serving.eks_declared
        spec = serving_pod(
            run_stack(
                cfg.stack,
                {
                    "llm-platform:servingOnEks": True,
                    "llm-platform:servingImageTag": "0.1.0",
                    "llm-platform:servingImageDigest": "sha256:" + "0" * 64,  # production stacks serve by digest
                },
            )
        )
    assert spec is not None
    ok, where = can_schedule(spec, cfg.cluster.gpu_pools)
    assert ok, f"{cfg.stack}: the serving Deployment fits no pool: {where}"
    assert where == "inference"
    # Within the pool's limits: every replica the autoscaler may ask for has a place.
    capacity = pool_capacity(spec, cfg.cluster.pool("inference"))
    assert cfg.serving.max_replicas <= capacity, (
        f"{cfg.stack}: {cfg.serving.max_replicas} replicas, room for {capacity}"
    )


def training_job_pod(cfg: StackConfig, run: Run, nodes: int) -> dict[str, Any]:
    spec = TrainingJobSpec(name="contract", nodes=nodes, data="datasets/contract")
    objects = render_training_job(spec, copy.deepcopy(run.outputs))
    (job,) = [o for o in objects if o["kind"] == "Job"]
    return job["spec"]["template"]["spec"]


def advertised(run: Run) -> tuple[str, ...]:
    """Extended resources that the device plugin charts this stack actually installs advertise."""
    charts = {r.inputs["chart"] for r in run.of_type(CHART_TYPE)}
    return tuple(resource for key, resource in PLUGIN_RESOURCES.items() if CHARTS[key].chart in charts)


def plugin_pod(run: Run, key: str) -> dict[str, Any]:
    (rec,) = chart_records(run, key)
    return chart_pod_spec(key, rec.inputs["values"])


def test_device_plugins_run_on_exactly_the_pools_that_need_them(shipped: tuple[StackConfig, Run]) -> None:
    """Tolerations for the GPU taint and affinity to the pools, as the charts get them: the NVIDIA plugin lands on
    every GPU pool, the EFA plugin on every EFA pool, neither anywhere else (the system pool)."""
    cfg, run = shipped
    system = {
        "name": "system",
        "instance_types": ["g6.xlarge"],
        "max_size": 2,
        "labels": {"llm-platform/pool": "system"},
    }
    nvidia = plugin_pod(run, "nvidia-device-plugin")
    for pool in cfg.cluster.gpu_pools:
        assert can_schedule(nvidia, [pool]) == (True, pool.name)
    assert not can_schedule(nvidia, [system])[0]
    efa_pools = [p for p in cfg.cluster.gpu_pools if p.efa]
    assert (EFA_RESOURCE in advertised(run)) is bool(efa_pools)
    if efa_pools:
        efa = plugin_pod(run, "aws-efa-k8s-device-plugin")
        for pool in cfg.cluster.gpu_pools:
            assert can_schedule(efa, [pool])[0] is pool.efa, pool.name
        assert not can_schedule(efa, [system])[0]


def test_training_job_schedules_in_every_stack(shipped: tuple[StackConfig, Run]) -> None:
    cfg, run = shipped
    pool = cfg.cluster.pool("training")
    spec = training_job_pod(cfg, run, nodes=pool.max_size)
    ok, where = can_schedule(spec, cfg.cluster.gpu_pools, advertised=advertised(run))
    assert ok, f"{cfg.stack}: the training Job fits no pool: {where}"
    assert where == "training"
    # A job over every node the pool may have still fits; a job one node bigger cannot.
    assert pool_capacity(spec, pool) == pool.max_size


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_efa_jobs_need_the_efa_device_plugin(run_stack: Callable[..., Run], stack: str) -> None:
    """Without the EFA plugin, a Job asking for vpc.amazonaws.com/efa would stay Pending forever. By default it asks
    for every EFA device of the node (p5: 32), which the pool's nodes - and the autoscaler's template - offer."""
    run = run_stack(stack)
    values, source = load_stack_file(stack)
    cfg = load_config(values, stack, source)
    pool = cfg.cluster.pool("training")
    spec = training_job_pod(cfg, run, nodes=1)
    assert EFA_RESOURCE in advertised(run)
    assert pod_requests(spec)[EFA_RESOURCE] == pool.efa_interfaces_per_node
    assert can_schedule(spec, cfg.cluster.gpu_pools, advertised=advertised(run)) == (True, "training")
    assert not can_schedule(spec, cfg.cluster.gpu_pools, advertised=(GPU_RESOURCE,))[0]
    # One device more than the node has never fits.
    for kind in ("limits", "requests"):
        spec["containers"][0]["resources"][kind][EFA_RESOURCE] = str(pool.efa_interfaces_per_node + 1)
    assert not can_schedule(spec, cfg.cluster.gpu_pools, advertised=advertised(run))[0]


def test_controllers_run_on_the_system_pool_and_plugins_on_the_gpu_pools(shipped: tuple[StackConfig, Run]) -> None:
    """Every chart's pods land somewhere the cluster has nodes: controllers on the fixed system pool (never on a GPU
    node the autoscaler may remove), node agents on the GPU pools they serve."""
    cfg, run = shipped
    system = {
        "name": "system",
        "instance_types": ["g6.xlarge"],
        "max_size": 2,
        "labels": {"llm-platform/pool": "system"},
    }
    by_chart = {pinned.chart: key for key, pinned in CHARTS.items()}
    node_agents = {"nvidia-device-plugin", "aws-efa-k8s-device-plugin", "dcgm-exporter"}
    for rec in run.of_type(CHART_TYPE):
        key = by_chart[rec.inputs["chart"]]
        spec = chart_pod_spec(key, rec.inputs["values"])
        if key in node_agents:
            assert not can_schedule(spec, [system])[0], key
            assert any(can_schedule(spec, [p])[0] for p in cfg.cluster.gpu_pools), key
        else:
            assert spec.get("nodeSelector") == {"llm-platform/pool": "system"}, key
            assert can_schedule(spec, [system]) == (True, "system"), key
            assert not any(can_schedule(spec, [p])[0] for p in cfg.cluster.gpu_pools), key


def test_namespace_gpu_quotas_admit_every_pod_the_autoscaler_may_place(shipped: tuple[StackConfig, Run]) -> None:
    """A pod over its namespace's GPU quota is refused at admission, before the autoscaler ever sees it."""
    cfg, run = shipped
    quotas = {
        r.inputs["metadata"]["namespace"]: quantity(r.inputs["spec"]["hard"][f"requests.{GPU_RESOURCE}"])
        for r in run.of_type(tok.K8S_RESOURCE_QUOTA)
    }
    serving = serving_pod(run)
    if serving is not None:
        demand = cfg.serving.max_replicas * pod_requests(serving)[GPU_RESOURCE]
        assert demand <= quotas["llm-serving"], f"{cfg.stack}: serving may need {demand} GPUs"
    pool = cfg.cluster.pool("training")
    training = training_job_pod(cfg, run, nodes=pool.max_size)
    demand = pool.max_size * pod_requests(training)[GPU_RESOURCE]
    assert demand <= quotas["llm-training"], f"{cfg.stack}: a full-pool training job needs {demand} GPUs"
