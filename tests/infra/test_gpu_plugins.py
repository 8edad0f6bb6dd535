"""Device plugins from their charts, per stack: pinned chart, and the values our contracts depend on - the GPU-taint
toleration, affinity to exactly the pools with the device, and what the EFA chart needs to advertise devices."""

from __future__ import annotations

from typing import Any

import pulumi_kubernetes as k8s
import pytest

from facts.cluster import GPU_TAINT, POOL_LABEL
from infra.charts import CHARTS
from infra.config import StackConfig
from infra.config import load_stack as config
from infra.gpu_plugins import GpuDevicePlugins, GpuDevicePluginsArgs
from ops.mocks import Recorded, Run
from tests.helpers import chart_records, run_component

_runs: dict[str, tuple[StackConfig, Run, tuple[str, ...]]] = {}


def run_plugins(cfg: StackConfig) -> tuple[Run, tuple[str, ...]]:
    advertised: list[tuple[str, ...]] = []

    def program() -> dict[str, Any]:
        plugins = GpuDevicePlugins(
            "gpu", GpuDevicePluginsArgs(cfg.cluster.gpu_pools, k8s.Provider("k8s", kubeconfig="{}"))
        )
        advertised.append(plugins.advertised)
        return {}

    return run_component(cfg, program), advertised[0]


@pytest.fixture(params=["dev", "staging", "prod"])
def stack(request: pytest.FixtureRequest) -> tuple[StackConfig, Run, tuple[str, ...]]:
    if request.param not in _runs:
        cfg = config(request.param)
        _runs[request.param] = (cfg, *run_plugins(cfg))
    return _runs[request.param]


def chart(run: Run, key: str) -> Recorded | None:
    found = chart_records(run, key)
    assert len(found) <= 1
    if found:
        rec = found[0]
        assert rec.inputs["version"] == CHARTS[key].version
        assert rec.inputs["repositoryOpts"] == {"repo": CHARTS[key].repository}
        assert rec.inputs["namespace"] == "kube-system"
        assert rec.provider and "k8s" in rec.provider
    return found[0] if found else None


def tolerates_gpu_taint(tolerations: list[dict[str, Any]]) -> bool:
    return any(
        t.get("key") == GPU_TAINT["key"]
        and t.get("effect") in (None, GPU_TAINT["effect"])
        and (t.get("operator") == "Exists" or t.get("value") == GPU_TAINT["value"])
        for t in tolerations
    )


def test_nvidia_plugin_on_every_gpu_pool(stack: tuple[StackConfig, Run, tuple[str, ...]]) -> None:
    cfg, run, advertised = stack
    rec = chart(run, "nvidia-device-plugin")
    assert rec is not None and "nvidia.com/gpu" in advertised
    values = rec.inputs["values"]
    assert tolerates_gpu_taint(values["tolerations"])
    # The chart's default affinity needs Node Feature Discovery labels nothing here sets: it must be replaced.
    (term,) = values["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term == {
        "matchExpressions": [{"key": POOL_LABEL, "operator": "In", "values": [p.name for p in cfg.cluster.gpu_pools]}]
    }
    assert values["nfd"] == {"enabled": False} and values["gfd"] == {"enabled": False}
    assert values["priorityClassName"] == "system-node-critical"


def test_efa_plugin_only_where_a_pool_has_efa(stack: tuple[StackConfig, Run, tuple[str, ...]]) -> None:
    cfg, run, advertised = stack
    efa_pools = [p.name for p in cfg.cluster.gpu_pools if p.efa]
    rec = chart(run, "aws-efa-k8s-device-plugin")
    assert (rec is not None) is bool(efa_pools) is ("vpc.amazonaws.com/efa" in advertised)
    if rec is None:
        return
    values = rec.inputs["values"]
    # The chart builds one nodeSelectorTerm per key (`key In values`): keyed on the pool label, only EFA pools.
    assert values["supportedInstanceLabels"] == {"keys": [POOL_LABEL], "values": efa_pools}
    assert tolerates_gpu_taint(values["tolerations"])
    # hostNetwork, privileged and /dev/infiniband come from the chart's template; nothing here may turn them off.
    assert not {"securityContext", "hostNetwork"} & set(values)


def test_shipped_stacks_cover_both_cases() -> None:
    assert not any(p.efa for p in config("dev").cluster.gpu_pools)
    assert config("prod").cluster.pool("training").efa
