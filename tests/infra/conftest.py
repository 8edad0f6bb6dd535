"""Fixtures for infrastructure tests: the real program run under the recording mock engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.config import StackConfig, load_stack, load_stack_file
from ops.mocks import Run

SHIPPED_STACKS = ("dev", "staging", "prod")

_cache: dict[str, tuple[dict[str, Any], Run]] = {}


@pytest.fixture
def run_stack(tmp_path: Path) -> Callable[..., Run]:
    """Run the whole program for a shipped stack, optionally with config overrides (`llm-platform:key`: value).

    Runs of unmodified shipped stacks are cached for the session: the program is deterministic under the mocks.
    """

    def run(stack: str, overrides: dict[str, Any] | None = None) -> Run:
        from ops.preview import preview

        key = f"{stack}:{json.dumps(overrides, sort_keys=True)}"
        if key not in _cache:
            config_file = None
            if overrides:
                values, _ = load_stack_file(stack)
                values.update(overrides)
                config_file = tmp_path / f"Pulumi.{stack}.yaml"
                config_file.write_text(yaml.safe_dump({"config": values}))
            _cache[key] = preview(stack, config_file)
        return _cache[key][1]

    return run


@pytest.fixture(params=SHIPPED_STACKS)
def shipped(request: pytest.FixtureRequest, run_stack: Callable[..., Run]) -> tuple[StackConfig, Run]:
    """(config, run) for each shipped stack."""
    return load_stack(request.param), run_stack(request.param)


PROD_SERVING = {
    "llm-platform:servingImageTag": "1.0.0",
    "llm-platform:servingImageDigest": "sha256:9184ae37f3191aadc38ce7d32a2ada3524180dc4d538a5e7d0ab6e86fdbda62a",
    "llm-platform:trainingImageDigest": "sha256:33ec1af2892edb5bd392a17efaa0c7dd5855bfbc0e987f8da149b0ef2b7dde2a",
}
"""prod after its first deploy: the images pushed and their tag and digests set (the shipped file has none yet)."""
