"""How the deployer reaches the Kubernetes API, chosen by `kubernetesDeployer`, and the offline proof that it can.

The Kubernetes objects of a stack are applied through the cluster's Kubernetes provider, so whatever runs
`pulumi up` must reach the cluster endpoint:

- `in-vpc-runner` (default; the only path for a private-only endpoint): the AWS layer creates an AWS CodeBuild project
  that hosts GitHub Actions runners in its private subnets (CodeBuild User Guide, "Self-hosted GitHub Actions runners
  in AWS CodeBuild": a webhook on WORKFLOW_JOB_QUEUED, jobs select it with
  `runs-on: codebuild-<project>-${{ github.run_id }}-${{ github.run_attempt }}`). The deploy workflow runs
  `pulumi up --stack <env>` (the AWS layer: the VPC, the cluster, the runner, every AWS resource) on a GitHub-hosted
  runner, then `pulumi up --stack <env>-cluster` (the cluster layer, infra/layers.py) on the in-VPC runner, which
  reaches the private endpoint (the API security group admits HTTPS from the VPC CIDR, infra/cluster.py).
- `public-allowlist`: the public endpoint restricted to `publicApiCidrs`, the public egress addresses of whoever
  deploys (a workstation). GitHub-hosted runners have no stable address, so CI never uses this path.

`deployer_path_problems` checks a stack's recorded resources and the deploy workflow together; the tests run it
over every shipped stack and fail when Kubernetes objects would be applied from somewhere that cannot reach them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from facts import pulumi_types as tok
from infra.config import StackConfig, non_routable
from infra.identity import service_trust
from infra.layers import KUBERNETES_PROVIDER_NAME

RUNNER_IMAGE = "aws/codebuild/amazonlinux-x86_64-standard:5.0"
"""CodeBuild's curated Amazon Linux image (CodeBuild User Guide, "Docker images provided by CodeBuild"); the
workflow installs Python and the Pulumi CLI itself."""
RUNNER_COMPUTE = "BUILD_GENERAL1_MEDIUM"
"""4 vCPUs, 7 GB: a Pulumi program of this size with pulumi-aws and pulumi-kubernetes plugins."""
RUNNER_TIMEOUT_MINUTES = 150
"""Above the deploy jobs' own timeouts (120 min for prod), so the workflow's limit is the one that applies."""


def runner_project_name(name_prefix: str) -> str:
    """The CodeBuild project of a stack's in-VPC runner (`StackConfig.name_prefix` + `-deployer`)."""
    return f"{name_prefix}-deployer"


def runner_label(project_name: str) -> str:
    """The `runs-on` label that routes a job to the CodeBuild project (CodeBuild User Guide, action-runner)."""
    return f"codebuild-{project_name}-${{{{ github.run_id }}}}-${{{{ github.run_attempt }}}}"


def kubernetes_provider_urn(stack: str, project: str) -> str:
    """URN of the cluster's Kubernetes provider in the cluster-layer stack `stack` (a top-level resource there;
    infra/layers.py)."""
    return f"urn:pulumi:{stack}::{project}::pulumi:pulumi:Stack$pulumi:providers:kubernetes::{KUBERNETES_PROVIDER_NAME}"


@dataclass
class DeployerRunnerArgs:
    name_prefix: str
    """Prefix of the project, role and security group names."""
    stack: str
    region: str
    repository: str
    """GitHub repository whose workflow jobs the runner takes (deployerRepository)."""
    log_retention_days: int
    """Retention of the runner's build logs (the VPC's flow-log retention)."""
    vpc_id: pulumi.Input[str]
    private_subnet_ids: pulumi.Input[list[str]]
    """Subnets the runner's builds run in: the EKS API's private endpoint is reachable from them."""
    account_id: str
    partition: str
    tags: dict[str, str]


class DeployerRunner(pulumi.ComponentResource):
    """A CodeBuild-hosted GitHub Actions runner in the stack's private subnets. Its role can only run the build
    (logs, VPC network interfaces); the deploy job itself assumes the deploy role through GitHub OIDC as on
    GitHub-hosted runners, so the runner holds no deploy rights of its own."""

    project_name: pulumi.Output[str]
    """The CodeBuild project: the deploy workflow's `runs-on` label names it (runner_label)."""

    def __init__(self, name: str, args: DeployerRunnerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:DeployerRunner", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        project_name = runner_project_name(args.name_prefix)
        log_group = aws.cloudwatch.LogGroup(
            f"{name}-logs",
            name=f"/aws/codebuild/{project_name}",
            retention_in_days=args.log_retention_days,
            tags=args.tags,
            opts=child,
        )
        security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            name=f"{args.name_prefix}-deployer",
            description="Deploy runner: HTTPS egress only (GitHub, state backend, AWS APIs, the EKS API)",
            vpc_id=args.vpc_id,
            ingress=[],
            egress=[
                aws.ec2.SecurityGroupEgressArgs(
                    protocol="tcp", from_port=443, to_port=443, cidr_blocks=["0.0.0.0/0"], description="HTTPS"
                )
            ],
            tags={**args.tags, "Name": f"{args.name_prefix}-deployer"},
            opts=child,
        )
        role = aws.iam.Role(
            f"{name}-role",
            name=f"{args.name_prefix}-deployer-runner",
            # Confused-deputy guard (IAM User Guide, "Cross-service confused deputy prevention").
            assume_role_policy=service_trust(
                "codebuild.amazonaws.com", condition={"StringEquals": {"aws:SourceAccount": args.account_id}}
            ),
            tags=args.tags,
            opts=child,
        )
        region = args.region
        policy = pulumi.Output.all(log_group.arn, args.private_subnet_ids).apply(
            lambda a: json.dumps(_runner_policy(a[0], a[1], args.partition, region, args.account_id))
        )
        role_policy = aws.iam.RolePolicy(f"{name}-policy", role=role.id, policy=policy, opts=child)
        project = aws.codebuild.Project(
            f"{name}-project",
            name=project_name,
            description=f"GitHub Actions runner for the Kubernetes layer of stack {args.stack} (inside its VPC)",
            service_role=role.arn,
            artifacts=aws.codebuild.ProjectArtifactsArgs(type="NO_ARTIFACTS"),
            environment=aws.codebuild.ProjectEnvironmentArgs(
                compute_type=RUNNER_COMPUTE, image=RUNNER_IMAGE, type="LINUX_CONTAINER"
            ),
            source=aws.codebuild.ProjectSourceArgs(type="GITHUB", location=args.repository),
            vpc_config=aws.codebuild.ProjectVpcConfigArgs(
                vpc_id=args.vpc_id, subnets=args.private_subnet_ids, security_group_ids=[security_group.id]
            ),
            logs_config=aws.codebuild.ProjectLogsConfigArgs(
                cloudwatch_logs=aws.codebuild.ProjectLogsConfigCloudwatchLogsArgs(
                    group_name=log_group.name, status="ENABLED"
                )
            ),
            build_timeout=RUNNER_TIMEOUT_MINUTES,
            tags=args.tags,
            # The role's VPC permissions must exist before CodeBuild validates the VPC configuration.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[role_policy]),
        )
        aws.codebuild.Webhook(
            f"{name}-webhook",
            project_name=project.name,
            build_type="BUILD",
            filter_groups=[
                aws.codebuild.WebhookFilterGroupArgs(
                    filters=[aws.codebuild.WebhookFilterGroupFilterArgs(type="EVENT", pattern="WORKFLOW_JOB_QUEUED")]
                )
            ],
            opts=child,
        )
        self.project_name = project.name
        self.register_outputs({"project_name": self.project_name})


def _runner_policy(
    log_group_arn: str, subnet_ids: list[str], partition: str, region: str, account: str
) -> dict[str, Any]:
    """Logs, plus the network-interface permissions a VPC-attached CodeBuild project needs (CodeBuild User Guide,
    "Allow CodeBuild access to AWS services required to create a VPC network interface")."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Logs",
                "Effect": "Allow",
                "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                "Resource": [log_group_arn, f"{log_group_arn}:*"],
            },
            {
                "Sid": "VpcDescribe",
                "Effect": "Allow",
                "Action": [
                    "ec2:CreateNetworkInterface",
                    "ec2:DescribeDhcpOptions",
                    "ec2:DescribeNetworkInterfaces",
                    "ec2:DeleteNetworkInterface",
                    "ec2:DescribeSubnets",
                    "ec2:DescribeSecurityGroups",
                    "ec2:DescribeVpcs",
                ],
                "Resource": "*",
            },
            {
                "Sid": "VpcInterfacePermission",
                "Effect": "Allow",
                "Action": "ec2:CreateNetworkInterfacePermission",
                "Resource": f"arn:{partition}:ec2:{region}:{account}:network-interface/*",
                "Condition": {
                    "StringEquals": {"ec2:AuthorizedService": "codebuild.amazonaws.com"},
                    "ArnEquals": {
                        "ec2:Subnet": [f"arn:{partition}:ec2:{region}:{account}:subnet/{s}" for s in subnet_ids]
                    },
                },
            },
        ],
    }


# -- the offline proof -----------------------------------------------------------------------------------------------
def deployer_path_problems(
    cfg: StackConfig, resources: list[Any], workflow: Mapping[str, Any], cluster_resources: list[Any] | None = None
) -> list[str]:
    """Why the deploy workflow could not apply this environment's cluster layer (empty: it can).

    `resources` are the recorded resources of the environment's AWS layer (ops.mocks.Recorded), `cluster_resources`
    its cluster layer's (default: the Kubernetes ones among `resources`); `workflow` the parsed deploy workflow.
    Whether any job outside the VPC needs the cluster's API is tests/infra/test_engine_rules.py's (infra/reach.py)."""
    from infra.layers import cluster_stack
    from infra.reach import operations

    stack = cfg.stack
    problems: list[str] = []
    by_type: dict[str, list[Any]] = {}
    for r in resources:
        by_type.setdefault(r.type, []).append(r)
    k8s = (
        cluster_resources
        if cluster_resources is not None
        else [r for r in resources if r.type.startswith("kubernetes:")]
    )
    # Every Kubernetes object goes through the cluster layer's provider; one on the default provider would use
    # whatever kubeconfig the runner happens to have.
    suffix = f"pulumi:providers:kubernetes::{KUBERNETES_PROVIDER_NAME}"
    for r in k8s:
        if r.type.startswith("kubernetes:") and suffix not in (r.provider or ""):
            problems.append(
                f"{r.type} {r.name} is not applied through {KUBERNETES_PROVIDER_NAME} (provider {r.provider!r})"
            )
    [cluster] = by_type.get(tok.EKS_CLUSTER, [None])
    if cluster is None:
        return [*problems, "the stack declares no EKS cluster"]
    vpc_cfg = cluster.inputs.get("vpcConfig", {})

    ops = operations("deploy.yml", workflow, [stack])
    jobs = workflow.get("jobs", {})
    aws_jobs = {op.job for op in ops if op.command == "up" and op.stack == stack}
    if not aws_jobs:
        problems.append(f"no job of the deploy workflow applies the AWS layer of {stack}")
    applying = [op for op in ops if op.command == "up" and op.stack == cluster_stack(stack)]
    for op in applying:
        labels = [lbl for lbl in op.runs_on.split(",") if lbl.startswith("codebuild-")]
        if not labels:
            problems.append(
                f"job {op.job!r} applies the cluster layer {cluster_stack(stack)} from a GitHub-hosted runner "
                f"({op.runs_on}), which has no route to a private endpoint and no stable address for an allowlist"
            )
            continue
        needs = jobs.get(op.job, {}).get("needs") or []
        needs = [needs] if isinstance(needs, str) else list(needs)
        if not aws_jobs & set(needs):
            problems.append(f"job {op.job!r} applies the cluster layer without needing the AWS layer's job first")
        problems += _in_vpc_runner_problems(cfg, op.job, labels[0], by_type, vpc_cfg)
    if not applying:
        problems.append(f"no job of the deploy workflow applies the cluster layer {cluster_stack(stack)}")
    if cfg.cluster.deployer == "public-allowlist":
        problems += _public_allowlist_problems(cfg, vpc_cfg)
    return problems


def _in_vpc_runner_problems(
    cfg: StackConfig, job_id: str, label: str, by_type: dict[str, list[Any]], vpc_cfg: Mapping[str, Any]
) -> list[str]:
    problems = []
    if cfg.cluster.deployer != "in-vpc-runner":
        problems.append(
            f"job {job_id!r} uses an in-VPC runner but the stack's kubernetesDeployer is {cfg.cluster.deployer}"
        )
    projects = {p.inputs.get("name"): p for p in by_type.get(tok.CODEBUILD_PROJECT, [])}
    name = next((n for n in projects if label == runner_label(n)), None)
    if name is None:
        return [
            *problems,
            f"job {job_id!r} runs on {label!r}, which is no CodeBuild runner project this stack declares",
        ]
    project = projects[name]
    subnets = set(project.inputs.get("vpcConfig", {}).get("subnets") or [])
    if not subnets or subnets - set(vpc_cfg.get("subnetIds") or []):
        problems.append(f"runner project {name} is not in the cluster's private subnets")
    if vpc_cfg.get("endpointPrivateAccess") is not True:
        problems.append("the cluster's private endpoint is off: the in-VPC runner could not reach it")
    webhooks = by_type.get(tok.CODEBUILD_WEBHOOK, [])
    if not any(
        w.inputs.get("projectName") == name
        and any(
            f.get("pattern") == "WORKFLOW_JOB_QUEUED" for g in w.inputs.get("filterGroups", []) for f in g["filters"]
        )
        for w in webhooks
    ):
        problems.append(f"runner project {name} has no WORKFLOW_JOB_QUEUED webhook: no job would ever reach it")
    # The API security group must admit HTTPS from the VPC (where the runner's interfaces are).
    vpc_cidr = ipaddress.ip_network(cfg.network.vpc_cidr)
    api_sg_ok = any(
        rule.get("fromPort", 0) <= 443 <= rule.get("toPort", 0)
        and any(vpc_cidr.subnet_of(ipaddress.ip_network(c)) for c in rule.get("cidrBlocks") or [])
        for sg in by_type.get(tok.EC2_SECURITY_GROUP, [])
        if sg.name.endswith("-api-sg")
        for rule in sg.inputs.get("ingress") or []
    )
    if not api_sg_ok:
        problems.append("no security group on the EKS API admits HTTPS from the VPC CIDR")
    return problems


def _public_allowlist_problems(cfg: StackConfig, vpc_cfg: Mapping[str, Any]) -> list[str]:
    problems = []
    if vpc_cfg.get("endpointPublicAccess") is not True:
        problems.append("kubernetesDeployer is public-allowlist but the cluster's public endpoint is off")
    cidrs = vpc_cfg.get("publicAccessCidrs") or []
    if not cidrs:
        problems.append("kubernetesDeployer is public-allowlist but the public endpoint allows no CIDR")
    for cidr in cidrs:
        why = non_routable(ipaddress.ip_network(cidr))
        if why:
            problems.append(f"the public endpoint allows {cidr}: {why}")
    return problems
