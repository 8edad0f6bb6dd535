"""Pulumi Automation API helpers shared by teardown, the TTL sweep and the real-cloud integration test.

Everything that needs the Pulumi CLI goes through here, so the "CLI missing" case is detected once and worded
once. The pure helpers (stack naming, config copying, TTL selection) need no CLI and are unit-tested offline.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = REPO_ROOT / "stacks"
PROJECT = "llm-platform"
PRODUCTION_KEY = f"{PROJECT}:production"
REGION_KEY = "aws:region"

MISSING_CLI_MESSAGE = (
    "The Pulumi CLI is not on PATH: the Automation API drives the `pulumi` binary, it does not ship one.\n"
    "Install it (`curl -fsSL https://get.pulumi.com | sh`, or the `pulumi/actions` step in CI), log in to the\n"
    "stack's backend (`pulumi login` with PULUMI_ACCESS_TOKEN, or PULUMI_BACKEND_URL for a self-managed one),\n"
    "then run this again. To only look for leftovers with boto3, add --sweep-only (with --region and\n"
    "--cluster-name, or --outputs FILE from `pulumi stack output --json`)."
)


class PulumiCliMissing(RuntimeError):
    """Raised instead of the Automation API's own error, which does not say what to do."""

    def __init__(self) -> None:
        super().__init__(MISSING_CLI_MESSAGE)


def pulumi_cli() -> str | None:
    """Path of the `pulumi` binary, or None."""
    return shutil.which("pulumi")


def require_cli() -> None:
    if pulumi_cli() is None:
        raise PulumiCliMissing()


def select_stack(stack: str, work_dir: Path = REPO_ROOT) -> Any:
    """The existing stack, driven through the project's Pulumi.yaml (the real program, not an inline one)."""
    require_cli()
    import pulumi.automation as auto  # imported late: it is heavy and useless without the CLI

    return auto.select_stack(stack_name=stack, work_dir=str(work_dir))


def stack_outputs(stack: str, work_dir: Path = REPO_ROOT) -> dict[str, Any]:
    """The stack's outputs as plain values (secrets included: teardown needs the kubeconfig)."""
    return {k: v.value for k, v in select_stack(stack, work_dir).outputs().items()}


def destroy(
    stack: str,
    on_output: Callable[[str], Any] = print,
    work_dir: Path = REPO_ROOT,
    env: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """`pulumi destroy` for the stack; returns the engine's resource change summary. `env` is set for the CLI (and
    its provider plugins) during the destroy only, e.g. PULUMI_K8S_DELETE_UNREACHABLE (ops/teardown.py)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        result = select_stack(stack, work_dir).destroy(on_output=on_output, color="never")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return dict(result.summary.resource_changes or {})


def stack_exists(stack: str, work_dir: Path = REPO_ROOT) -> bool:
    """Whether the backend has the stack (a layer never applied has none)."""
    require_cli()
    import pulumi.automation as auto

    ws = auto.LocalWorkspace(work_dir=str(work_dir))
    return any(s.name.rsplit("/", 1)[-1] == stack for s in ws.list_stacks())


def state_resources(stack: str, work_dir: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """The resources the stack's state holds (`pulumi stack export`), [] when the stack does not exist."""
    if not stack_exists(stack, work_dir):
        return []
    deployment = select_stack(stack, work_dir).export_stack().deployment or {}
    return list(deployment.get("resources") or [])


def held_identifiers(resources: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every physical id and ARN a state's resources carry: what only Pulumi may delete (ops/teardown.py)."""
    held: set[str] = set()
    for r in resources:
        if r.get("id"):
            held.add(str(r["id"]))
        for source in (r.get("outputs") or {}, r.get("inputs") or {}):
            for key in ("arn", "id", "bucket", "name"):
                value = source.get(key)
                if isinstance(value, str) and value:
                    held.add(value)
    return held


# ---- stack config files (read without the CLI) ---------------------------------------------------------------


def stack_file(stack: str, stacks_dir: Path | None = None) -> Path:
    # Looked up at call time (not bound as a default) so tests can point it at a temporary directory.
    return (stacks_dir or STACKS_DIR) / f"Pulumi.{stack}.yaml"


def read_stack_config(stack: str, stacks_dir: Path | None = None) -> dict[str, Any]:
    """The raw `config:` mapping of a stack file, or {} when the stack has no file (an ephemeral stack)."""
    path = stack_file(stack, stacks_dir)
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return dict(data.get("config") or {})


def _truthy(value: Any) -> bool:
    # Pulumi stack files may hold booleans as YAML booleans or as the strings the CLI writes ("true").
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def is_production(config: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> bool:
    """Production-marked by its config file or by its exported `production` output: either one is enough."""
    from infra import outputs as keys

    return _truthy(config.get(PRODUCTION_KEY)) or bool(outputs and _truthy(outputs.get(keys.PRODUCTION)))


# ---- ephemeral stacks for the integration test ---------------------------------------------------------------

_STACK_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]+")


def ephemeral_stack_name(prefix: str, run_id: str, max_len: int = 40) -> str:
    """A stack name that is valid for Pulumi and for the AWS names derived from it, unique per CI run.

    Lower-case, only [a-z0-9-], no leading/trailing dash, bounded length (bucket and cluster names derive from
    it and AWS caps those), and it keeps the run id's tail so two runs never share a name.
    """
    raw = _STACK_NAME_OK.sub("-", f"{prefix}-{run_id}".lower()).replace("_", "-").replace(".", "-")
    raw = re.sub(r"-{2,}", "-", raw).strip("-")
    if len(raw) > max_len:
        tail = raw[-(max_len - len(prefix) - 1) :].strip("-")
        raw = f"{prefix.lower()}-{tail}"
    if not raw or not raw[0].isalpha():
        raise ValueError(f"cannot derive a stack name from prefix={prefix!r} run_id={run_id!r}")
    return raw


@dataclass(frozen=True)
class CopiedConfig:
    plain: dict[str, Any]
    """Values to set on the new stack (non-string values as JSON-able Python objects)."""
    skipped_secrets: tuple[str, ...]
    """Keys whose values are encrypted for the source stack and cannot be copied as they are."""


def copy_stack_config(source: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> CopiedConfig:
    """The source stack's config, ready for a new stack: secrets left out (named), overrides applied.

    A `secure:` value is ciphertext bound to the source stack's secrets provider; copying it would give the new
    stack a value it cannot decrypt, so it is skipped and reported instead.
    """
    plain: dict[str, Any] = {}
    secrets: list[str] = []
    for key, value in source.items():
        if isinstance(value, Mapping) and "secure" in value:
            secrets.append(key)
            continue
        plain[key] = value
    plain.update(overrides or {})
    # An ephemeral copy must never inherit production protection: it is created to be destroyed.
    plain[PRODUCTION_KEY] = False
    return CopiedConfig(plain=plain, skipped_secrets=tuple(sorted(secrets)))


def write_stack_config(stack: str, values: Mapping[str, Any], stacks_dir: Path | None = None) -> Path:
    """Write `values` as the stack file's `config:`, keeping whatever else the CLI put there (encryptionsalt ...).

    Written as YAML rather than through `set_all_config`, which stores a list or a map as a JSON *string*: the
    stack file must hold the same types as the dev file it was copied from, because infra/config.py validates them.
    """
    path = stack_file(stack, stacks_dir)
    doc = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    doc["config"] = dict(values)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# ---- TTL selection for the scheduled dev teardown -------------------------------------------------------------

DEFAULT_TTL_PATTERNS = ("dev", "dev-*", "itest-*")


@dataclass(frozen=True)
class StackAge:
    name: str
    last_update: datetime | None
    update_in_progress: bool = False


def expired_stacks(
    stacks: Iterable[StackAge],
    now: datetime,
    ttl: timedelta,
    patterns: Iterable[str] = DEFAULT_TTL_PATTERNS,
) -> list[str]:
    """Names of stacks matching `patterns` whose last update is older than `ttl`.

    A stack with an update in progress is someone's live work and is skipped; one that never updated has
    nothing deployed. Production protection is not decided here: teardown itself refuses prod-marked stacks.
    """
    pats = tuple(patterns)
    out = []
    for s in stacks:
        short = s.name.rsplit("/", 1)[-1]  # org/project/stack from a Pulumi Cloud backend
        if not any(fnmatch.fnmatchcase(short, p) for p in pats):
            continue
        if s.update_in_progress or s.last_update is None:
            continue
        last = s.last_update if s.last_update.tzinfo else s.last_update.replace(tzinfo=UTC)
        if now - last > ttl:
            out.append(short)
    return sorted(out)


def list_stack_ages(work_dir: Path = REPO_ROOT) -> list[StackAge]:
    require_cli()
    import pulumi.automation as auto

    ws = auto.LocalWorkspace(work_dir=str(work_dir))
    return [StackAge(s.name, s.last_update, bool(s.update_in_progress)) for s in ws.list_stacks()]
