"""Helpers for the training tests: run the trainer as users do and read its JSON-lines metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from tests.helpers import REPO_ROOT

TORCHRUN = [sys.executable, "-m", "training.torchrun", "--nproc_per_node=2"]


@dataclass
class Run:
    returncode: int
    records: list[dict[str, Any]]
    stderr: str

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == name]


def parse_records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def train_cmd(*args: str, ranks: int = 2) -> list[str]:
    launcher = TORCHRUN if ranks == 2 else [sys.executable]
    return [*launcher, "-m", "training", "--preset", "debug", *args]


def run_training(*args: str, ranks: int = 2, timeout: float = 240) -> Run:
    # Each test gets its own scratch dir so S3 staging never leaks between runs.
    proc = subprocess.run(
        train_cmd(*args, ranks=ranks),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )
    return Run(proc.returncode, parse_records(proc.stdout), proc.stderr)
