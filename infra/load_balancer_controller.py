"""The AWS Load Balancer Controller (its eks-charts chart) with its Pod Identity role, installed when the stack
exposes serving through an internal ALB Ingress (`servingIngress: true`): without it the Ingress does nothing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from facts.cluster import KUBE_SYSTEM
from infra.charts import SYSTEM_NODE_SELECTOR, controller_identity, install_chart

CHART = "aws-load-balancer-controller"
SERVICE_ACCOUNT = "aws-load-balancer-controller"
INGRESS_CLASS = "alb"
"""The IngressClass the chart creates (`ingressClass`, `createIngressClassResource`); infra/serving_eks.py's Ingress
names it."""

IAM_POLICY_FILE = Path(__file__).resolve().parent / "upstream" / "aws-load-balancer-controller-v3.5.0-iam_policy.json"
IAM_POLICY_SHA256 = "16f232c9d9f79366fe949c4550ad517a202380058a9e48d45a4e215044a20a6a"
"""kubernetes-sigs/aws-load-balancer-controller docs/install/iam_policy.json at tag v3.5.0 (commit 5982613), the
controller release chart 3.5.0 installs, kept verbatim: AWS's install guide has every user apply exactly this file.
It scopes every mutating call to resources tagged `elbv2.k8s.aws/cluster`, which the controller sets on what it
creates. The digest pins the copy; a chart bump replaces the file and the digest together."""


def load_balancer_controller_policy() -> str:
    text = IAM_POLICY_FILE.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != IAM_POLICY_SHA256:
        raise ValueError(f"{IAM_POLICY_FILE.name} has sha256 {digest}, expected {IAM_POLICY_SHA256} (upstream v3.5.0)")
    return text


def load_balancer_controller_values(args: LoadBalancerControllerArgs, cluster_name: str, vpc_id: str) -> dict[str, Any]:
    """Values over aws/eks-charts stable/aws-load-balancer-controller/values.yaml (chart 3.5.0, commit 5239609).
    Region and VPC are given so the controller does not need IMDS, which the nodes' hop limit of 1 keeps from pods."""
    return {
        "clusterName": cluster_name,
        "region": args.region,
        "vpcId": vpc_id,
        "serviceAccount": {"create": True, "name": SERVICE_ACCOUNT},
        "ingressClass": INGRESS_CLASS,
        "createIngressClassResource": True,
        "nodeSelector": dict(SYSTEM_NODE_SELECTOR),
        # Two replicas (leader election) on the system pool: its admission webhook must answer for pods to start.
        "replicaCount": 2,
        # Load balancers, target groups and security groups it creates carry the stack tags (cost allocation, the
        # teardown sweep), besides the elbv2.k8s.aws/cluster tag it always sets.
        "defaultTags": dict(args.tags),
        # The webhook's certificate survives every `up`: the chart generates a new CA per render (genCA in
        # templates/_helpers.tpl) unless it finds its own Secret with `lookup`, which helm.v4.Chart enables by
        # rendering with a server-side dry run (pulumi-kubernetes provider/pkg/provider/helm/v4/chart.go,
        # "use server-side dry-run to enable the lookup function"). The first install generates it once.
        "keepTLSSecret": True,
        "enableCertManager": False,
    }


@dataclass(kw_only=True)
class LoadBalancerControllerIdentityArgs:
    name_prefix: str
    """Prefix of the controller's IAM role name."""
    cluster_name: pulumi.Input[str]
    """EKS cluster the Pod Identity association belongs to."""
    tags: dict[str, str]
    """Stack tags for every taggable AWS resource."""
    account_id: str
    """Account of the stack: the controller's role trusts Pod Identity from this account only."""


class LoadBalancerControllerIdentity(pulumi.ComponentResource):
    """The controller's AWS half (AWS layer, infra/layers.py): its Pod Identity role and association."""

    role_arn: pulumi.Output[str]
    """The controller's Pod Identity role (upstream IAM policy, pinned by digest)."""

    def __init__(
        self, name: str, args: LoadBalancerControllerIdentityArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-platform:infra:LoadBalancerControllerIdentity", name, None, opts)
        role = controller_identity(
            self,
            name,
            role_name=f"{args.name_prefix}-aws-load-balancer-controller",
            policy=load_balancer_controller_policy(),
            cluster_name=args.cluster_name,
            namespace=KUBE_SYSTEM,
            service_account=SERVICE_ACCOUNT,
            tags=args.tags,
            account_id=args.account_id,
        )
        self.role_arn = role.arn
        self.register_outputs({"role_arn": self.role_arn})


@dataclass(kw_only=True)
class LoadBalancerControllerArgs:
    region: str
    """Region the controller manages load balancers in (given, so it needs no IMDS)."""
    cluster_name: pulumi.Input[str]
    """EKS cluster name: the controller tags what it creates with it, and the IAM policy keys on that tag."""
    vpc_id: pulumi.Input[str]
    """VPC of the cluster."""
    provider: k8s.Provider
    """Kubernetes provider of the cluster (cluster layer)."""
    tags: dict[str, str]
    """Stack tags: the controller sets them on the load balancers it creates."""


class LoadBalancerController(pulumi.ComponentResource):
    """The AWS Load Balancer Controller on the system pool (cluster layer: its chart; the role is
    LoadBalancerControllerIdentity's): turns the serving Ingress into an internal ALB."""

    chart: k8s.helm.v4.Chart
    """The Helm chart release; the serving Deployment depends on it so its Ingress has a controller."""

    def __init__(self, name: str, args: LoadBalancerControllerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:LoadBalancerController", name, None, opts)
        self.chart = install_chart(
            f"{name}-chart",
            CHART,
            KUBE_SYSTEM,
            pulumi.Output.all(args.cluster_name, args.vpc_id).apply(
                lambda a: load_balancer_controller_values(args, a[0], a[1])
            ),
            pulumi.ResourceOptions(parent=self, provider=args.provider),
        )
        self.register_outputs({})
