"""Which Pulumi operations the workflows run, from where, and what the real engine does for each: the offline proof that
no job ever needs an API it cannot reach.

The mock engine (ops/mocks.py) runs the program but models neither targeting, nor remote components, nor network reach.
So the rules the real engine follows are stated here, each with its source, and applied to the resources a layer's
program registers under the mocks (or, for `destroy`, holds in its state):

ENGINE_RULES, in order:
1. A provider is always part of an update, whatever --target/--exclude say: "we also implicitly target providers (both
   default and explicit ...)" (pulumi/pulumi pkg/resource/deploy/step_generator.go, `isImplicitlyTargetedResource`,
   mirror commit 1b5949891b; the rule has held since pulumi/pulumi#13557 / #13591, before the 3.272.0 we pin). A
   Kubernetes provider's Configure connects to its cluster.
2. A remote component is constructed whatever --target/--exclude say: registration of a `remote` resource calls the
   provider's Construct directly ("Remote components don't go through the step generator", pulumi/pulumi
   pkg/resource/deploy/source_eval.go, same commit). `kubernetes:helm.sh/v4:Chart` is one (`remote=True`,
   pulumi_kubernetes 4.34.2 helm/v4/Chart.py), and pulumi-kubernetes' Construct fails with "configured Kubernetes
   cluster is unreachable" when its provider could not reach the cluster (provider/pkg/provider/provider_construct.go,
   pulumi/pulumi-kubernetes mirror commit 94977969d).
3. `depends_on=[component]` means every child of the component ("Local component resources act as aggregations of
   their descendents", pulumi 3.272.0 sdk/python/lib/pulumi/runtime/rpc.py `_add_dependency`), and
   `--exclude-dependents` excludes everything that depends on (or is a child of, or uses the provider of) an excluded
   resource.
4. `pulumi destroy` configures every provider in the state (rule 1) and deletes each resource through it; a Kubernetes
   resource's Delete needs its cluster, unless `PULUMI_K8S_DELETE_UNREACHABLE=true`, which drops it from the state when
   the cluster cannot be reached (pulumi-kubernetes provider/pkg/provider/provider.go, `deleteUnreachable`). That is
   safe only once the cluster itself is deleted: before, it would orphan live objects.

A job runs inside the VPC when it runs on a CodeBuild-hosted runner (`runs-on: codebuild-...`, infra/access.py); every
other runner is outside, and the cluster's endpoint is private.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

K8S_PROVIDER_TYPE = "pulumi:providers:kubernetes"
HELM_CHART_TYPE = "kubernetes:helm.sh/v4:Chart"
REMOTE_COMPONENT_TYPES = frozenset({HELM_CHART_TYPE})
"""Remote components among what the program declares (rule 2)."""
DELETE_UNREACHABLE_ENV = "PULUMI_K8S_DELETE_UNREACHABLE"


@dataclass(frozen=True)
class Operation:
    """One Pulumi operation a workflow job runs."""

    workflow: str
    job: str
    runs_on: str
    command: str
    """up, preview, destroy or refresh."""
    stack: str
    excludes: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    exclude_dependents: bool = False
    delete_unreachable: bool = False
    """PULUMI_K8S_DELETE_UNREACHABLE=true, and only after the cluster itself is deleted (ops.teardown
    --cluster-unreachable; rule 4)."""
    via: str = ""

    @property
    def in_vpc(self) -> bool:
        return any(label.startswith("codebuild-") for label in self.runs_on.split(","))

    def __str__(self) -> str:
        return f"{self.workflow} job {self.job!r} ({self.runs_on}): {self.via or 'pulumi'} {self.command} {self.stack}"


# -- reading the workflows ------------------------------------------------------------------------------------------
_EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")
_PULUMI = re.compile(r"(?<![\w./-])pulumi\s+(up|preview|destroy|refresh)\b")
_TEARDOWN = re.compile(r"-m\s+ops\.teardown\b")


def _matrix_rows(job: Mapping[str, Any], environments: Sequence[str]) -> list[dict[str, str]]:
    """The job's matrix rows; a dimension computed at run time (`${{ fromJSON(...) }}`) ranges over the
    environments."""
    matrix = (job.get("strategy") or {}).get("matrix") or {}
    rows: list[dict[str, str]] = [{}]
    for key, values in matrix.items():
        if key in ("include", "exclude"):
            continue
        options = [str(v) for v in values] if isinstance(values, list) else list(environments)
        rows = [{**row, key: v} for row in rows for v in options]
    return rows


def _expand(text: str, matrix: Mapping[str, str], environments: Sequence[str]) -> list[str]:
    """Every value `text` may take: `${{ matrix.x }}` from the job's matrix; `${{ inputs.stack }}` (a dispatch input)
    any environment; any other expression left as written."""
    values = [text]
    for expr in set(_EXPR.findall(text)):
        if expr.startswith("matrix.") and expr[7:] in matrix:
            options = [matrix[expr[7:]]]
        elif expr in ("inputs.stack", "github.event.inputs.stack"):
            options = list(environments)
        else:
            continue
        values = [v.replace(f"${{{{ {expr} }}}}", o).replace(f"${{{{{expr}}}}}", o) for v in values for o in options]
    return values


def _substitute(script: str, env: Mapping[str, str]) -> str:
    def var(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return env.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, script)


def _flag(args: list[str], *names: str) -> list[str]:
    found = []
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                found.append(args[i + 1])
            elif a.startswith(n + "="):
                found.append(a.split("=", 1)[1])
    return found


def _script_operations(
    script: str, env: Mapping[str, str], base: dict[str, Any], environments: Sequence[str]
) -> list[Operation]:
    ops: list[Operation] = []
    script = script.replace("\\\n", " ")
    arrays = _bash_arrays(script)
    if arrays:
        # `args=(...)`, `args+=(...)` under conditions: the command with the base array, and with every addition.
        variants = [
            re.sub(rf'"\$\{{{name}\[@\]\}}"', lambda _m, v=values: v, script)
            for name, (first, added) in arrays.items()
            for values in (first, f"{first} {added}".strip())
        ]
        return list(dict.fromkeys(op for v in variants for op in _script_operations(v, env, base, environments)))
    script = _substitute(script, env)
    delete_unreachable = env.get(DELETE_UNREACHABLE_ENV, "").lower() == "true"
    for line in script.splitlines():
        line = line.split(" #", 1)[0]
        for m in _PULUMI.finditer(line):
            try:
                args = shlex.split(line[m.end() :])
            except ValueError:
                args = line[m.end() :].split()
            for stack in _flag(args, "--stack", "-s"):
                ops.append(
                    Operation(
                        **base,
                        command=m.group(1),
                        stack=stack,
                        excludes=tuple(_flag(args, "--exclude")),
                        targets=tuple(_flag(args, "--target", "-t")),
                        exclude_dependents="--exclude-dependents" in args,
                        delete_unreachable=delete_unreachable,
                        via="pulumi CLI",
                    )
                )
        if _TEARDOWN.search(line):
            ops += _teardown_operations(line, base, environments)
    return ops


def _bash_arrays(script: str) -> dict[str, tuple[str, str]]:
    """Bash arrays a script builds: name -> (its initial items, every item any `+=` adds), as text."""
    arrays: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r"(?m)(\w+)(\+?)=\(([^)]*)\)", script):
        name, add, items = m.group(1), m.group(2), m.group(3)
        base, extra = arrays.get(name, ("", ""))
        arrays[name] = (base, f"{extra} {items}".strip()) if add else (items, extra)
    return {k: v for k, v in arrays.items() if f'"${{{k}[@]}}"' in script}


def _teardown_operations(line: str, base: dict[str, Any], environments: Sequence[str]) -> list[Operation]:
    """What `python -m ops.teardown` runs (ops/teardown.py `plan_layers`): the stacks it destroys, in order."""
    from infra.layers import cluster_stack

    try:
        args = shlex.split(line[_TEARDOWN.search(line).end() :])  # type: ignore[union-attr]
    except ValueError:
        args = line.split()
    if "--sweep-only" in args or "--list" in args:
        return []
    layer = (_flag(args, "--layer") or ["all"])[0]
    unreachable = "--cluster-unreachable" in args
    positional = [a for a in args if not a.startswith("-")]
    stacks = list(environments) if "--expired" in args or not positional else positional[:1]
    ops = []
    for env in stacks:
        plan: list[tuple[str, bool]] = []
        if layer in ("cluster", "all") and not unreachable:
            plan.append((cluster_stack(env), False))
        if layer in ("aws", "all"):
            plan.append((env, False))
            if unreachable:
                plan.append((cluster_stack(env), True))
        for stack, delete_unreachable in plan:
            ops.append(
                Operation(
                    **base,
                    command="destroy",
                    stack=stack,
                    delete_unreachable=delete_unreachable,
                    via=f"ops.teardown --layer {layer}" + (" --cluster-unreachable" if unreachable else ""),
                )
            )
    return ops


def operations(name: str, workflow: Mapping[str, Any], environments: Sequence[str]) -> list[Operation]:
    """Every Pulumi operation of a parsed workflow, per matrix row; `${{ inputs.stack }}` stands for any environment."""
    found: list[Operation] = []
    wf_env = {k: str(v) for k, v in (workflow.get("env") or {}).items()}
    for job_id, job in (workflow.get("jobs") or {}).items():
        runs_on = job.get("runs-on", "")
        labels = runs_on if isinstance(runs_on, list) else [runs_on]
        job_env = {**wf_env, **{k: str(v) for k, v in (job.get("env") or {}).items()}}
        for row in _matrix_rows(job, environments):
            for step in job.get("steps") or []:
                env = {**job_env, **{k: str(v) for k, v in (step.get("env") or {}).items()}}
                for runner in _expand(",".join(map(str, labels)), row, environments):
                    base = {"workflow": name, "job": job_id, "runs_on": runner}
                    if step.get("uses", "").split("@")[0] == "pulumi/actions":
                        w = step.get("with") or {}
                        if w.get("command"):
                            for stack in _expand(str(w.get("stack-name", "")), row, environments):
                                found.append(
                                    Operation(
                                        **base,
                                        command=str(w["command"]),
                                        stack=stack,
                                        excludes=tuple(_lines(w.get("exclude"))),
                                        targets=tuple(_lines(w.get("target"))),
                                        exclude_dependents=w.get("exclude-dependents") is True,
                                        delete_unreachable=env.get(DELETE_UNREACHABLE_ENV, "").lower() == "true",
                                        via="pulumi/actions",
                                    )
                                )
                    if "run" in step:
                        for script in _expand(str(step["run"]), row, environments):
                            expanded_env = {k: _expand(v, row, environments)[0] for k, v in env.items()}
                            for stack_env in _env_variants(env, row, environments):
                                found += _script_operations(script, {**expanded_env, **stack_env}, base, environments)
    # The same operation reached through several expansions counts once.
    return list(dict.fromkeys(found))


def _env_variants(env: Mapping[str, str], row: Mapping[str, str], environments: Sequence[str]) -> list[dict[str, str]]:
    """A step env var set from `${{ inputs.stack }}` takes each environment in turn."""
    multi = {k: _expand(v, row, environments) for k, v in env.items()}
    variants: list[dict[str, str]] = [{}]
    for key, values in multi.items():
        if len(values) > 1:
            variants = [{**v, key: value} for v in variants for value in values]
    return variants


def _lines(value: Any) -> list[str]:
    return [line.strip() for line in str(value or "").splitlines() if line.strip()]


# -- what the real engine does for each operation -------------------------------------------------------------------
@dataclass
class Registered:
    """A resource as the rules need it: URN, type, provider URN, parent URN, depends_on URNs."""

    urn: str
    type: str
    custom: bool
    provider: str | None = None
    parent: str | None = None
    depends_on: list[str] = field(default_factory=list)


def _excluded(resources: Sequence[Registered], excludes: Iterable[str], dependents: bool) -> set[str]:
    """Rule 3: what --exclude (with --exclude-dependents) takes out, components expanded to their children."""
    out = {key(u) for u in excludes}
    if not dependents:
        return out
    children: dict[str, list[str]] = {}
    for r in resources:
        if r.parent:
            children.setdefault(r.parent, []).append(r.urn)
    changed = True
    while changed:
        changed = False
        for r in resources:
            if r.urn in out:
                continue
            deps = set(r.depends_on)
            for d in list(deps):
                deps |= set(children.get(d, []))  # depends_on a component = on all its children
            if r.provider in out or r.parent in out or deps & out:
                out.add(r.urn)
                changed = True
    return out


def needs_cluster(op: Operation, resources: Sequence[Registered]) -> list[str]:
    """Why `op` needs the cluster's API (empty: it does not), by the engine rules above."""
    why: list[str] = []
    if op.command == "destroy":
        k8s = [r for r in resources if r.type == K8S_PROVIDER_TYPE or r.type.startswith("kubernetes:")]
        if k8s and not op.delete_unreachable:
            why.append(
                f"rule 4: destroying {op.stack} deletes {len(k8s)} Kubernetes resource(s) through the cluster's "
                "provider (PULUMI_K8S_DELETE_UNREACHABLE only once the cluster itself is deleted)"
            )
        return why
    excluded = _excluded(resources, op.excludes, op.exclude_dependents)
    for r in resources:
        if r.type == K8S_PROVIDER_TYPE:
            note = " although --exclude names it" if r.urn in excluded else ""
            why.append(f"rule 1: the Kubernetes provider {r.urn} is part of every {op.command}{note}")
        elif r.type in REMOTE_COMPONENT_TYPES:
            note = " although excluded" if r.urn in excluded else ""
            why.append(f"rule 2: {r.urn} is constructed (Construct calls the cluster){note}")
        elif (
            r.custom
            and r.type.startswith("kubernetes:")
            and r.urn not in excluded
            and (not op.targets or r.urn in {key(t) for t in op.targets})
        ):
            why.append(f"{r.urn} is registered through the cluster's provider")
    return why


def violations(ops: Iterable[Operation], resources_of: Mapping[str, Sequence[Registered]]) -> list[str]:
    """Every operation outside the VPC that needs the cluster's API. `resources_of` maps a stack name to what its
    program registers (up/preview) or its state holds (destroy); a stack not in it is an error."""
    problems = []
    for op in ops:
        if op.in_vpc:
            continue
        if op.stack not in resources_of:
            problems.append(f"{op}: unknown stack {op.stack!r}")
            continue
        problems += [f"{op}: {why}" for why in needs_cluster(op, resources_of[op.stack])]
    return problems


def key(urn: str) -> str:
    """`<type>::<name>` of a URN (`urn:pulumi:<stack>::<project>::<parent types$>type::name[::id]`), or of a key."""
    if not urn.startswith("urn:pulumi:"):
        return urn
    parts = urn.split("::")
    return f"{parts[2].split('$')[-1]}::{parts[3]}"


def registered(recorded: Iterable[Any]) -> list[Registered]:
    """The rules' view of what the mock engine recorded (ops.mocks.Recorded: type, name, custom, provider URN,
    parent, parent_type, depends_on as `<type>::<name>`)."""
    return [
        Registered(
            urn=f"{r.type}::{r.name}",
            type=r.type,
            custom=r.custom,
            provider=key(r.provider) if r.provider else None,
            parent=f"{r.parent_type}::{r.parent}" if r.parent else None,
            depends_on=list(r.depends_on),
        )
        for r in recorded
    ]


def in_vpc_applies(ops: Iterable[Operation], stack: str, command: str = "up") -> list[Operation]:
    """The operations running `command` on `stack` from inside the VPC."""
    return [op for op in ops if op.stack == stack and op.command == command and op.in_vpc]
