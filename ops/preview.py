"""Offline preview: run the real program for a stack under the recording mock engine and show what it declares.

    python -m ops.preview dev                 # grouped, human-readable
    python -m ops.preview prod --json         # machine-readable (PR tooling, diffs)
    python -m ops.preview dev --config-file my-dev.yaml
    python -m ops.preview dev --compare base-dev.json   # markdown for a PR comment: changes, verdicts, cost delta
    python -m ops.preview prod --first-run    # against an empty account: no images, models, secrets or cluster yet

Both layers of the environment are run (infra/layers.py): the AWS layer as stack `<env>`, then the cluster layer as
`<env>-cluster`, reading the AWS layer's outputs through its StackReference.

Evaluates the policy pack's rules (`policy.rules`) over the recorded resources and estimates the monthly cost
(`ops.cost`). Needs no cloud account and no Pulumi CLI.
Exit codes: 0 ok, 2 invalid stack configuration, 3 a mandatory policy rule is violated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from facts import pulumi_types as tok
from infra import outputs as out
from infra.capacity import required_quotas
from infra.config import ConfigError, load_config, load_stack_file, project_name
from ops import access_report
from ops import cost as cost_estimate
from ops.mocks import MOCK_ORGANIZATION, Account, Recorded, RecordingMocks, Run, run_program
from policy.rules import StackContext, evaluate, resources_from_report

SECRET = "[secret]"

CHART = tok.HELM_CHART
"""A Helm chart release: a (remote) component whose objects the provider renders at deploy time; under the mock
engine it records as one resource with its inputs (chart, version, repositoryOpts, values), shown as one line here."""


KEY_SETTINGS: dict[str, tuple[str, ...]] = {
    tok.EC2_VPC: ("cidrBlock",),
    tok.EC2_SUBNET: ("availabilityZone", "cidrBlock"),
    tok.EC2_NAT_GATEWAY: ("subnetId",),
    tok.EC2_VPC_ENDPOINT: ("serviceName", "vpcEndpointType"),
    tok.EC2_FLOW_LOG: ("trafficType", "logDestinationType"),
    tok.CLOUDWATCH_LOG_GROUP: ("name", "retentionInDays"),
    tok.KMS_KEY: ("enableKeyRotation", "deletionWindowInDays"),
    tok.S3_BUCKET: ("bucket", "forceDestroy"),
    tok.S3_BUCKET_SERVER_SIDE_ENCRYPTION_CONFIGURATION: ("rules",),
    tok.ECR_REPOSITORY: ("name", "imageTagMutability", "forceDelete"),
    tok.IAM_ROLE: ("name",),
    tok.EKS_CLUSTER: ("name", "version", "vpcConfig", "encryptionConfig", "enabledClusterLogTypes"),
    tok.EKS_NODE_GROUP: (
        "nodeGroupName",
        "amiType",
        "instanceTypes",
        "capacityType",
        "scalingConfig",
        "labels",
        "taints",
    ),
    tok.EKS_ADDON: ("addonName",),
    tok.EKS_POD_IDENTITY_ASSOCIATION: ("namespace", "serviceAccount"),
    tok.SAGEMAKER_ENDPOINT_CONFIGURATION: ("productionVariants",),
    tok.APPAUTOSCALING_TARGET: ("resourceId", "minCapacity", "maxCapacity"),
    CHART: ("chart", "version", "repositoryOpts", "namespace"),
}


def preview(stack: str, config_file: Path | None = None, account: Account | None = None) -> tuple[dict[str, Any], Run]:
    """Validate the environment's config, run both layers of the program under mocks (the AWS layer as stack
    `<stack>`, then the cluster layer as `<stack>-cluster`, reading the first one's outputs through its
    StackReference; infra/layers.py), return the JSON report and the run (both layers' resources together).

    `account` models what already exists in AWS for the preview-time checks (default: every configured artifact
    exists, no cluster yet; ops.mocks.Account)."""
    values, source = load_stack_file(stack, config_file)
    cfg = load_config(values, stack, source)  # fails before any resource is registered

    from infra.layers import aws_stack_reference_name, cluster_stack
    from infra.preflight import placeholders
    from infra.program import build  # imported late: importing pulumi_aws costs ~2 s, config errors should not

    project = project_name()
    aws_run = run_program(build, values, stack=stack, project=project, region=cfg.region, account=account)
    mocks = RecordingMocks(cfg.region, account=account)
    mocks.stack_references[aws_stack_reference_name(MOCK_ORGANIZATION, project, stack)] = aws_run.outputs
    cluster_run = run_program(
        build, values, stack=cluster_stack(stack), project=project, region=cfg.region, mocks=mocks
    )
    outputs = {**{k: v for k, v in cluster_run.outputs.items() if k != out.LAYER}, **aws_run.outputs}
    outputs.pop(out.LAYER, None)
    run = Run(
        stack=stack,
        mocks=aws_run.mocks,
        outputs=outputs,
        secret_outputs=aws_run.secret_outputs | cluster_run.secret_outputs,
        layers={"aws": aws_run, "cluster": cluster_run},
    )
    report = {
        "stack": stack,
        "config_file": source,
        "resources": [r.as_json() for r in run.resources],
        "outputs": {k: (SECRET if k in run.secret_outputs else v) for k, v in sorted(run.outputs.items())},
        "layers": {
            name: sorted({f"{r.type}::{r.name}" for r in layer.resources}) for name, layer in run.layers.items()
        },
    }
    report["policy"] = evaluate(resources_from_report(report), StackContext.from_config(cfg))
    report["cost"] = cost_estimate.estimate(report["resources"], cfg.region)
    report["people"] = access_report.people_report(cfg, report["cost"])
    if stack != "prod":
        from infra.config import load_stack

        report["tradeoffs"] = cost_estimate.tradeoffs(cfg, load_stack("prod"))
    report["warnings"] = [f"placeholder value (`pulumi up` refuses it): {p}" for p in placeholders(values)]
    report["quotas"] = [{**vars(q), "request": q.request_command(cfg.region)} for q in required_quotas(cfg)]
    return report, run


def render_policy(policy: dict[str, Any]) -> str:
    verdict = "PASSED" if policy["passed"] else "FAILED"
    lines = [
        f"Policy: {verdict} ({policy['mandatory_violations']} mandatory, {policy['advisory_violations']} advisory "
        "violations)"
    ]
    for rule in policy["rules"]:
        lines.append(f"  [{rule['status']:>4}] {rule['level']:<9} {rule['name']}")
        lines += [f"         - {v['message']}" for v in rule["violations"]]
    return "\n".join(lines)


def _is_leaf(rec: Recorded) -> bool:
    return rec.custom or rec.type == CHART


def _component_of(rec: Recorded, components: dict[tuple[str, str], Recorded]) -> str:
    """Top-level component a resource belongs to (walks up the parent chain; names are unique per type only)."""
    node = rec
    while node.parent is not None and (node.parent_type, node.parent) in components:
        node = components[(node.parent_type, node.parent)]
    return node.name if node is not rec else "(stack)"


def _short(value: Any, limit: int = 110) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(report: dict[str, Any], run: Run) -> str:
    components = {(r.type, r.name): r for r in run.resources if not _is_leaf(r)}
    by_name = {r.name: r for r in components.values() if r.parent is None}
    groups: dict[str, list[Recorded]] = defaultdict(list)
    for rec in run.resources:
        if _is_leaf(rec):
            groups[_component_of(rec, components)].append(rec)
    lines = [f"Stack {report['stack']} ({report['config_file']}): {sum(len(g) for g in groups.values())} resources"]
    for component in sorted(groups, key=lambda c: (c == "(stack)", c)):
        comp = by_name.get(component)
        title = f"{component} [{comp.type}]" if comp else component
        lines.append("")
        lines.append(f"{title}: {len(groups[component])} resources")
        for rec in groups[component]:
            flags = "".join(
                [" [protected]" if rec.protect else "", " [retain-on-delete]" if rec.retain_on_delete else ""]
            )
            settings = ", ".join(
                f"{k}={_short(rec.inputs[k])}" for k in KEY_SETTINGS.get(rec.type, ()) if k in rec.inputs
            )
            lines.append(f"  + {rec.type:<55} {rec.name}{flags}")
            if settings:
                lines.append(f"      {settings}")
    lines.append("")
    lines.append("Outputs:")
    for key, value in report["outputs"].items():
        lines.append(f"  {key}: {_short(value, 140)}")
    return "\n".join(lines)


def _quotas_text(report: dict[str, Any]) -> str:
    lines = ["Service quotas this stack needs (request them before the first `pulumi up`; new accounts start at 0):"]
    for q in report["quotas"]:
        lines.append(f"  {q['service']} {q['code'] or '(per type)':<12} {q['name']}: >= {q['needed']} {q['unit']}")
        lines.append(f"      {q['why']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", help="stack name: dev, staging, prod (reads stacks/Pulumi.<stack>.yaml)")
    parser.add_argument("--json", action="store_true", help="print the machine-readable report")
    parser.add_argument("--config-file", type=Path, help="preview this stack config file instead")
    parser.add_argument(
        "--first-run",
        action="store_true",
        help="preview against an empty account (no images, models, secrets or cluster): the first `pulumi up`",
    )
    parser.add_argument(
        "--compare", type=Path, metavar="BASE.json", help="print, as markdown, what changes against a --json report"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        report, run = preview(args.stack, args.config_file, Account.empty() if args.first_run else None)
    except ConfigError as exc:  # includes infra.preflight.PreflightError (missing artifacts, drift)
        print(f"error: {exc}", file=sys.stderr)
        print(
            "fix the stack file (keys, types and defaults are declared in Pulumi.yaml) and run again", file=sys.stderr
        )
        return 2
    if args.compare:
        from ops.compare import compare_markdown

        base = json.loads(args.compare.read_text())
        print(compare_markdown(base, json.loads(json.dumps(report, default=str))))
    elif args.json:
        print(json.dumps(report, indent=2, sort_keys=False, default=str))
    else:
        print(render(report, run))
        print()
        print(render_policy(report["policy"]))
        print()
        print(cost_estimate.render(report["cost"]))
        if report.get("tradeoffs"):
            print()
            print(cost_estimate.render_tradeoffs(args.stack, report["tradeoffs"]))
        print()
        print(access_report.render(report["people"]))
        print()
        print(_quotas_text(report))
        if report["warnings"]:
            print()
            print("Warnings:")
            print("\n".join(f"  - {w}" for w in report["warnings"]))
        print(f"\n(previewed offline under the mock engine in {time.monotonic() - started:.1f}s)")
    return 0 if report["policy"]["passed"] else 3


if __name__ == "__main__":
    sys.exit(main())
