"""The built-in engine's default thread count: the tightest of CPU affinity and the cgroup CPU quota (v2 and v1),
rounded down, at least 1 (serving/threads.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serving.threads import cgroup_quota, cpu_budget


def _v2(tmp_path: Path, files: dict[str, str], own: str = "/kubepods/pod1/c1") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "cpu.max").write_text(text)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_v2_quota_of_own_cgroup_and_ancestors(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, {"kubepods/pod1/c1": "max 100000\n", "kubepods/pod1": "150000 100000\n"})
    assert cgroup_quota(root, proc) == 1.5  # the pod's limit applies to the container under it
    root, proc = _v2(tmp_path / "b", {"": "200000 100000\n"}, own="/")  # cgroup namespace: the pod is the root
    assert cgroup_quota(root, proc) == 2.0
    root, proc = _v2(tmp_path / "c", {"": "max 100000\n"}, own="/")
    assert cgroup_quota(root, proc) is None


def test_v1_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:cpu,cpuacct:/\n")
    assert cgroup_quota(root, proc) == 2.5
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(root, proc) is None


@pytest.mark.parametrize(("cpu_max", "expected"), [("50000 100000", 1), ("150000 100000", 1), ("100000 100000", 1)])
def test_budget_rounds_the_quota_down_and_never_below_one(tmp_path: Path, cpu_max: str, expected: int) -> None:
    root, proc = _v2(tmp_path, {"": cpu_max}, own="/")
    budget = cpu_budget(root, proc)
    affinity = len(os.sched_getaffinity(0))
    assert budget.threads == min(expected, affinity)
    assert "threads" in budget.describe() and "quota" in budget.describe()


def test_budget_without_quota_is_the_affinity(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, {"": "max 100000"}, own="/")
    budget = cpu_budget(root, proc)
    assert budget.threads == len(os.sched_getaffinity(0)) and budget.source == "cpu affinity"


@pytest.mark.parametrize(
    ("cpus", "quantization", "expected"),
    [(2, "none", 2), (2, "int8", 1), (1, "int8", 1), (8, "int8", 7), (4, "none", 4)],
)
def test_default_threads_follow_the_measured_rule_per_engine_configuration(
    cpus: int, quantization: str, expected: int
) -> None:
    from serving.threads import CpuBudget, engine_threads

    threads, why = engine_threads(CpuBudget(cpus, cpus, None, "cpu affinity"), quantization)
    assert threads == expected and why
