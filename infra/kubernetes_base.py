"""What every workload on the cluster relies on: namespaces, service accounts with AWS access through EKS Pod Identity,
GPU quotas and default-deny network policies, written as plain objects (infra/k8s_objects.py). (The device plugins
come from their charts: infra/gpu_plugins.py.)

Everything goes through the cluster's explicit provider, so nothing here can land on whatever cluster the operator's
current kubeconfig context happens to point at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from facts.cluster import (
    GPU_RESOURCE,
    PREPARE_SERVICE_ACCOUNT,
    SERVING_NAMESPACE,
    SERVING_OPS_PORT,
    SERVING_PORT,
    SERVING_SERVICE_ACCOUNT,
    TRAINING_METRICS_PORT,
    TRAINING_NAMESPACE,
    TRAINING_SERVICE_ACCOUNT,
)
from infra import k8s_objects
from infra.config import ClusterConfig, NetworkConfig, ObservabilityConfig, ServingConfig
from infra.k8s_objects import MANAGED_BY
from infra.network import plan_collector_subnets

SERVING_ACCESS_LABEL = "llm-platform/serving-access"
"""Namespaces labelled `llm-platform/serving-access: allowed` may call the serving pods (clients, monitoring, the
ingress controller's namespace). The serving namespace carries it itself."""

TRAINING_METRICS_ACCESS_LABEL = "llm-platform/training-metrics-access"
"""Namespaces labelled `llm-platform/training-metrics-access: allowed` (monitoring) may scrape the trainer's metrics
port in the training namespace; nothing else from outside the namespace reaches training pods."""

POD_IDENTITY_AGENT_CIDR = "169.254.170.23/32"
"""The EKS Pod Identity agent's link-local address (host network) that pods fetch their credentials from."""


@dataclass(kw_only=True)
class KubernetesBaseArgs:
    cluster: ClusterConfig
    """Kubernetes version (Pod Security labels) and GPU pools (the quotas are their maximum GPUs)."""
    network: NetworkConfig
    """VPC CIDR and zone count: the managed collector's subnets, and the internal ALB's sources."""
    serving: ServingConfig
    """Whether serving has an internal ALB Ingress (its ENIs must reach the serving pods)."""
    observability: ObservabilityConfig
    """The metrics mode: with `amp`, the managed collector's subnets may scrape the workloads."""
    region: str
    """AWS region: its S3 prefix list is what the workloads may reach."""
    provider: k8s.Provider
    """Explicit provider for the cluster (cluster layer, built from the AWS layer's outputs)."""


class KubernetesBase(pulumi.ComponentResource):
    """The training and serving namespaces (Pod Security levels), their service accounts with AWS access through EKS
    Pod Identity, a GPU quota per namespace, and default-deny network policies with the few flows each workload
    needs. Every object goes through the cluster's explicit provider."""

    training_namespace: str
    """Name of the training namespace."""
    serving_namespace: str
    """Name of the serving namespace."""
    training_service_account: str
    """Service account training pods run as (the training role's credentials through Pod Identity)."""
    serving_service_account: str
    """Service account serving pods run as (the serving role's credentials through Pod Identity)."""
    namespaces: dict[str, k8s.core.v1.Namespace]
    """The two Namespace resources, by purpose ("training", "serving"): depend on these, or on their
    `metadata.name`, to order objects after the namespace exists."""
    service_accounts: dict[str, k8s.core.v1.ServiceAccount]
    """The ServiceAccount resources, by purpose ("training", "serving", "prepare")."""

    def __init__(self, name: str, args: KubernetesBaseArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:KubernetesBase", name, None, opts)
        self._name = name
        self._args = args
        self._k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider)

        self.training_namespace = TRAINING_NAMESPACE
        self.serving_namespace = SERVING_NAMESPACE
        self.training_service_account = TRAINING_SERVICE_ACCOUNT
        self.serving_service_account = SERVING_SERVICE_ACCOUNT

        # Training runs "baseline": it forbids privileged pods, host namespaces and hostPath, but training launchers
        # and operators (PyTorchJob, debugging shells) do not all set the seccomp/capability fields "restricted"
        # demands; "restricted" is warned and audited so the gap is visible. Serving runs "restricted": we write its
        # pod spec and it complies (non-root, no privilege escalation, all capabilities dropped, RuntimeDefault).
        self.namespaces = {
            "training": self._namespace("training", TRAINING_NAMESPACE, enforce="baseline", extra={}),
            "serving": self._namespace(
                "serving", SERVING_NAMESPACE, enforce="restricted", extra={SERVING_ACCESS_LABEL: "allowed"}
            ),
        }
        self.service_accounts = {
            "training": self._service_account("training", TRAINING_SERVICE_ACCOUNT),
            "serving": self._service_account("serving", SERVING_SERVICE_ACCOUNT),
            # Data preparation runs in the training namespace (its network policies: S3 and the Pod Identity agent)
            # as its own account, so its pods get the prepare role, not the trainer's.
            "prepare": self._service_account("training", PREPARE_SERVICE_ACCOUNT, key="prepare"),
        }
        self._create_gpu_quotas()
        self._create_network_policies()

        self.register_outputs(
            {
                "training_namespace": self.training_namespace,
                "serving_namespace": self.serving_namespace,
                "training_service_account": self.training_service_account,
                "serving_service_account": self.serving_service_account,
            }
        )

    # -- namespaces and identities ---------------------------------------------------------------------------------
    def _namespace(self, key: str, ns: str, enforce: str, extra: dict[str, str]) -> k8s.core.v1.Namespace:
        version = f"v{self._args.cluster.kubernetes_version}"
        labels = {
            **MANAGED_BY,
            "pod-security.kubernetes.io/enforce": enforce,
            "pod-security.kubernetes.io/enforce-version": version,
            "pod-security.kubernetes.io/warn": "restricted",
            "pod-security.kubernetes.io/audit": "restricted",
            **extra,
        }
        return self._object(
            f"{self._name}-{key}-ns",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": k8s_objects.metadata(ns, labels=labels)},
        )

    def _service_account(self, namespace: str, sa: str, key: str | None = None) -> k8s.core.v1.ServiceAccount:
        """A service account in namespace `namespace` ("training", "serving"); its Pod Identity association
        (WorkloadIdentities, AWS layer) already exists, so pods using it get the role's credentials from the Pod
        Identity agent. No IRSA annotation, no OIDC provider."""
        ns = self.namespaces[namespace]
        return self._object(
            f"{self._name}-{key or namespace}-sa",
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": k8s_objects.metadata(sa, ns.metadata.name, MANAGED_BY),
                # Neither workload talks to the Kubernetes API; Pod Identity mounts its own token, not this one.
                "automountServiceAccountToken": False,
            },
        )

    # -- GPUs ------------------------------------------------------------------------------------------------------
    def _create_gpu_quotas(self) -> None:
        """Each namespace may request at most the GPUs its pool can ever offer: a runaway job queues instead of
        starving the other purpose, and the quota documents the budget in the cluster itself."""
        pools = {p.purpose: p for p in self._args.cluster.gpu_pools}
        for key, purpose in (("training", "training"), ("serving", "inference")):
            ns = self.namespaces[key]
            self._object(
                f"{self._name}-{key}-gpu-quota",
                {
                    "apiVersion": "v1",
                    "kind": "ResourceQuota",
                    "metadata": k8s_objects.metadata("gpu", ns.metadata.name, MANAGED_BY),
                    # Extended resources can only be quota'd on requests (they cannot be overcommitted anyway).
                    "spec": {"hard": {f"requests.{GPU_RESOURCE}": str(pools[purpose].max_gpus)}},
                },
            )

    # -- network policies ------------------------------------------------------------------------------------------
    def _create_network_policies(self) -> None:
        """Default deny in both directions, then the few flows each workload needs. Enforced by the VPC CNI's network
        policy agent (enabled on the vpc-cni add-on). EFA traffic bypasses the kernel network stack and is not
        subject to these policies; the training pool's security group governs it.

        Egress is DNS, the Pod Identity agent and S3 (data, checkpoints, models) only. Neither workload calls the
        Kubernetes API (no service-account token is mounted) nor any other AWS API: credentials come from the agent,
        which calls eks-auth from the host network; images are pulled by the kubelet, also on the host network, so
        the ECR/STS/Logs interface endpoints need no pod egress."""
        args = self._args
        s3_egress = s3_cidrs(args.region).apply(
            lambda cidrs: {
                "to": [{"ipBlock": {"cidr": c}} for c in cidrs],
                "ports": [{"protocol": "TCP", "port": 443}],
            }
        )
        for key in ("training", "serving"):
            self._policy(key, "default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
            self._policy(key, "allow-dns", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [_DNS_EGRESS]})
            self._policy(
                key,
                "allow-aws-egress",
                {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [
                        # S3 through the gateway endpoint: the traffic keeps S3's public addresses (the region's
                        # `com.amazonaws.<region>.s3` prefix list), so that list is what the policy names.
                        s3_egress,
                        # The Pod Identity agent (host network, link-local): a default-deny egress cuts pods off from
                        # their AWS credentials unless this is allowed explicitly.
                        {
                            "to": [{"ipBlock": {"cidr": POD_IDENTITY_AGENT_CIDR}}],
                            "ports": [{"protocol": "TCP", "port": 80}],
                        },
                    ],
                },
            )
        # torchrun rendezvous, NCCL over TCP, and checkpoint coordination use arbitrary ports between the job's pods.
        self._policy(
            "training",
            "allow-within-namespace",
            {
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"podSelector": {}}]}],
                "egress": [{"to": [{"podSelector": {}}]}],
            },
        )
        # Prometheus scrapes the trainer's metrics port: from the monitoring namespace (in-cluster), or from the
        # managed collector's ENIs (AMP), which live in their own subnets (infra.network.plan_collector_subnets)
        # where no pod ever gets an address: those CIDRs admit the collector and nothing else.
        collectors: list[dict[str, Any]] = []
        if args.observability.metrics == "amp":
            collectors = [
                {"ipBlock": {"cidr": c}} for c in plan_collector_subnets(args.network.vpc_cidr, args.network.az_count)
            ]
        scrapers: list[dict[str, Any]] = [
            {"namespaceSelector": {"matchLabels": {TRAINING_METRICS_ACCESS_LABEL: "allowed"}}},
            *collectors,
        ]
        self._policy(
            "training",
            "allow-metrics-ingress",
            {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": scrapers, "ports": [{"protocol": "TCP", "port": TRAINING_METRICS_PORT}]}],
            },
        )
        # ... and the serving pods' operations port (/metrics, probes: facts.cluster.SERVING_OPS_PORT) from the same
        # scrapers only: client namespaces never reach /metrics (its prefix-cache counters are a cross-key oracle)
        self._policy(
            "serving",
            "allow-metrics-ingress",
            {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": scrapers, "ports": [{"protocol": "TCP", "port": SERVING_OPS_PORT}]}],
            },
        )
        # Clients in namespaces labelled as allowed (the serving namespace itself, monitoring, client apps), and the
        # managed collector's subnets in AMP mode.
        sources: list[dict[str, Any]] = [
            {"namespaceSelector": {"matchLabels": {SERVING_ACCESS_LABEL: "allowed"}}},
            *collectors,
        ]
        if args.serving.ingress:
            # The internal ALB (target type ip) connects from its own ENIs in the VPC's subnets, which no pod or
            # namespace selector matches. With the VPC CNI pods share that range, so this admits the whole VPC on
            # 8080: the API keys, not the network, are the gate then.
            sources.append({"ipBlock": {"cidr": args.network.vpc_cidr}})
        self._policy(
            "serving",
            "allow-http-ingress",
            {
                "podSelector": {},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": sources, "ports": [{"protocol": "TCP", "port": SERVING_PORT}]}],
            },
        )

    def _policy(self, key: str, policy: str, spec: dict[str, Any]) -> k8s.networking.v1.NetworkPolicy:
        return self._object(
            f"{self._name}-{key}-{policy}",
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": k8s_objects.metadata(policy, self.namespaces[key].metadata.name, MANAGED_BY),
                "spec": spec,
            },
        )

    def _object(self, resource_name: str, obj: dict[str, Any]) -> Any:
        return k8s_objects.apply(resource_name, obj, self._k8s_opts)


@dataclass(kw_only=True)
class WorkloadIdentitiesArgs:
    cluster_name: pulumi.Input[str]
    """EKS cluster the Pod Identity associations belong to."""
    training_role_arn: pulumi.Input[str]
    """IAM role the training service account's pods get (Pod Identity trust)."""
    serving_role_arn: pulumi.Input[str]
    """IAM role the serving service account's pods get (Pod Identity trust)."""
    prepare_role_arn: pulumi.Input[str]
    """IAM role the data-preparation service account's pods get (Pod Identity trust)."""
    tags: dict[str, str]
    """Stack tags for the associations."""


class WorkloadIdentities(pulumi.ComponentResource):
    """The Pod Identity associations of the training, serving and data-preparation service accounts (AWS layer,
    infra/layers.py). An association names its namespace and service account as strings and needs neither to exist
    yet (EKS User Guide, "Assign an IAM role to a Kubernetes service account"), so it is an AWS resource like any
    other and exists before the cluster layer creates the service accounts."""

    def __init__(self, name: str, args: WorkloadIdentitiesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:WorkloadIdentities", name, None, opts)
        for key, ns, sa, role_arn in (
            ("training", TRAINING_NAMESPACE, TRAINING_SERVICE_ACCOUNT, args.training_role_arn),
            ("serving", SERVING_NAMESPACE, SERVING_SERVICE_ACCOUNT, args.serving_role_arn),
            ("prepare", TRAINING_NAMESPACE, PREPARE_SERVICE_ACCOUNT, args.prepare_role_arn),
        ):
            aws.eks.PodIdentityAssociation(
                f"kubernetes-base-{key}-pod-identity",
                cluster_name=args.cluster_name,
                namespace=ns,
                service_account=sa,
                role_arn=role_arn,
                tags=args.tags,
                opts=pulumi.ResourceOptions(parent=self),
            )
        self.register_outputs({})


def s3_cidrs(region: str) -> pulumi.Output[list[str]]:
    """The address ranges of the region's S3 (its AWS-managed prefix list), sorted. Read at deploy time: AWS adds
    ranges rarely, and a `pulumi up` picks them up; until then traffic to a new range would be refused."""
    return aws.ec2.get_prefix_list_output(name=f"com.amazonaws.{region}.s3").cidr_blocks.apply(sorted)


_DNS_EGRESS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}
