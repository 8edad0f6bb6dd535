"""No job on a runner outside the VPC ever needs the cluster's API, under the real Pulumi engine's rules.

The mock engine models neither targeting nor remote components nor reach, so the rules are stated (infra/reach.py,
each with its source file and version) and applied to what each layer's program registers:

1. A provider is always part of an update, whatever --target/--exclude say (pulumi/pulumi
   pkg/resource/deploy/step_generator.go, `isImplicitlyTargetedResource`).
2. A remote component (`kubernetes:helm.sh/v4:Chart`) is constructed whatever --target/--exclude say (pulumi/pulumi
   pkg/resource/deploy/source_eval.go; pulumi-kubernetes provider/pkg/provider/provider_construct.go fails Construct
   with "configured Kubernetes cluster is unreachable").
3. `depends_on=[component]` means all its children (pulumi 3.272.0 sdk/python/lib/pulumi/runtime/rpc.py).
4. `pulumi destroy` deletes Kubernetes resources through their cluster unless PULUMI_K8S_DELETE_UNREACHABLE, which is
   safe only once the cluster itself is deleted (pulumi-kubernetes provider/pkg/provider/provider.go).

This test fails on the workflows before the layer split (the two-phase `--exclude <provider> --exclude-dependents`
deploy, a PR preview with the same flags, and teardown/TTL jobs destroying everything from GitHub-hosted runners):
run against `git show 91a34ca:.github/workflows/*.yml` it reports the hosted teardown and TTL jobs destroying the
cluster layer (rule 4) and no in-VPC job applying `<env>-cluster`; and
`test_the_rules_condemn_the_old_single_stack_two_phase_deploy` shows that with the old single-stack program the
`<env>-aws` job and the PR preview broke rules 1 and 2.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import reach
from infra.access import kubernetes_provider_urn
from infra.layers import cluster_stack
from ops.mocks import Run
from tests.helpers import WORKFLOWS_DIR
from tests.infra.conftest import PROD_SERVING

ENVIRONMENTS = ("dev", "staging", "prod")


def _workflows(directory: Path = WORKFLOWS_DIR) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(directory.glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        if True in doc:  # YAML 1.1 reads the bare key `on` as True
            doc["on"] = doc.pop(True)
        out[path.name] = doc
    return out


def _all_operations(directory: Path = WORKFLOWS_DIR) -> list[reach.Operation]:
    return [op for name, wf in _workflows(directory).items() for op in reach.operations(name, wf, ENVIRONMENTS)]


@pytest.fixture(scope="module")
def layers() -> dict[str, list[reach.Registered]]:
    """What each stack's program registers (up/preview) or its state holds after an up (destroy), per stack name."""
    from ops.preview import preview

    out: dict[str, list[reach.Registered]] = {}
    for env in ENVIRONMENTS:
        _, run = preview(env)
        out[env] = reach.registered(run.layers["aws"].resources)
        out[cluster_stack(env)] = reach.registered(run.layers["cluster"].resources)
    return out


def test_each_rule_is_stated_with_its_source_and_the_installed_sdk_agrees() -> None:
    doc = reach.__doc__ or ""
    for source in (
        "pkg/resource/deploy/step_generator.go",
        "pkg/resource/deploy/source_eval.go",
        "provider/pkg/provider/provider_construct.go",
        "sdk/python/lib/pulumi/runtime/rpc.py",
        "provider/pkg/provider/provider.go",
    ):
        assert source in doc, source
    # What can be checked here, at the versions we pin: the chart is a remote component (rule 2), and the SDK
    # expands depends_on on a component to its children (rule 3).
    from pulumi.runtime import rpc
    from pulumi_kubernetes.helm.v4 import Chart

    assert "remote=True" in inspect.getsource(Chart.__init__) or "remote=True" in inspect.getsource(Chart)
    assert "Local component resources act as aggregations of their descendents" in (rpc._add_dependency.__doc__ or "")
    assert reach.HELM_CHART_TYPE in reach.REMOTE_COMPONENT_TYPES


def test_no_job_outside_the_vpc_needs_the_clusters_api(layers: dict[str, list[reach.Registered]]) -> None:
    ops = _all_operations()
    # The parser sees every Pulumi operation the workflows run (a blind parser would pass anything).
    seen = {(op.workflow, op.command, op.stack, op.in_vpc) for op in ops}
    for env in ENVIRONMENTS:
        assert ("deploy.yml", "up", env, False) in seen
        assert ("deploy.yml", "up", cluster_stack(env), True) in seen
        assert ("pr-preview.yml", "preview", env, False) in seen
        assert ("teardown.yml", "destroy", cluster_stack(env), True) in seen
        assert ("teardown.yml", "destroy", env, False) in seen
    assert reach.violations(ops, layers) == []


def test_every_environment_applies_and_tears_down_its_cluster_layer_from_inside_the_vpc() -> None:
    ops = _all_operations()
    for env in ENVIRONMENTS:
        applies = reach.in_vpc_applies(ops, cluster_stack(env))
        assert [op.job for op in applies if op.workflow == "deploy.yml"] == [env]
        assert applies[0].runs_on.startswith(f"codebuild-llmp-{env}-deployer-")
    # The hosted fallback destroys the cluster layer only with PULUMI_K8S_DELETE_UNREACHABLE, after the AWS layer.
    fallbacks = [op for op in ops if op.command == "destroy" and not op.in_vpc and op.stack.endswith("-cluster")]
    assert fallbacks and all(op.delete_unreachable and "--cluster-unreachable" in op.via for op in fallbacks)


def test_no_aws_resource_the_platform_needs_to_be_safe_waits_for_the_cluster_layer(run_stack) -> None:
    """IAM, Pod Identity, the spot queue and its rules, the ASG node-template tags, the alert topic and key, the alarms
    and the metrics workspace exist before any Kubernetes object does: all in the AWS layer; the cluster layer
    declares no AWS resource at all."""
    run: Run = run_stack("prod", PROD_SERVING)  # amp metrics, SageMaker alarms; dev's spot queue below
    aws_types = {r.type for r in run.layers["aws"].resources}
    for typ in (
        "aws:iam/role:Role",
        "aws:eks/podIdentityAssociation:PodIdentityAssociation",
        "aws:autoscaling/tag:Tag",
        "aws:sns/topic:Topic",
        "aws:kms/key:Key",
        "aws:cloudwatch/metricAlarm:MetricAlarm",
        "aws:amp/workspace:Workspace",
        "aws:amp/scraper:Scraper",
    ):
        assert typ in aws_types, typ
    for stack in ("dev", "staging", "prod"):
        layer = run_stack(stack).layers["cluster"].resources
        assert not [r.name for r in layer if r.custom and r.type.startswith("aws:")], stack
    spot = run_stack("dev").layers["aws"].resources
    assert {"aws:sqs/queue:Queue", "aws:cloudwatch/eventRule:EventRule"} <= {r.type for r in spot}
    assoc = {r.name for r in spot if r.type == "aws:eks/podIdentityAssociation:PodIdentityAssociation"}
    assert {"kubernetes-base-training-pod-identity", "cluster-autoscaler-pod-identity"} <= assoc


def test_the_rules_condemn_the_old_single_stack_two_phase_deploy(layers: dict[str, list[reach.Registered]]) -> None:
    """Before the split, stack `dev` registered both layers' resources and the `dev-aws` job ran
    `pulumi up --exclude <the cluster's Kubernetes provider> --exclude-dependents` from a GitHub-hosted runner (and the
    PR preview the same flags). Rules 1 and 2 say the provider and every chart were still part of it."""
    single_stack = layers["dev"] + layers["dev-cluster"]
    provider = kubernetes_provider_urn("dev-cluster", "llm-platform")
    old_jobs = {
        "jobs": {
            "dev-aws": {
                "runs-on": "ubuntu-latest",
                "steps": [
                    {
                        "uses": "pulumi/actions@8582a9e8cc630786854029b4e09281acd6794b58",
                        "with": {"command": "up", "stack-name": "dev", "exclude": provider, "exclude-dependents": True},
                    }
                ],
            },
            "preview": {
                "runs-on": "ubuntu-latest",
                "steps": [{"run": f"pulumi preview --stack dev --exclude '{provider}' --exclude-dependents"}],
            },
            "teardown": {"runs-on": "ubuntu-latest", "steps": [{"run": ".venv/bin/python -m ops.teardown dev"}]},
        }
    }
    ops = reach.operations("old-deploy.yml", old_jobs, ["dev"])
    problems = reach.violations(ops, {"dev": single_stack, "dev-cluster": layers["dev-cluster"]})
    for job in ("dev-aws", "preview"):
        mine = [p for p in problems if f"job {job!r}" in p]
        assert any(p.endswith("although --exclude names it") and "rule 1" in p for p in mine), job
        assert any("rule 2" in p and "helm.sh/v4:Chart" in p for p in mine), job
        # The exclusion did take every plain Kubernetes object out (rule 3 follows providers and depends_on) ...
        assert not any("is registered through the cluster's provider" in p for p in mine), job
    # ... and the old hosted teardown destroyed Kubernetes objects it could not reach.
    assert any("job 'teardown'" in p and "rule 4" in p for p in problems)
    # The same job, on the in-VPC runner, is fine.
    old_jobs["jobs"]["dev-aws"]["runs-on"] = (
        "codebuild-llmp-dev-deployer-${{ github.run_id }}-${{ github.run_attempt }}"
    )
    assert not [
        p for p in reach.violations(reach.operations("x", old_jobs, ["dev"]), {"dev": single_stack}) if "dev-aws" in p
    ]


def test_exclude_dependents_follows_providers_parents_and_component_children() -> None:
    k8s = "pulumi:providers:kubernetes::cluster-k8s"
    resources = [
        reach.Registered(k8s, "pulumi:providers:kubernetes", custom=True),
        reach.Registered("llm-platform:infra:KubernetesBase::base", "llm-platform:infra:KubernetesBase", custom=False),
        reach.Registered(
            "kubernetes:core/v1:Namespace::ns",
            "kubernetes:core/v1:Namespace",
            custom=True,
            provider=k8s,
            parent="llm-platform:infra:KubernetesBase::base",
        ),
        # depends_on the component: on its children (rule 3), so excluded with them.
        reach.Registered(
            "aws:s3/bucket:Bucket::b",
            "aws:s3/bucket:Bucket",
            custom=True,
            depends_on=["llm-platform:infra:KubernetesBase::base"],
        ),
        reach.Registered("aws:s3/bucket:Bucket::free", "aws:s3/bucket:Bucket", custom=True),
    ]
    excluded = reach._excluded(resources, [f"urn:pulumi:dev::p::{k8s}"], dependents=True)
    assert excluded == {k8s, "kubernetes:core/v1:Namespace::ns", "aws:s3/bucket:Bucket::b"}
    assert reach._excluded(resources, [f"urn:pulumi:dev::p::{k8s}"], dependents=False) == {k8s}


def test_the_workflow_reader_expands_matrices_inputs_and_env() -> None:
    wf = {
        "env": {"WHERE": "stacks"},
        "jobs": {
            "m": {
                "runs-on": "ubuntu-latest",
                "strategy": {"matrix": {"stack": ["dev", "prod"]}},
                "steps": [
                    {
                        "env": {"S": "${{ matrix.stack }}-cluster"},
                        "run": 'pulumi up --yes -s "$S" --config-file $WHERE/x',
                    },
                    {"env": {"STACK": "${{ inputs.stack }}"}, "run": 'python -m ops.teardown "$STACK" --layer cluster'},
                ],
            }
        },
    }
    ops = reach.operations("w.yml", wf, ["dev", "prod"])
    assert {(op.command, op.stack) for op in ops} == {
        ("up", "dev-cluster"),
        ("up", "prod-cluster"),
        ("destroy", "dev-cluster"),
        ("destroy", "prod-cluster"),
    }
    assert all(not op.in_vpc for op in ops)
    assert (
        len(
            reach.violations(
                ops,
                {s: [reach.Registered("x", reach.K8S_PROVIDER_TYPE, True)] for s in ("dev-cluster", "prod-cluster")},
            )
        )
        == 4
    )


def test_the_runbooks_layer_commands_parse_and_name_each_layers_stack() -> None:
    """Every `pulumi up/preview/destroy` and `python -m ops.teardown` line of the runbooks: the teardown arguments
    parse, and a cluster-layer Pulumi command reads the environment's one stack file."""
    import shlex

    from ops import teardown
    from tests.helpers import DOCS_DIR

    pulumi_lines, teardown_lines = [], []
    for doc in ("first-deploy.md", "operations.md"):
        for raw in (DOCS_DIR / doc).read_text().splitlines():
            line = raw.strip().split("  #", 1)[0].strip()
            if line.startswith(("pulumi up", "pulumi preview", "pulumi destroy")):
                pulumi_lines.append(line)
            elif line.startswith("python -m ops.teardown"):
                teardown_lines.append(line)
    assert pulumi_lines and teardown_lines
    for line in pulumi_lines:
        argv = shlex.split(line)
        stack = argv[argv.index("--stack") + 1]
        assert "--exclude" not in argv and "--target" not in argv, line
        if stack.endswith("-cluster"):
            env = stack.removesuffix("-cluster")
            assert argv[argv.index("--config-file") + 1] == f"stacks/Pulumi.{env}.yaml", line
        else:
            assert (Path(__file__).resolve().parents[2] / "stacks" / f"Pulumi.{stack}.yaml").exists(), line
    for line in teardown_lines:
        args = teardown.parser().parse_args(shlex.split(line)[3:])
        assert args.layer in teardown.LAYERS
        assert not args.cluster_unreachable or args.layer == "aws", line
