"""What many test modules share: the repository's paths and small helpers over recorded runs. Fixtures live in the
conftest.py files beside the tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.config import StackConfig
    from ops.mocks import Recorded, RecordingMocks, Run

REPO_ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = REPO_ROOT / "stacks"
CONTAINERS_DIR = REPO_ROOT / "containers"
DOCS_DIR = REPO_ROOT / "docs"
WORKFLOWS_DIR = REPO_ROOT / ".github" / "workflows"
STACK_OUTPUTS_DEV = REPO_ROOT / "tests" / "ops" / "fixtures" / "stack_outputs_dev.json"
"""A dev stack's outputs as `pulumi preview --json` reports them: what the launcher and the exporters read."""


def run_component(cfg: StackConfig, program: Callable[[], dict[str, Any]], mocks: RecordingMocks | None = None) -> Run:
    """Run one component's `program` under the recording mock engine, in the stack, project and region of `cfg`."""
    from ops.mocks import run_program

    return run_program(program, {}, cfg.stack, cfg.project, cfg.region, mocks=mocks)


def chart_records(run: Run, key: str) -> list[Recorded]:
    """The recorded Helm releases of the pinned chart `key` (infra.charts.CHARTS)."""
    from infra.charts import CHART_TYPE, CHARTS

    return [r for r in run.of_type(CHART_TYPE) if r.inputs["chart"] == CHARTS[key].chart]
