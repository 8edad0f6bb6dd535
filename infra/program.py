"""The platform program, in two layers per environment (infra/layers.py): stack `<env>` declares the AWS layer,
stack `<env>-cluster` the cluster layer. `infra/__main__.py` runs it under the Pulumi engine; `ops.preview` and the
tests run both layers under the recording mock engine.

Where new components go: an AWS resource (anything a GitHub-hosted runner can create through AWS APIs) is declared
in `build_aws_layer` (export what the cluster layer needs in `aws_layer_outputs` and read it in
`infra.layers.cluster_ref`); a Kubernetes object or chart is declared in `build_cluster_layer`, with
`ref.provider`. Never both in one component: a component that mixes them would need the private API from the
hosted runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pulumi
import pulumi_aws as aws

from facts.cluster import (
    PREPARE_SERVICE_ACCOUNT,
    SERVING_NAMESPACE,
    SERVING_SERVICE_ACCOUNT,
    TRAINING_NAMESPACE,
    TRAINING_SERVICE_ACCOUNT,
)
from facts.tags import stack_tags
from infra import config as config_module
from infra import k8s_objects, preflight
from infra import outputs as out
from infra.access import DeployerRunner, DeployerRunnerArgs
from infra.audit import Audit, AuditArgs
from infra.backup import Backup, BackupArgs
from infra.budgets import Budgets, BudgetsArgs
from infra.cluster import Cluster, ClusterArgs
from infra.cluster_autoscaler import (
    ClusterAutoscaler,
    ClusterAutoscalerArgs,
    ClusterAutoscalerIdentity,
    ClusterAutoscalerIdentityArgs,
)
from infra.config import StackConfig
from infra.gpu_plugins import GpuDevicePlugins, GpuDevicePluginsArgs
from infra.identity import Identity, IdentityArgs
from infra.kubernetes_base import KubernetesBase, KubernetesBaseArgs, WorkloadIdentities, WorkloadIdentitiesArgs
from infra.layers import ClusterRef, Layer, aws_stack_reference_name, cluster_ref, layer_of
from infra.load_balancer_controller import (
    LoadBalancerController,
    LoadBalancerControllerArgs,
    LoadBalancerControllerIdentity,
    LoadBalancerControllerIdentityArgs,
)
from infra.network import Network, NetworkArgs, plan_collector_subnets
from infra.network_policies import SystemNetworkPolicies, SystemNetworkPoliciesArgs, SystemTraffic
from infra.observability import ClusterMonitoring, ClusterMonitoringArgs, Observability, ObservabilityArgs
from infra.registry import Registry, RegistryArgs
from infra.sagemaker_endpoint import VARIANT_NAME, SageMakerEndpoint, SageMakerEndpointArgs
from infra.serving_autoscaling import ServingAutoscaling, ServingAutoscalingArgs
from infra.serving_eks import API_KEYS_SECRET, SERVICE_NAME, ServingOnEks, ServingOnEksArgs
from infra.spot_interruptions import (
    NodeTerminationHandler,
    NodeTerminationHandlerArgs,
    SpotInterruptionQueue,
    SpotInterruptionQueueArgs,
    needs_node_termination_handler,
)
from infra.storage import Storage, StorageArgs
from infra.team_rbac import TeamRbac, TeamRbacArgs
from infra.teams import StackArns, TeamAccess, TeamAccessArgs


def image_reference(repository_url: str, tag: str, digest: str) -> str:
    """`<repository>@<digest>` when a digest is configured (what runs is exactly that image, whatever happens to tags;
    Kubernetes and SageMaker both accept this form), else `<repository>:<tag>`."""
    return f"{repository_url}@{digest}" if digest else f"{repository_url}:{tag}"


@dataclass(frozen=True, kw_only=True)
class StackContext:
    """What every component of an environment shares: pass this handle, not its fields one by one."""

    cfg: StackConfig
    name_prefix: str
    stack: str
    """The environment (both layers' stacks are named after it)."""
    region: str
    account: str
    partition: str
    tags: dict[str, str]


def stack_context(cfg: StackConfig) -> StackContext:
    identity_info = aws.get_caller_identity()
    return StackContext(
        cfg=cfg,
        name_prefix=cfg.name_prefix,
        stack=cfg.stack,
        region=cfg.region,
        account=identity_info.account_id,
        partition=aws.get_partition().partition,
        tags=stack_tags(cfg.stack, cfg.environment),
    )


def build() -> dict[str, Any]:
    """Declare the resources of the running stack's layer and return its outputs (keys from `infra.outputs`)."""
    # Config first: a bad stack file fails here, before any resource is registered.
    cfg = config_module.from_pulumi()
    if layer_of(pulumi.get_stack()) is Layer.CLUSTER:
        return build_cluster_layer(cfg)
    return build_aws_layer(cfg)


# -- the AWS layer (stack `<env>`, any runner with AWS credentials) -------------------------------------------------
def build_aws_layer(cfg: StackConfig) -> dict[str, Any]:
    """Every AWS resource, including everything the platform needs to be safe before any Kubernetes object exists:
    controller roles and Pod Identity associations, the spot-interruption queue and rules, the ASG node-template
    tags, the alert topic and key, the alarms, the AMP workspace and scraper."""
    ctx = stack_context(cfg)
    placement = check_before_declaring(cfg, ctx.account, cluster_layer=False)
    storage, network, registry, identity, cluster = declare_foundation(ctx, placement)
    WorkloadIdentities(
        "workload-identities",
        WorkloadIdentitiesArgs(
            cluster_name=cluster.name,
            training_role_arn=identity.training_role_arn,
            serving_role_arn=identity.serving_role_arn,
            prepare_role_arn=identity.prepare_role_arn,
            tags=ctx.tags,
        ),
    )
    ClusterAutoscalerIdentity(
        "cluster-autoscaler",
        ClusterAutoscalerIdentityArgs(
            cluster=cfg.cluster,
            name_prefix=ctx.name_prefix,
            cluster_name=cluster.name,
            node_groups=cluster.node_groups,
            tags=ctx.tags,
            account_id=ctx.account,
        ),
    )
    spot_queue: SpotInterruptionQueue | None = None
    if needs_node_termination_handler(cfg.autoscaling, cfg.cluster):
        spot_queue = SpotInterruptionQueue(
            "node-termination",
            SpotInterruptionQueueArgs(
                name_prefix=ctx.name_prefix, cluster_name=cluster.name, tags=ctx.tags, account_id=ctx.account
            ),
        )
    if cfg.serving.eks_declared and cfg.serving.ingress:
        LoadBalancerControllerIdentity(
            "load-balancer-controller",
            LoadBalancerControllerIdentityArgs(
                name_prefix=ctx.name_prefix, cluster_name=cluster.name, tags=ctx.tags, account_id=ctx.account
            ),
        )
    image = registry.repository_urls["serving"].apply(
        lambda url: image_reference(url, cfg.serving.image_tag, cfg.images.serving_digest)
    )
    endpoint = (
        declare_sagemaker_endpoint(cfg, image, storage, network, identity, ctx.tags)
        if (cfg.serving.sagemaker_declared)
        else None
    )
    observability = Observability(
        "observability",
        ObservabilityArgs(
            observability=cfg.observability,
            serving=cfg.serving,
            stack=cfg.stack,
            name_prefix=ctx.name_prefix,
            protect_data=cfg.storage.protect_data,
            cluster_arn=cluster.cluster.arn,
            cluster_security_group_id=cluster.security_group_id,
            # The managed collector's ENIs go into their own subnets, so the serving and training network policies
            # can admit exactly those CIDRs (network.plan_collector_subnets) instead of the whole VPC.
            private_subnet_ids=network.collector_subnet_ids,
            node_groups=cluster.node_groups,
            account_id=ctx.account,
            partition=ctx.partition,
            tags=ctx.tags,
            sagemaker_endpoint_name=endpoint.endpoint_name if endpoint else None,
            sagemaker_variant_name=VARIANT_NAME,
        ),
    )
    # -- teams: access entries and IAM (AWS layer, infra/teams.py) --
    declare_team_access(cfg, storage, identity, cluster, ctx.account, ctx.partition, ctx.tags)
    # -- end teams --
    Budgets("budgets", BudgetsArgs(cfg.budget, cfg.observability.alert_emails, cfg.name_prefix, cfg.stack, ctx.tags))
    outputs = aws_layer_outputs(cfg, ctx.tags, storage, network, registry, identity, cluster, endpoint)
    # -- audit and backup (AWS layer; infra/audit.py, infra/backup.py) --
    outputs.update(declare_audit_and_backup(cfg, storage, ctx.account, ctx.partition, ctx.tags))
    # -- end audit and backup --
    outputs[out.ALERT_TOPIC_ARN] = observability.alert_topic_arn
    if spot_queue is not None:
        outputs[out.SPOT_INTERRUPTION_QUEUE_URL] = spot_queue.queue_url
    if observability.amp_query_url is not None:
        outputs[out.AMP_QUERY_URL] = observability.amp_query_url
    return outputs


# -- the cluster layer (stack `<env>-cluster`, the in-VPC runner only) ----------------------------------------------
def build_cluster_layer(cfg: StackConfig) -> dict[str, Any]:
    """Every Kubernetes object and chart, through the provider built from the AWS layer's outputs. Declares no AWS
    resource: what the cluster layer's objects need from AWS (roles, associations, the queue, the workspace) exists
    already, because the AWS layer is applied first."""
    ctx = stack_context(cfg)
    placement = check_before_declaring(cfg, ctx.account, cluster_layer=True)
    reference = pulumi.StackReference(
        aws_stack_reference_name(pulumi.get_organization(), pulumi.get_project(), cfg.stack)
    )
    ref = cluster_ref(
        reference,
        spot_queue=needs_node_termination_handler(cfg.autoscaling, cfg.cluster),
        amp=cfg.observability.metrics == "amp",
    )
    base = KubernetesBase(
        "kubernetes-base",
        KubernetesBaseArgs(
            cluster=cfg.cluster,
            network=cfg.network,
            serving=cfg.serving,
            observability=cfg.observability,
            region=cfg.region,
            provider=ref.provider,
        ),
    )
    declare_node_controllers(cfg, ref, base)
    # -- teams: the job-launcher Role (cluster layer, infra/team_rbac.py); access entries and IAM: AWS layer --
    if cfg.teams.teams:
        TeamRbac(
            "team-rbac",
            TeamRbacArgs(teams=cfg.teams, provider=ref.provider, depends_on=[base.namespaces["training"]]),
        )
    # -- end teams --

    serving: ServingOnEks | None = None
    if cfg.serving.eks_declared:
        ingress_controller = declare_ingress_controller(cfg, ref, base, ctx.tags)
        keys_secret = declare_api_keys_secret(placement.api_keys, ref, base)
        image = ref.serving_repository_url.apply(
            lambda url: image_reference(url, cfg.serving.image_tag, cfg.images.serving_digest)
        )
        serving = ServingOnEks(
            "serving-eks",
            ServingOnEksArgs(
                serving=cfg.serving,
                cluster=cfg.cluster,
                autoscaling=cfg.autoscaling,
                region=cfg.region,
                name_prefix=cfg.name_prefix,
                tags=ctx.tags,
                provider=ref.provider,
                namespace=base.serving_namespace,
                service_account=base.serving_service_account,
                image=image,
                models_bucket=ref.models_bucket,
            ),
            # The cluster layer is destroyed before the AWS layer (ops/teardown.py), so workloads always leave the
            # GPU nodes before the node groups go.
            opts=pulumi.ResourceOptions(depends_on=[base, keys_secret, *ingress_controller]),
        )
    monitoring = ClusterMonitoring(
        "observability",
        ClusterMonitoringArgs(
            observability=cfg.observability,
            gpu_pools=cfg.cluster.gpu_pools,
            stack=cfg.stack,
            provider=ref.provider,
            amp_query_url=ref.amp_query_url,
        ),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    keda: ServingAutoscaling | None = None
    if serving is not None and cfg.autoscaling.serving_autoscaler == "keda":
        keda = ServingAutoscaling(
            "serving-autoscaling",
            ServingAutoscalingArgs(
                cfg.autoscaling,
                cfg.serving,
                ref.provider,
                base.serving_namespace,
                serving.deployment.metadata.name,
                monitoring.prometheus_url,
            ),
            opts=pulumi.ResourceOptions(depends_on=[serving]),
        )
    # -- system network policies (cluster layer; infra/network_policies.py) --
    SystemNetworkPolicies(
        "system-network-policies",
        SystemNetworkPoliciesArgs(
            traffic=SystemTraffic(
                vpc_cidr=cfg.network.vpc_cidr,
                load_balancer_controller=serving is not None and cfg.serving.ingress,
                keda=keda is not None,
                metrics=cfg.observability.metrics,
                collector_cidrs=tuple(plan_collector_subnets(cfg.network.vpc_cidr, cfg.network.az_count))
                if cfg.observability.metrics == "amp"
                else (),
            ),
            provider=ref.provider,
            depends_on=[base, monitoring, *([keda] if keda else [])],
        ),
    )
    # -- end system network policies --
    outputs: dict[str, Any] = {
        out.STACK: cfg.stack,
        out.LAYER: Layer.CLUSTER.value,
        out.CLUSTER_NAME: ref.name,
        out.TRAINING_NAMESPACE: base.training_namespace,
        out.SERVING_NAMESPACE: base.serving_namespace,
    }
    if serving is not None:
        outputs[out.SERVING_SERVICE_NAME] = serving.service_name
    if monitoring.prometheus_url is not None:
        outputs[out.PROMETHEUS_URL] = monitoring.prometheus_url
    return outputs


@dataclass(frozen=True)
class Placement:
    """What the preview-time checks against the account found (infra/preflight.py)."""

    zones: list[str]
    """The availability zones the stack spreads over (azCount of the region's available ones)."""
    training_subnet_index: int
    """The zone a single-zone training pool (EFA, a capacity reservation) lives in."""
    api_keys: str | None
    """The serving API keys file from Secrets Manager, when EKS serving is declared."""


def check_before_declaring(cfg: StackConfig, account_id: str, *, cluster_layer: bool) -> Placement:
    """Preview-time checks against the account: fail now, with the fix, not 40 minutes into `up`. The cluster layer
    checks only what it uses (the serving artifacts and API keys); the AWS layer checks placement and versions."""
    if cluster_layer:
        return Placement([], 0, preflight.check_serving_artifacts(cfg, account_id))
    zones = aws.get_availability_zones(state="available").names[: cfg.network.az_count]
    if len(zones) < cfg.network.az_count:
        raise config_module.ConfigError(
            f"stack '{cfg.stack}'",
            [f"{cfg.project}:azCount = {cfg.network.az_count}: region {cfg.region} has only {len(zones)} zones"],
        )
    preflight.check_version_drift(cfg)
    warning = preflight.support_warning(cfg.cluster.kubernetes_version, datetime.now(UTC).date())
    if warning:
        pulumi.log.warn(warning)
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


def declare_foundation(ctx: StackContext, placement: Placement) -> tuple[Storage, Network, Registry, Identity, Cluster]:
    """What everything else stands on: storage, network, registry, identity, the cluster, and the in-VPC deployer
    runner that applies the cluster layer."""
    cfg = ctx.cfg
    storage = Storage(
        "storage",
        StorageArgs(cfg.storage, ctx.name_prefix, ctx.stack, ctx.region, ctx.account, ctx.partition, ctx.tags),
    )
    network = Network(
        "network",
        NetworkArgs(
            network=cfg.network,
            name_prefix=ctx.name_prefix,
            stack=ctx.stack,
            region=ctx.region,
            collector_subnets=cfg.observability.metrics == "amp",
            availability_zones=placement.zones,
            kms_key_arn=storage.kms_key_arn,
            tags=ctx.tags,
            bucket_arns=storage.bucket_arns,
        ),
    )
    registry = Registry(
        "registry", RegistryArgs(ctx.name_prefix, cfg.storage.force_destroy, storage.kms_key_arn, ctx.tags)
    )
    identity = Identity(
        "identity",
        IdentityArgs(
            name_prefix=ctx.name_prefix,
            region=ctx.region,
            account_id=ctx.account,
            partition=ctx.partition,
            bucket_arns=storage.bucket_arns,
            repository_arns=registry.repository_arns,
            kms_key_arn=storage.kms_key_arn,
            tags=ctx.tags,
        ),
    )
    cluster = Cluster(
        "cluster",
        ClusterArgs(
            cluster=cfg.cluster,
            name_prefix=ctx.name_prefix,
            region=ctx.region,
            vpc_cidr=cfg.network.vpc_cidr,
            vpc_id=network.vpc_id,
            private_subnet_ids=network.private_subnet_ids,
            cluster_role_arn=identity.cluster_role_arn,
            node_role_arn=identity.node_role_arn,
            kms_key_arn=storage.kms_key_arn,
            tags=ctx.tags,
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
        # The runner the deploy workflow applies the cluster layer from (infra/access.py).
        DeployerRunner(
            "deployer",
            DeployerRunnerArgs(
                name_prefix=ctx.name_prefix,
                stack=ctx.stack,
                region=ctx.region,
                repository=cfg.cluster.deployer_repository,
                log_retention_days=cfg.network.flow_log_retention_days,
                vpc_id=network.vpc_id,
                private_subnet_ids=network.private_subnet_ids,
                account_id=ctx.account,
                partition=ctx.partition,
                tags=ctx.tags,
            ),
        )
    return storage, network, registry, identity, cluster


def declare_team_access(
    cfg: StackConfig,
    storage: Storage,
    identity: Identity,
    cluster: Cluster,
    account_id: str,
    partition: str,
    tags: dict[str, str],
) -> None:
    """People's access by team in the AWS layer (infra/teams.py); nothing without `teams`."""
    if not cfg.teams.teams:
        return
    arns = StackArns(
        region=cfg.region,
        account_id=account_id,
        partition=partition,
        stack=cfg.stack,
        name_prefix=cfg.name_prefix,
        bucket_arns=storage.bucket_arns,
        kms_key_arn=storage.kms_key_arn,
        cluster_arn=cluster.cluster.arn,
        sagemaker_role_arn=identity.sagemaker_role_arn,
        sagemaker_prepare_role_arn=identity.sagemaker_prepare_role_arn,
    )
    TeamAccess("teams", TeamAccessArgs(teams=cfg.teams, arns=arns, cluster_name=cluster.name, tags=tags))


def declare_audit_and_backup(
    cfg: StackConfig, storage: Storage, account_id: str, partition: str, tags: dict[str, str]
) -> dict[str, Any]:
    """The CloudTrail trail into its Object Lock bucket, and cross-region replication of models and checkpoints
    (AWS layer: neither needs the cluster). Returns the outputs they add."""
    outputs: dict[str, Any] = {}
    p = cfg.protection
    if p.audit_trail:
        audit = Audit(
            "audit",
            AuditArgs(
                protection=p,
                name_prefix=cfg.name_prefix,
                stack=cfg.stack,
                region=cfg.region,
                account_id=account_id,
                partition=partition,
                bucket_arns=storage.bucket_arns,
                protect_data=cfg.storage.protect_data,
                tags=tags,
            ),
        )
        outputs[out.AUDIT_TRAIL_BUCKET] = audit.bucket_name
    if p.backup_replica_region:
        backup = Backup(
            "backup",
            BackupArgs(
                name_prefix=cfg.name_prefix,
                stack=cfg.stack,
                region=cfg.region,
                replica_region=p.backup_replica_region,
                account_id=account_id,
                partition=partition,
                bucket_names=storage.bucket_names,
                bucket_arns=storage.bucket_arns,
                source_kms_key_arn=storage.kms_key_arn,
                protect_data=cfg.storage.protect_data,
                tags=tags,
                depends_on=[storage],
            ),
        )
        outputs[out.MODELS_REPLICA_BUCKET] = backup.replica_bucket_names["models"]
        outputs[out.CHECKPOINTS_REPLICA_BUCKET] = backup.replica_bucket_names["checkpoints"]
        outputs[out.BACKUP_REPLICA_REGION] = p.backup_replica_region
    return outputs


def declare_node_controllers(cfg: StackConfig, ref: ClusterRef, base: KubernetesBase) -> None:
    """What GPU nodes need besides the cluster: device plugins, the Cluster Autoscaler, the spot interruption
    handler (their charts; their roles, associations, queue and ASG tags are in the AWS layer)."""
    # Without the device plugins no pod can request a GPU (or EFA device); they run on the GPU pools only.
    GpuDevicePlugins(
        "gpu-plugins",
        GpuDevicePluginsArgs(cfg.cluster.gpu_pools, ref.provider),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    ClusterAutoscaler(
        "cluster-autoscaler",
        ClusterAutoscalerArgs(
            cluster=cfg.cluster,
            autoscaling=cfg.autoscaling,
            region=cfg.region,
            cluster_name=ref.name,
            provider=ref.provider,
        ),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    if ref.spot_queue_url is not None:
        NodeTerminationHandler(
            "node-termination",
            NodeTerminationHandlerArgs(
                autoscaling=cfg.autoscaling,
                region=cfg.region,
                cluster_name=ref.name,
                queue_url=ref.spot_queue_url,
                provider=ref.provider,
            ),
            opts=pulumi.ResourceOptions(depends_on=[base]),
        )


def declare_ingress_controller(
    cfg: StackConfig, ref: ClusterRef, base: KubernetesBase, tags: dict[str, str]
) -> list[pulumi.Resource]:
    """The AWS Load Balancer Controller when EKS serving has an Ingress (the internal ALB Ingress does nothing
    without the controller that turns it into a load balancer); empty otherwise."""
    if not cfg.serving.ingress:
        return []
    controller = LoadBalancerController(
        "load-balancer-controller",
        LoadBalancerControllerArgs(
            region=cfg.region, cluster_name=ref.name, vpc_id=ref.vpc_id, provider=ref.provider, tags=tags
        ),
        opts=pulumi.ResourceOptions(depends_on=[base]),
    )
    return [controller]


def declare_api_keys_secret(api_keys: str | None, ref: ClusterRef, base: KubernetesBase) -> pulumi.CustomResource:
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
        pulumi.ResourceOptions(provider=ref.provider, depends_on=[base]),
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
            # Egress to S3 and the interface endpoints only, where the stack has them (else HTTPS through NAT).
            s3_prefix_list_id=aws.ec2.get_prefix_list_output(name=f"com.amazonaws.{cfg.region}.s3").id
            if cfg.network.interface_endpoints
            else None,
            endpoints_security_group_id=network.endpoint_security_group.id if cfg.network.interface_endpoints else None,
        ),
        opts=pulumi.ResourceOptions(depends_on=[network]),
    )


def aws_layer_outputs(
    cfg: StackConfig,
    tags: dict[str, str],
    storage: Storage,
    network: Network,
    registry: Registry,
    identity: Identity,
    cluster: Cluster,
    endpoint: SageMakerEndpoint | None,
) -> dict[str, Any]:
    """The AWS layer's outputs, keyed by `infra.outputs`: what tools, workloads, the cluster layer
    (infra.layers.HANDOFF_KEYS) and the tests read of a deployed environment."""
    outputs: dict[str, Any] = {
        out.STACK: cfg.stack,
        out.LAYER: Layer.AWS.value,
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
        out.PREPARE_ROLE_ARN: identity.prepare_role_arn,
        out.SAGEMAKER_PREPARE_ROLE_ARN: identity.sagemaker_prepare_role_arn,
        out.CLUSTER_NAME: cluster.name,
        out.CLUSTER_ENDPOINT: cluster.endpoint,
        out.KUBECONFIG: cluster.kubeconfig,
        out.KUBERNETES_VERSION: cfg.cluster.kubernetes_version,
        # Fixed names (facts/cluster.py) the cluster layer creates; tools read them here, with the rest.
        out.TRAINING_NAMESPACE: TRAINING_NAMESPACE,
        out.SERVING_NAMESPACE: SERVING_NAMESPACE,
        out.TRAINING_SERVICE_ACCOUNT: TRAINING_SERVICE_ACCOUNT,
        out.SERVING_SERVICE_ACCOUNT: SERVING_SERVICE_ACCOUNT,
        out.PREPARE_SERVICE_ACCOUNT: PREPARE_SERVICE_ACCOUNT,
        out.GPU_POOLS: {pool.name: pool.describe() for pool in cfg.cluster.gpu_pools},
        out.BATCH_POOL: cfg.cluster.batch_pool.describe(),
    }
    if cfg.images.training_digest:
        outputs[out.TRAINING_IMAGE] = registry.repository_urls["training"].apply(
            lambda url: image_reference(url, "", cfg.images.training_digest)
        )
    if cfg.serving.eks_declared:
        outputs[out.SERVING_SERVICE_NAME] = SERVICE_NAME
    if endpoint is not None:
        outputs[out.SAGEMAKER_ENDPOINT_NAME] = endpoint.endpoint_name
    return outputs
