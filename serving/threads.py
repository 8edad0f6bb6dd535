"""How many CPU threads the built-in engine should use: the CPUs this process may actually run on, not the host's.

`torch.get_num_threads()` defaults to the host's physical cores. In a pod with `resources.limits.cpu: 2` on a 48-core
node that means 24+ threads sharing a 2-CPU CFS quota: the kernel throttles the whole cgroup for the rest of each
100 ms period once the quota is used up, which is what turns into multi-second TTFT tails (issue 13: TTFT p90 of
5-10 s at 16 clients with the default threads while a neighbour ran). The budget is therefore the smallest of:

- the CPU affinity mask (`os.sched_getaffinity`: cpusets, `taskset`, Kubernetes static CPU manager);
- the cgroup v2 CPU quota (`cpu.max` = "<quota> <period>" or "max <period>"; kernel docs,
  Documentation/admin-guide/cgroup-v2.rst, "cpu.max") of this process's cgroup and its ancestors, or cgroup v1's
  `cpu.cfs_quota_us` / `cpu.cfs_period_us`;

rounded down, at least 1: a fractional quota (1.5 CPUs) cannot keep two threads busy without being throttled
(the same rule as Go's automaxprocs, github.com/uber-go/automaxprocs, internal/runtime/cpu_quota_linux.go).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """How many threads torch should use here, and what decided it."""

    threads: int
    affinity: int
    quota: float | None  # CPUs allowed by the cgroup quota; None = unlimited or not found
    source: str  # what decided `threads`

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return f"{self.threads} threads (from {self.source}; affinity {self.affinity} CPUs, cgroup quota {quota})"


def _parse_cpu_max(text: str) -> float | None:
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    quota, period = int(parts[0]), int(parts[1])
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota over this process's cgroup and its ancestors, in CPUs; None when unlimited."""
    quotas: list[float] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2_path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), "/")
    # cgroup v2; inside a container with its own cgroup namespace the path is "/" and root is the pod's cgroup
    rel = Path(v2_path.lstrip("/"))
    for d in [root / rel, *(root / p for p in rel.parents)]:
        try:
            q = _parse_cpu_max((d / "cpu.max").read_text())
        except (OSError, ValueError):
            continue
        if q is not None:
            quotas.append(q)
    # cgroup v1 (or a hybrid host): the cpu controller's own hierarchy
    for base in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            quotas.append(quota / period)
    return min(quotas) if quotas else None


def cpu_budget(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> CpuBudget:
    """The CPUs this process may really use: the smaller of its affinity mask and its cgroup CPU quota."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_quota(root, proc_cgroup)
    if quota is not None and math.floor(quota) < affinity:
        return CpuBudget(max(1, math.floor(quota)), affinity, quota, "cgroup cpu quota")
    return CpuBudget(max(1, affinity), affinity, quota, "cpu affinity")


def engine_threads(budget: CpuBudget, quantization: str) -> tuple[int, str]:
    """torch threads for an engine configuration when `--torch-threads` is 0, and why.

    Chosen by measurement (issue 20, SmolLM2-135M at 16 streaming clients on 2 cores, alternating configurations in
    one run; bench/serve_mixed.py --sweep-threads re-measures it, numbers in bench/RESULTS.md):
    - fp32: every CPU the process may use (2 threads 111/109 tok/s against 66/60 with 1): its matmuls are large
      enough to scale, and the event loop and tokenizer threads mostly wait on them;
    - int8: one CPU fewer, at least 1 (1 thread 174/132 tok/s against 91/109 with 2): the int8 step is cheap per
      token, so its per-token Python (activation quantization, scales) and the event loop and tokenizer threads
      compete with a second torch thread for the same cores; leaving them a core is faster.

    Re-measured 2026-12-08 after int8's one-digit layers and fp32's packed matmuls (`--sweep-threads --rounds 2`, 16
    clients x 4 requests x 32 tokens, means): fp32 2 threads 113.5 tok/s, 1 thread 99.7, default 116.2; int8 1 thread
    183.3, 2 threads 143.9, default 186.8: the defaults within 2% of the best count for both. A bare 16-row int8 step
    is 1.29x faster with 2 threads, yet the server is slower with them; lowering the event loop thread's priority
    (nice 10) did not change that (185 against 181 tok/s at 2 threads, 223 at 1).
    """
    if quantization == "int8" and budget.threads > 1:
        return budget.threads - 1, f"{budget.describe()}, one left to the event loop and tokenizer for int8"
    return budget.threads, budget.describe()
