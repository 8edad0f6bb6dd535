"""The platform program: one stack = one environment. `infra/__main__.py` runs it under the Pulumi engine;
`ops.preview` and the tests run it under the recording mock engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from facts.tags import stack_tags
from infra import config as config_module
from infra import k8s_objects, preflight
from infra import outputs as out
from infra.access import DeployerRunner, DeployerRunnerArgs
from infra.budgets import Budgets, BudgetsArgs
from infra.cluster import Cluster, ClusterArgs
from infra.cluster_autoscaler import ClusterAutoscaler, ClusterAutoscalerArgs
from infra.config import StackConfig
from infra.gpu_plugins import GpuDevicePlugins, GpuDevicePluginsArgs
from infra.identity import Identity, IdentityArgs
from infra.kubernetes_base import KubernetesBase, KubernetesBaseArgs
from infra.load_balancer_controller import LoadBalancerController, LoadBalancerControllerArgs
from infra.network import Network, NetworkArgs
from infra.observability import Observability, ObservabilityArgs
from infra.registry import Registry, RegistryArgs
from infra.sagemaker_endpoint import VARIANT_NAME, SageMakerEndpoint, SageMakerEndpointArgs
from infra.serving_autoscaling import ServingAutoscaling, ServingAutoscalingArgs
from infra.serving_eks import API_KEYS_SECRET, ServingOnEks, ServingOnEksArgs
from infra.spot_interruptions import NodeTerminationHandler, NodeTerminationHandlerArgs, needs_node_termination_handler
from infra.storage import Storage, StorageArgs


def image_reference(repository_url: str, tag: str, digest: str) -> str:
    """`<repository>@<digest>` when a digest is configured (what runs is exactly that image, whatever happens to tags;
    Kubernetes and SageMaker both accept this form), else `<repository>:<tag>`."""
    return f"{repository_url}@{digest}" if digest else f"{repository_url}:{tag}"


def build() -> dict[str, Any]:
    """Declare every resource of the stack and return its outputs (keys from `infra.outputs`)."""
    # Config first: a bad stack file fails here, before any resource is registered.
    cfg = config_module.from_pulumi()
    tags = stack_tags(cfg.stack, cfg.environment)
    identity_info = aws.get_caller_identity()
    partition = aws.get_partition().partition
    placement = check_before_declaring(cfg, identity_info.account_id)
    storage, network, registry, identity, cluster = declare_aws_layer(
        cfg, placement, identity_info.account_id, partition, tags
    )
    base = KubernetesBase(
        "kubernetes-base",
        KubernetesBaseArgs(
            cluster=cfg.cluster,
            network=cfg.network,
            serving=cfg.serving,
            observability=cfg.observability,
            region=cfg.region,
            cluster_name=cluster.name,
            provider=cluster.provider,
            training_role_arn=identity.training_role_arn,
            serving_role_arn=identity.serving_role_arn,
            tags=tags,
        ),
        opts=pulumi.ResourceOptions(depends_on=[cluster]),
    )
    declare_node_controllers(cfg, cluster, base, tags, identity_info.account_id)

    image = registry.repository_urls["serving"].apply(
        lambda url: image_reference(url, cfg.serving.image_tag, cfg.images.serving_digest)
    )
    serving: ServingOnEks | None = None
    endpoint: SageMakerEndpoint | None = None
    if cfg.serving.eks_declared:
        ingress_controller = declare_ingress_controller(cfg, cluster, network, base, tags, identity_info.account_id)
        keys_secret = declare_api_keys_secret(placement.api_keys, cluster, base)
        serving = ServingOnEks(
            "serving-eks",
            ServingOnEksArgs(
                serving=cfg.serving,
                cluster=cfg.cluster,
                autoscaling=cfg.autoscaling,
                region=cfg.region,
                name_prefix=cfg.name_prefix,
                tags=tags,
                provider=cluster.provider,
                namespace=base.serving_namespace,
                service_account=base.serving_service_account,
                image=image,
                models_bucket=storage.bucket_names["models"],
            ),
            # Workloads go first on destroy: their pods must leave the GPU nodes before the node groups are deleted.
            opts=pulumi.ResourceOptions(
                depends_on=[base, keys_secret, *cluster.node_groups.values(), *ingress_controller]
            ),
        )
    if cfg.serving.sagemaker_declared:
        endpoint = declare_sagemaker_endpoint(cfg, image, storage, network, identity, tags)

    observability = Observability(
        "observability",
        ObservabilityArgs(
            observability=cfg.observability,
            serving=cfg.serving,
            gpu_pools=cfg.cluster.gpu_pools,
            stack=cfg.stack,
            name_prefix=cfg.name_prefix,
            protect_data=cfg.storage.protect_data,
            cluster_name=cluster.name,
            cluster_arn=cluster.cluster.arn,
            cluster_security_group_id=cluster.security_group_id,
            # The managed collector's ENIs go into their own subnets, so the serving and training network policies
            # can admit exactly those CIDRs (network.plan_collector_subnets) instead of the whole VPC.
            private_subnet_ids=network.collector_subnet_ids,
            provider=cluster.provider,
            node_groups=cluster.node_groups,
            account_id=identity_info.account_id,
            partition=partition,
            tags=tags,
            sagemaker_endpoint_name=endpoint.endpoint_name if endpoint else None,
            sagemaker_variant_name=VARIANT_NAME,
        ),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    if serving is not None and cfg.autoscaling.serving_autoscaler == "keda":
        ServingAutoscaling(
            "serving-autoscaling",
            ServingAutoscalingArgs(
                cfg.autoscaling,
                cfg.serving,
                cluster.provider,
                base.serving_namespace,
                serving.deployment.metadata.name,
                observability.prometheus_url,
            ),
            opts=pulumi.ResourceOptions(depends_on=[serving]),
        )
    Budgets("budgets", BudgetsArgs(cfg.budget, cfg.observability.alert_emails, cfg.name_prefix, cfg.stack, tags))
    return stack_outputs(cfg, tags, storage, network, registry, identity, cluster, base, serving, endpoint)


@dataclass(frozen=True)
class Placement:
    """What the preview-time checks against the account found (infra/preflight.py)."""

    zones: list[str]
    """The availability zones the stack spreads over (azCount of the region's available ones)."""
    training_subnet_index: int
    """The zone a single-zone training pool (EFA, a capacity reservation) lives in."""
    api_keys: str | None
    """The serving API keys file from Secrets Manager, when EKS serving is declared."""


def check_before_declaring(cfg: StackConfig, account_id: str) -> Placement:
    """Preview-time checks against the account: fail now, with the fix, not 40 minutes into `up`."""
    zones = aws.get_availability_zones(state="available").names[: cfg.network.az_count]
    if len(zones) < cfg.network.az_count:
        raise config_module.ConfigError(
            f"stack '{cfg.stack}'",
            [f"{cfg.project}:azCount = {cfg.network.az_count}: region {cfg.region} has only {len(zones)} zones"],
        )
    preflight.check_version_drift(cfg)
    preflight.check_placeholders(cfg)
    training = cfg.cluster.pool("training")
    training_subnet_index = 0
    if training.capacity_reservation_id:
        training_subnet_index = preflight.reservation_zone(cfg, list(zones))
    elif training.efa:
        training_subnet_index = preflight.training_zone_index(cfg, list(zones))
    api_keys = preflight.check_serving_artifacts(cfg, account_id)
    for on, path in ((cfg.serving.on_eks, "servingOnEks"), (cfg.serving.on_sagemaker, "servingOnSagemaker")):
        if on and not cfg.serving.artifacts_configured:
            pulumi.log.warn(
                f"{path} is on but servingImageTag/servingModelPrefix are not both set: serving is not declared yet "
                "(first-run lifecycle: push the image, upload or export the model, set both; docs/first-deploy.md)"
            )
    return Placement(list(zones), training_subnet_index, api_keys)


def declare_aws_layer(
    cfg: StackConfig, placement: Placement, account_id: str, partition: str, tags: dict[str, str]
) -> tuple[Storage, Network, Registry, Identity, Cluster]:
    """The AWS resources the Kubernetes layer stands on: storage, network, registry, identity, the cluster, and the
    in-VPC deployer runner that applies the Kubernetes layer."""
    storage = Storage(
        "storage", StorageArgs(cfg.storage, cfg.name_prefix, cfg.stack, cfg.region, account_id, partition, tags)
    )
    network = Network(
        "network",
        NetworkArgs(
            network=cfg.network,
            name_prefix=cfg.name_prefix,
            stack=cfg.stack,
            region=cfg.region,
            collector_subnets=cfg.observability.metrics == "amp",
            availability_zones=placement.zones,
            kms_key_arn=storage.kms_key_arn,
            tags=tags,
            bucket_arns=storage.bucket_arns,
        ),
    )
    registry = Registry("registry", RegistryArgs(cfg.name_prefix, cfg.storage.force_destroy, storage.kms_key_arn, tags))
    identity = Identity(
        "identity",
        IdentityArgs(
            name_prefix=cfg.name_prefix,
            region=cfg.region,
            account_id=account_id,
            partition=partition,
            bucket_arns=storage.bucket_arns,
            repository_arns=registry.repository_arns,
            kms_key_arn=storage.kms_key_arn,
            tags=tags,
        ),
    )
    cluster = Cluster(
        "cluster",
        ClusterArgs(
            cluster=cfg.cluster,
            name_prefix=cfg.name_prefix,
            region=cfg.region,
            vpc_cidr=cfg.network.vpc_cidr,
            vpc_id=network.vpc_id,
            private_subnet_ids=network.private_subnet_ids,
            cluster_role_arn=identity.cluster_role_arn,
            node_role_arn=identity.node_role_arn,
            kms_key_arn=storage.kms_key_arn,
            tags=tags,
            ebs_csi_role_arn=identity.ebs_csi_role_arn,
            cluster_role_policies=identity.role_policies["cluster"],
            node_role_policies=identity.role_policies["node"],
            training_subnet_index=placement.training_subnet_index,
        ),
        # The cluster's ENIs, nodes and load balancers live in the VPC's subnets: they must go before the network
        # on destroy, which depends_on orders (destroy runs in reverse dependency order).
        opts=pulumi.ResourceOptions(depends_on=[network]),
    )
    if cfg.cluster.deployer == "in-vpc-runner":
        # The runner the deploy workflow applies the Kubernetes layer from (infra/access.py).
        DeployerRunner(
            "deployer",
            DeployerRunnerArgs(
                name_prefix=cfg.name_prefix,
                stack=cfg.stack,
                region=cfg.region,
                repository=cfg.cluster.deployer_repository,
                log_retention_days=cfg.network.flow_log_retention_days,
                vpc_id=network.vpc_id,
                private_subnet_ids=network.private_subnet_ids,
                account_id=account_id,
                partition=partition,
                tags=tags,
            ),
        )
    return storage, network, registry, identity, cluster


def declare_node_controllers(
    cfg: StackConfig, cluster: Cluster, base: KubernetesBase, tags: dict[str, str], account_id: str
) -> None:
    """What GPU nodes need besides the cluster: device plugins, the Cluster Autoscaler, the spot interruption
    handler."""
    # Without the device plugins no pod can request a GPU (or EFA device); they run on the GPU pools only.
    GpuDevicePlugins(
        "gpu-plugins",
        GpuDevicePluginsArgs(cfg.cluster.gpu_pools, cluster.provider),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    # Capacity controllers run on the system pool; they go before the node groups they scale on destroy.
    ClusterAutoscaler(
        "cluster-autoscaler",
        ClusterAutoscalerArgs(
            cluster=cfg.cluster,
            autoscaling=cfg.autoscaling,
            name_prefix=cfg.name_prefix,
            region=cfg.region,
            cluster_name=cluster.name,
            provider=cluster.provider,
            node_groups=cluster.node_groups,
            tags=tags,
            account_id=account_id,
        ),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    if needs_node_termination_handler(cfg.autoscaling, cfg.cluster):
        NodeTerminationHandler(
            "node-termination",
            NodeTerminationHandlerArgs(
                autoscaling=cfg.autoscaling,
                name_prefix=cfg.name_prefix,
                region=cfg.region,
                cluster_name=cluster.name,
                provider=cluster.provider,
                tags=tags,
                account_id=account_id,
            ),
            opts=pulumi.ResourceOptions(depends_on=[base]),
        )


def declare_ingress_controller(
    cfg: StackConfig, cluster: Cluster, network: Network, base: KubernetesBase, tags: dict[str, str], account_id: str
) -> list[pulumi.Resource]:
    """The AWS Load Balancer Controller when EKS serving has an Ingress (the internal ALB Ingress does nothing
    without the controller that turns it into a load balancer); empty otherwise."""
    if not cfg.serving.ingress:
        return []
    controller = LoadBalancerController(
        "load-balancer-controller",
        LoadBalancerControllerArgs(
            name_prefix=cfg.name_prefix,
            region=cfg.region,
            cluster_name=cluster.name,
            vpc_id=network.vpc_id,
            provider=cluster.provider,
            tags=tags,
            account_id=account_id,
        ),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    return [controller]


def declare_api_keys_secret(api_keys: str | None, cluster: Cluster, base: KubernetesBase) -> pulumi.CustomResource:
    """The keys file from Secrets Manager (checked before declaring), as the Secret the serving Deployment mounts: a
    first rollout never waits on a Secret nobody created. A Pulumi secret: encrypted in state by the stack's secrets
    provider; the keys file may hold SHA-256 digests instead of keys (docs/serving.md) so no usable key is in state."""
    return k8s_objects.apply(
        "serving-api-keys",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": k8s_objects.metadata(API_KEYS_SECRET, base.serving_namespace),
            "type": "Opaque",
            "stringData": {"keys": pulumi.Output.secret(api_keys or "")},
        },
        pulumi.ResourceOptions(provider=cluster.provider, depends_on=[base]),
    )


def declare_sagemaker_endpoint(
    cfg: StackConfig,
    image: pulumi.Input[str],
    storage: Storage,
    network: Network,
    identity: Identity,
    tags: dict[str, str],
) -> SageMakerEndpoint:
    """The SageMaker endpoint, rolled out from the variant that runs now (its instance count, a refused instance-type
    change while autoscaled)."""
    running = preflight.running_variant(cfg, f"{cfg.name_prefix}-serving", VARIANT_NAME)
    preflight.check_instance_type_change(cfg, running)
    return SageMakerEndpoint(
        "serving-sagemaker",
        SageMakerEndpointArgs(
            serving=cfg.serving,
            name_prefix=cfg.name_prefix,
            execution_role_arn=identity.sagemaker_role_arn,
            image=image,
            models_bucket=storage.bucket_names["models"],
            vpc_id=network.vpc_id,
            private_subnet_ids=network.private_subnet_ids,
            kms_key_arn=storage.kms_key_arn,
            tags=tags,
            execution_role_policies=identity.role_policies["sagemaker"],
            running=running,
        ),
        opts=pulumi.ResourceOptions(depends_on=[network]),
    )


def stack_outputs(
    cfg: StackConfig,
    tags: dict[str, str],
    storage: Storage,
    network: Network,
    registry: Registry,
    identity: Identity,
    cluster: Cluster,
    base: KubernetesBase,
    serving: ServingOnEks | None,
    endpoint: SageMakerEndpoint | None,
) -> dict[str, Any]:
    """The stack's outputs, keyed by `infra.outputs`: what tools, workloads and the tests read of a deployed stack."""
    outputs: dict[str, Any] = {
        out.STACK: cfg.stack,
        out.ENVIRONMENT: cfg.environment,
        out.REGION: cfg.region,
        out.PRODUCTION: cfg.production,
        out.TAGS: tags,
        out.VPC_ID: network.vpc_id,
        out.PRIVATE_SUBNET_IDS: network.private_subnet_ids,
        out.PUBLIC_SUBNET_IDS: network.public_subnet_ids,
        out.KMS_KEY_ARN: storage.kms_key_arn,
        out.DATASETS_BUCKET: storage.bucket_names["datasets"],
        out.CHECKPOINTS_BUCKET: storage.bucket_names["checkpoints"],
        out.MODELS_BUCKET: storage.bucket_names["models"],
        out.TRAINING_REPOSITORY_URL: registry.repository_urls["training"],
        out.SERVING_REPOSITORY_URL: registry.repository_urls["serving"],
        out.TRAINING_ROLE_ARN: identity.training_role_arn,
        out.SERVING_ROLE_ARN: identity.serving_role_arn,
        out.SAGEMAKER_EXECUTION_ROLE_ARN: identity.sagemaker_role_arn,
        out.CLUSTER_NAME: cluster.name,
        out.CLUSTER_ENDPOINT: cluster.endpoint,
        out.KUBECONFIG: cluster.kubeconfig,
        out.KUBERNETES_VERSION: cfg.cluster.kubernetes_version,
        out.TRAINING_NAMESPACE: base.training_namespace,
        out.SERVING_NAMESPACE: base.serving_namespace,
        out.TRAINING_SERVICE_ACCOUNT: base.training_service_account,
        out.SERVING_SERVICE_ACCOUNT: base.serving_service_account,
        out.GPU_POOLS: {pool.name: pool.describe() for pool in cfg.cluster.gpu_pools},
    }
    if cfg.images.training_digest:
        outputs[out.TRAINING_IMAGE] = registry.repository_urls["training"].apply(
            lambda url: image_reference(url, "", cfg.images.training_digest)
        )
    if serving is not None:
        outputs[out.SERVING_SERVICE_NAME] = serving.service_name
    if endpoint is not None:
        outputs[out.SAGEMAKER_ENDPOINT_NAME] = endpoint.endpoint_name
    return outputs
