"""pulumi-policy wrappers around `policy.rules`: one `ResourceValidationPolicy` or `StackValidationPolicy` per rule.

Building the policies is cheap and side-effect free (tests do it); only `policy/__main__.py` builds the `PolicyPack`,
which starts the analyzer's gRPC server and blocks.

Stack context (GPU budget, production flag, stack name) comes from the stack's own config, validated by
`infra.config.load_config` exactly as the program validates it: the Pulumi CLI hands the analyzer the stack config
in the `PULUMI_CONFIG` environment variable and the stack name in `PULUMI_STACK` (pulumi-policy itself reads them in
`_configure_runtime_settings`). Policy-pack config (`--policy-pack-config`, keys `maxGpus`, `production`, `stack`)
overrides them when given. Rules that need a value nobody supplied report themselves not applicable, with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from typing import Any

import pulumi
from pulumi_policy import (
    EnforcementLevel,
    Policy,
    PolicyConfigSchema,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

from policy.rules import MANDATORY, RULES, Res, Rule, StackContext

PACK_NAME = "llm-platform"
CONFIG_SCHEMA = PolicyConfigSchema(
    properties={
        "maxGpus": {"type": "integer", "description": "GPU budget (defaults to the stack's llm-platform:maxGpus)"},
        "production": {"type": "boolean", "description": "production stack (defaults to llm-platform:production)"},
        "stack": {"type": "string", "description": "stack name (defaults to PULUMI_STACK)"},
    }
)


@cache
def stack_context_from_env() -> StackContext:
    """StackContext from the stack config the CLI passes to policy packs (PULUMI_CONFIG, PULUMI_STACK)."""
    from infra.config import ConfigError, load_config

    stack = os.environ.get("PULUMI_STACK")
    values = dict(pulumi.runtime.get_config_env())
    if not stack or not values:
        return StackContext(stack=stack)
    try:
        return StackContext.from_config(load_config(values, stack, "PULUMI_CONFIG"))
    except ConfigError:
        return StackContext(stack=stack)  # the program itself fails on the same config, with the reasons


def context_for(config: Mapping[str, Any], base: StackContext | None = None) -> StackContext:
    base = base if base is not None else stack_context_from_env()
    return StackContext(
        stack=config.get("stack", base.stack),
        production=config.get("production", base.production),
        max_gpus=config.get("maxGpus", base.max_gpus),
    )


def _not_applicable(rule: Rule, ctx: StackContext, args: Any) -> None:
    missing = [f for f in rule.needs if getattr(ctx, f) is None]
    args.not_applicable(
        f"stack config unknown ({', '.join(missing)}): run inside `pulumi preview` for a stack of "
        "this project or set them in --policy-pack-config"
    )


def _resource_policy(rule: Rule, level: EnforcementLevel) -> ResourceValidationPolicy:
    check = rule.resource_check
    assert check is not None

    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        ctx = context_for(args.get_config())
        if not rule.applicable(ctx):
            _not_applicable(rule, ctx, args)
        res = Res(args.resource_type, args.name, args.props, bool(args.opts.protect), args.urn)
        for message in check(res, ctx):
            report_violation(message, None)

    return ResourceValidationPolicy(
        name=rule.name,
        description=rule.description,
        validate=validate,
        enforcement_level=level,
        config_schema=CONFIG_SCHEMA,
    )


def _stack_policy(rule: Rule, level: EnforcementLevel) -> StackValidationPolicy:
    check = rule.stack_check
    assert check is not None

    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        ctx = context_for(args.get_config())
        if not rule.applicable(ctx):
            _not_applicable(rule, ctx, args)
        resources = []
        for r in args.resources:
            refs = {k: tuple(d.name for d in deps) for k, deps in (r.property_dependencies or {}).items()}
            resources.append(Res(r.resource_type, r.name, r.props, bool(r.opts.protect), r.urn, refs))
        for res, message in check(resources, ctx):
            report_violation(message, res.urn if res else None)

    return StackValidationPolicy(
        name=rule.name,
        description=rule.description,
        validate=validate,
        enforcement_level=level,
        config_schema=CONFIG_SCHEMA,
    )


def policies() -> list[Policy]:
    """Every rule of `policy.rules.RULES` as a pulumi-policy policy, at its enforcement level."""
    built: list[Policy] = []
    for rule in RULES:
        level = EnforcementLevel.MANDATORY if rule.level == MANDATORY else EnforcementLevel.ADVISORY
        if rule.resource_check:
            built.append(_resource_policy(rule, level))
        if rule.stack_check:
            built.append(_stack_policy(rule, level))
    return built
