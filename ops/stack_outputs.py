"""Reading a stack's outputs: what the launchers need to know about the infrastructure they submit to.

Accepts `pulumi stack output --json` (a flat object) or the offline preview's JSON
(`{"stack": ..., "resources": [...], "outputs": {...}}`). Keys are the constants of `infra.outputs`, never literals,
so a renamed output breaks the launcher's tests instead of a training job at submit time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from infra import outputs as out
from infra.layers import environment_of


class StackError(ValueError):
    """The stack's outputs lack what the launcher needs (e.g. no training pool)."""


def parse_outputs(doc: dict[str, Any]) -> dict[str, Any]:
    if isinstance(doc.get("outputs"), dict) and "resources" in doc:
        return doc["outputs"]
    return doc


def load_outputs(stack: str, outputs_file: str | None) -> dict[str, Any]:
    if outputs_file:
        outputs = parse_outputs(json.loads(Path(outputs_file).read_text(encoding="utf-8")))
        named = outputs.get(out.STACK)
        # Another environment's outputs would point this tool at its cluster, buckets and roles (issue 19).
        if named is not None and environment_of(str(named)) != environment_of(stack):
            raise StackError(f"--outputs {outputs_file} holds the outputs of stack {named!r}, not {stack!r}")
        return outputs
    # --show-secrets: the kubeconfig output is secret, and `kubectl apply` needs it.
    proc = subprocess.run(
        ["pulumi", "stack", "output", "--json", "--show-secrets", "--stack", stack],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise StackError(f"pulumi stack output failed for stack {stack!r}: {proc.stderr.strip()}")
    return parse_outputs(json.loads(proc.stdout))


def require(outputs: dict[str, Any], key: str) -> Any:
    value = outputs.get(key)
    if value in (None, "", [], {}):
        raise StackError(f"stack output {key!r} is missing: is this part of the stack enabled and deployed?")
    return value


def training_pool(outputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The GPU pool whose purpose is training: its labels and taints decide where the job's pods may land."""
    pools = require(outputs, out.GPU_POOLS)
    training = [(name, pool) for name, pool in sorted(pools.items()) if pool.get("purpose") == "training"]
    if not training:
        raise StackError(f"stack has no GPU pool with purpose 'training' (pools: {', '.join(sorted(pools))})")
    return training[0]
