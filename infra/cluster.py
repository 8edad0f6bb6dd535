"""The EKS cluster: control plane, managed add-ons, a system node group, the GPU node groups and a CPU batch group.

Built from pulumi-aws primitives (no pulumi-eks) so every piece is visible to previews, policies and the mock
engine. Nodes live in the private subnets only; the API is reachable privately and, when configured, publicly from
an allowlist. Authentication is through EKS access entries (no aws-auth ConfigMap), workloads get AWS credentials
through EKS Pod Identity (no OIDC provider, no IRSA annotations).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from facts.cluster import POOL_LABEL, SYSTEM_POOL
from facts.instance_types import NVME_INSTANCE_STORE_GB
from infra.capacity import node_group_capacity_type, reservation_launch_template_args
from infra.cluster_autoscaler import autoscaler_tag_keys
from infra.config import BatchPool, ClusterConfig, GpuPool

CONTROL_PLANE_LOG_TYPES = ("api", "audit", "authenticator", "controllerManager", "scheduler")
"""All five control-plane log types: audit and authenticator are the access-control trail; the rest debug upgrades."""

ADDONS = ("vpc-cni", "kube-proxy", "eks-pod-identity-agent", "coredns", "aws-ebs-csi-driver", "metrics-server")
"""Managed add-ons. The first three are DaemonSets the nodes need to become Ready, so they are created before any
node group; the rest are Deployments that need a node to run on, so they wait for the system node group.
metrics-server (an EKS community add-on) is what the serving HPA reads CPU utilisation from."""

_ADDONS_BEFORE_NODES = ("vpc-cni", "kube-proxy", "eks-pod-identity-agent")

CLUSTER_ADMIN_POLICY_ARN = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"

SYSTEM_AMI_TYPE = "AL2023_x86_64_STANDARD"
GPU_AMI_TYPE = "AL2023_x86_64_NVIDIA"
"""AL2023 with the NVIDIA driver, container toolkit and (for EFA types) the EFA driver; the device plugin is ours."""
SYSTEM_DISK_GB = 50

LOCAL_NVME_NODE_CONFIG = """MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="BOUNDARY"

--BOUNDARY
Content-Type: application/node.eks.aws

---
apiVersion: node.eks.aws/v1alpha1
kind: NodeConfig
spec:
  instance:
    localStorage:
      strategy: RAID0

--BOUNDARY--
"""
"""nodeadm (AL2023) stripes the instance-store NVMe disks into one RAID0 array and moves the kubelet's and
containerd's directories onto it (awslabs/amazon-eks-ami nodeadm/api/v1alpha1 LocalStorageOptions; setup-local-disks
binds both unless disabledMounts says otherwise). So pods' emptyDir scratch, model caches and image layers land on
local NVMe (p5: 8 x 3.84 TB) instead of the gp3 root volume. A managed node group merges this MIME part with the
NodeConfig it generates itself (no custom AMI: EKS fills in the cluster details)."""

_TAINT_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "NoExecute": "NO_EXECUTE", "PreferNoSchedule": "PREFER_NO_SCHEDULE"}
"""Kubernetes spells taint effects one way, the EKS API another."""


@dataclass
class ClusterArgs:
    cluster: ClusterConfig
    """Version, service CIDR, log retention, admins, endpoint access, the system and GPU pools."""
    name_prefix: str
    """Name of the cluster and prefix of its node groups, launch templates and security groups."""
    region: str
    """Region the kubeconfig's token is requested in."""
    vpc_cidr: str
    """The VPC's CIDR: the private API endpoint admits HTTPS from it (nodes, the in-VPC deployer)."""
    vpc_id: pulumi.Input[str]
    """VPC the cluster and its security groups live in."""
    private_subnet_ids: pulumi.Input[list[str]]
    """Private subnets, one per AZ: control-plane ENIs and every node go here, never into public subnets."""
    cluster_role_arn: pulumi.Input[str]
    """IAM role the EKS control plane assumes (AmazonEKSClusterPolicy)."""
    node_role_arn: pulumi.Input[str]
    """IAM role of every node (worker node, ECR pull and VPC CNI policies)."""
    kms_key_arn: pulumi.Input[str]
    """The stack's KMS key: envelope encryption of Kubernetes Secrets."""
    tags: dict[str, str]
    """Stack tags, put on every taggable resource and propagated to instances and volumes."""
    ebs_csi_role_arn: pulumi.Input[str] | None = None
    """Optional Pod Identity role for the EBS CSI controller (AmazonEBSCSIDriverPolicy). Without it the driver
    falls back to the node role, which then needs that policy."""
    cluster_role_policies: Sequence[pulumi.Resource] = ()
    """The cluster role's policy attachments (`Identity.role_policies["cluster"]`): the control plane depends on them
    explicitly, as pulumi-aws's aws.eks.Cluster docs require, or EKS may start without its permissions and, on
    destroy, lose them before it has deleted the security groups and ENIs it created."""
    node_role_policies: Sequence[pulumi.Resource] = ()
    """The node role's policy attachments: every node group depends on them (pulumi-aws aws.eks.NodeGroup docs), so
    nodes never join without ECR pull / CNI permissions and destroy does not hang on nodes that cannot drain."""
    training_subnet_index: int = 0
    """Index of the private subnet (zone) a single-zone training pool (EFA, or a capacity reservation) lives in: a
    zone that offers its instance types / holds its reservation (infra/preflight.py)."""


class Cluster(pulumi.ComponentResource):
    """The EKS cluster: control plane, access entries, managed add-ons, the system node group and one node group per
    GPU pool (AWS layer). No Kubernetes provider: the cluster layer builds it from this component's exported outputs
    (infra/layers.py), so no job of the AWS layer ever configures or constructs anything against the Kubernetes API."""

    cluster: aws.eks.Cluster
    """The control plane resource (its ARN: the managed Prometheus scraper, infra/observability.py)."""
    name: pulumi.Output[str]
    """The cluster name: Pod Identity associations, the autoscaler's tags, kubeconfig; exported."""
    endpoint: pulumi.Output[str]
    """The API server URL; exported."""
    kubeconfig: pulumi.Output[str]
    """Secret. Authenticates with `aws eks get-token` (the caller's AWS credentials); holds no static token."""
    security_group_id: pulumi.Output[str]
    """The EKS-managed cluster security group, which every node carries (control plane <-> nodes, node <-> node)."""
    api_security_group_id: pulumi.Output[str]
    """Security group admitting HTTPS to the private API endpoint from inside the VPC."""
    node_groups: dict[str, aws.eks.NodeGroup]
    """Node groups by pool name (system, training, inference, batch): the autoscaler tags them, alarms watch them,
    workloads depend on them so they go first on destroy."""
    addons: dict[str, aws.eks.Addon]
    """Managed add-ons by name (vpc-cni, coredns, ...)."""

    def __init__(self, name: str, args: ClusterArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Cluster", name, None, opts)
        self._name = name
        self._args = args

        # Ours, not EKS's: EKS would create it on first log with no expiry (cost grows forever) and outside the stack
        # (teardown would leave it behind).
        log_group = aws.cloudwatch.LogGroup(
            f"{name}-control-plane-logs",
            name=f"/aws/eks/{args.name_prefix}/cluster",
            retention_in_days=args.cluster.control_plane_log_retention_days,
            tags=args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        api_sg = self._create_api_security_group()
        self.cluster = self._create_control_plane(api_sg, log_group)
        self.name = self.cluster.name
        self.endpoint = self.cluster.endpoint
        self.security_group_id = self.cluster.vpc_config.cluster_security_group_id
        self.api_security_group_id = api_sg.id
        self._create_access_entries()

        self.addons = {}
        for addon in _ADDONS_BEFORE_NODES:
            self.addons[addon] = self._create_addon(addon, depends_on=[])

        early_addons = list(self.addons.values())
        self.node_groups = {SYSTEM_POOL: self._create_system_node_group(early_addons)}
        for pool in args.cluster.gpu_pools:
            self.node_groups[pool.purpose] = self._create_gpu_node_group(pool, early_addons)
        batch = args.cluster.batch_pool
        self.node_groups[batch.name] = self._create_batch_node_group(batch, early_addons)

        for addon in ADDONS:
            if addon not in self.addons:
                self.addons[addon] = self._create_addon(addon, depends_on=[self.node_groups[SYSTEM_POOL]])

        self.kubeconfig = pulumi.Output.secret(
            pulumi.Output.all(self.cluster.name, self.cluster.endpoint, self.cluster.certificate_authority.data).apply(
                lambda a: _kubeconfig(a[0], a[1], a[2], args.region)
            )
        )
        self.register_outputs(
            {
                "name": self.name,
                "endpoint": self.endpoint,
                "kubeconfig": self.kubeconfig,
                "security_group_id": self.security_group_id,
                "api_security_group_id": self.api_security_group_id,
                "node_group_names": {k: ng.node_group_name for k, ng in self.node_groups.items()},
            }
        )

    # -- control plane ---------------------------------------------------------------------------------------------
    def _create_api_security_group(self) -> aws.ec2.SecurityGroup:
        """Extra security group on the control-plane ENIs: HTTPS from inside the VPC only (bastions, VPN, CI runners
        in the VPC reach the private endpoint); no egress of its own. Control plane <-> node traffic goes through the
        EKS-managed cluster security group, which EKS creates and owns."""
        spec = self._args
        return aws.ec2.SecurityGroup(
            f"{self._name}-api-sg",
            name=f"{spec.name_prefix}-eks-api",
            description="EKS API: HTTPS from inside the VPC only",
            vpc_id=self._args.vpc_id,
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(
                    protocol="tcp",
                    from_port=443,
                    to_port=443,
                    cidr_blocks=[spec.vpc_cidr],
                    description="Kubernetes API from the VPC",
                )
            ],
            # An explicit empty list removes the default allow-all egress; responses are allowed statefully.
            egress=[],
            tags={**self._args.tags, "Name": f"{spec.name_prefix}-eks-api"},
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _create_control_plane(
        self, api_sg: aws.ec2.SecurityGroup, log_group: aws.cloudwatch.LogGroup
    ) -> aws.eks.Cluster:
        spec = self._args
        public = spec.cluster.public_api_endpoint
        return aws.eks.Cluster(
            f"{self._name}-eks",
            name=spec.name_prefix,
            version=spec.cluster.kubernetes_version,
            kubernetes_network_config=aws.eks.ClusterKubernetesNetworkConfigArgs(
                service_ipv4_cidr=spec.cluster.service_cidr, ip_family="ipv4"
            ),
            role_arn=self._args.cluster_role_arn,
            access_config=aws.eks.ClusterAccessConfigArgs(
                authentication_mode="API",
                # The identity running `pulumi up` must reach the API to apply the Kubernetes objects that follow;
                # EKS gives it an admin access entry. Don't also list that principal in clusterAdminArns (the second
                # access entry for the same principal would be refused).
                bootstrap_cluster_creator_admin_permissions=True,
            ),
            vpc_config=aws.eks.ClusterVpcConfigArgs(
                subnet_ids=self._args.private_subnet_ids,
                security_group_ids=[api_sg.id],
                endpoint_private_access=True,
                endpoint_public_access=public,
                # Config validation guarantees an allowlist (never 0.0.0.0/0) whenever the public endpoint is on.
                public_access_cidrs=list(spec.cluster.public_api_cidrs) if public else None,
            ),
            encryption_config=aws.eks.ClusterEncryptionConfigArgs(
                provider=aws.eks.ClusterEncryptionConfigProviderArgs(key_arn=self._args.kms_key_arn),
                resources=["secrets"],
            ),
            enabled_cluster_log_types=list(CONTROL_PLANE_LOG_TYPES),
            # Extended support costs six times the standard hourly price; a cluster past standard support is upgraded
            # by EKS instead of silently billing more. Upgrades belong in the stack file (kubernetesVersion) anyway.
            upgrade_policy=aws.eks.ClusterUpgradePolicyArgs(support_type="STANDARD"),
            tags=self._args.tags,
            # The log group must exist first, or EKS creates its own (no retention, not in the stack).
            opts=pulumi.ResourceOptions(parent=self, depends_on=[log_group, *self._args.cluster_role_policies]),
        )

    def _create_access_entries(self) -> None:
        for i, arn in enumerate(self._args.cluster.admin_arns):
            entry = aws.eks.AccessEntry(
                f"{self._name}-admin-{i}",
                cluster_name=self.cluster.name,
                principal_arn=arn,
                type="STANDARD",
                tags=self._args.tags,
                opts=pulumi.ResourceOptions(parent=self),
            )
            aws.eks.AccessPolicyAssociation(
                f"{self._name}-admin-{i}-policy",
                cluster_name=self.cluster.name,
                principal_arn=entry.principal_arn,
                policy_arn=CLUSTER_ADMIN_POLICY_ARN,
                access_scope=aws.eks.AccessPolicyAssociationAccessScopeArgs(type="cluster"),
                opts=pulumi.ResourceOptions(parent=self),
            )

    def _create_addon(self, addon: str, depends_on: list[pulumi.Resource]) -> aws.eks.Addon:
        # addon_version is left unset: EKS installs its default version for the cluster's Kubernetes version. A pinned
        # table (add-on version x Kubernetes version) cannot be checked offline and rots with every EKS release; a
        # version bump is done deliberately by pinning here after `aws eks describe-addon-versions`.
        configuration = None
        pod_identity = None
        if addon == "vpc-cni":
            # NetworkPolicy objects are no-ops unless the VPC CNI's network policy agent is on.
            configuration = json.dumps({"enableNetworkPolicy": "true"})
        if addon == "aws-ebs-csi-driver":
            # Volumes the driver creates for PVCs carry the stack tags, so cost allocation sees them and the teardown
            # sweep can recognise them as this stack's (the driver's own tags name no cluster).
            configuration = json.dumps({"controller": {"extraVolumeTags": self._args.tags}})
        if addon == "aws-ebs-csi-driver" and self._args.ebs_csi_role_arn is not None:
            pod_identity = [
                aws.eks.AddonPodIdentityAssociationArgs(
                    role_arn=self._args.ebs_csi_role_arn, service_account="ebs-csi-controller-sa"
                )
            ]
        return aws.eks.Addon(
            f"{self._name}-addon-{addon}",
            cluster_name=self.cluster.name,
            addon_name=addon,
            configuration_values=configuration,
            pod_identity_associations=pod_identity,
            # The cluster bootstraps self-managed vpc-cni/kube-proxy/coredns; the managed add-on takes them over.
            resolve_conflicts_on_create="OVERWRITE",
            resolve_conflicts_on_update="OVERWRITE",
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=depends_on),
        )

    # -- nodes ---------------------------------------------------------------------------------------------------------
    def _launch_template(
        self,
        pool_name: str,
        disk_gb: int,
        network_interfaces: list[aws.ec2.LaunchTemplateNetworkInterfaceArgs] | None = None,
        placement: aws.ec2.LaunchTemplatePlacementArgs | None = None,
        user_data: str | None = None,
        **extra: object,
    ) -> aws.ec2.LaunchTemplate:
        """Launch template for a managed node group: encrypted gp3 root volume, IMDSv2 only, tags on instances and
        volumes. No AMI: EKS fills it in for the node group's AMI type, and its bootstrap user data too (merged with
        `user_data`, a nodeadm NodeConfig, when given)."""
        spec = self._args
        propagated = {**self._args.tags, POOL_LABEL: pool_name}
        # aws-node-termination-handler (checkTagBeforeDraining, managedTag = this key; infra/spot_interruptions.py)
        # drains only instances carrying its managed tag, read from the EC2 instance's own tags (NTH v1.25.6
        # pkg/monitor/sqsevent: CheckIfManaged/ManagedTag on the instance). The ASG's tag of the same key (EKS's, for
        # the Cluster Autoscaler) is not propagated to instances, so the launch template sets it.
        instance_only = {autoscaler_tag_keys(spec.name_prefix)[1]: "owned"}
        return aws.ec2.LaunchTemplate(
            f"{self._name}-{pool_name}-lt",
            name=f"{spec.name_prefix}-{pool_name}",
            description=f"{spec.name_prefix} {pool_name} nodes",
            block_device_mappings=[
                aws.ec2.LaunchTemplateBlockDeviceMappingArgs(
                    device_name="/dev/xvda",
                    ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                        volume_size=disk_gb,
                        volume_type="gp3",
                        # The AWS-managed EBS key: a customer key here would need a key-policy grant to the
                        # Auto Scaling service-linked role, or instances fail to launch with an opaque error.
                        encrypted="true",
                        delete_on_termination="true",
                    ),
                )
            ],
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(
                http_endpoint="enabled",
                http_tokens="required",
                # Hop limit 1: pods (one network hop further) cannot read the node role's credentials from IMDS.
                # Pods get their own credentials from the Pod Identity agent, so nothing in a pod needs IMDS.
                http_put_response_hop_limit=1,
            ),
            network_interfaces=network_interfaces,
            placement=placement,
            user_data=base64.b64encode(user_data.encode()).decode() if user_data else None,
            **extra,
            tag_specifications=[
                aws.ec2.LaunchTemplateTagSpecificationArgs(
                    resource_type=kind, tags={**propagated, **(instance_only if kind == "instance" else {})}
                )
                for kind in ("instance", "volume", "network-interface")
            ],
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )

    def _create_system_node_group(self, early_addons: list[aws.eks.Addon]) -> aws.eks.NodeGroup:
        """Small group for CoreDNS, add-on controllers and gateways (on-demand, or spot where systemCapacityType
        says: managed node groups rebalance spot capacity and drain a node on its interruption notice, EKS user
        guide "Managed node groups: capacity types"). It is never tainted: untainted capacity is where everything
        that does not need a GPU runs."""
        spec = self._args
        lt = self._launch_template(SYSTEM_POOL, SYSTEM_DISK_GB)
        count = spec.cluster.system_node_count
        return aws.eks.NodeGroup(
            f"{self._name}-{SYSTEM_POOL}",
            cluster_name=self.cluster.name,
            node_group_name=f"{spec.name_prefix}-{SYSTEM_POOL}",
            node_role_arn=self._args.node_role_arn,
            subnet_ids=self._args.private_subnet_ids,
            ami_type=SYSTEM_AMI_TYPE,
            capacity_type=spec.cluster.system_capacity_type,
            instance_types=[spec.cluster.system_instance_type],
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(min_size=count, max_size=count, desired_size=count),
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
            labels={POOL_LABEL: SYSTEM_POOL},
            launch_template=aws.eks.NodeGroupLaunchTemplateArgs(id=lt.id, version=lt.latest_version.apply(str)),
            tags=self._args.tags,
            # Without the CNI the nodes never become Ready and the node group creation fails.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*early_addons, *self._args.node_role_policies]),
        )

    def _create_gpu_node_group(self, pool: GpuPool, early_addons: list[aws.eks.Addon]) -> aws.eks.NodeGroup:
        spec = self._args
        subnet_ids: pulumi.Input[list[str]] = self._args.private_subnet_ids
        network_interfaces = None
        placement = None
        if pool.efa:
            subnet_ids, network_interfaces, placement = self._efa_networking(pool)
        if pool.capacity_reservation_id:
            # A reservation lives in one zone, and its instances are placed by the reservation: a cluster placement
            # group would also have to be the reservation's own (EC2 User Guide, "Capacity Reservations in cluster
            # placement groups"), so none is named here.
            subnet_ids, placement = self._training_subnet(), None
        local_nvme = all(t in NVME_INSTANCE_STORE_GB for t in pool.instance_types)
        lt = self._launch_template(
            pool.name,
            pool.disk_gb,
            network_interfaces,
            placement,
            LOCAL_NVME_NODE_CONFIG if local_nvme else None,
            **reservation_launch_template_args(pool),
        )
        return aws.eks.NodeGroup(
            f"{self._name}-{pool.name}",
            cluster_name=self.cluster.name,
            node_group_name=f"{spec.name_prefix}-{pool.name}",
            node_role_arn=self._args.node_role_arn,
            subnet_ids=subnet_ids,
            ami_type=GPU_AMI_TYPE,
            capacity_type=node_group_capacity_type(pool),
            instance_types=list(pool.instance_types),
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=pool.min_size, max_size=pool.max_size, desired_size=pool.min_size
            ),
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
            labels=pool.labels,
            taints=[
                aws.eks.NodeGroupTaintArgs(key=t["key"], value=t["value"], effect=_TAINT_EFFECTS[t["effect"]])
                for t in pool.taints
            ],
            launch_template=aws.eks.NodeGroupLaunchTemplateArgs(id=lt.id, version=lt.latest_version.apply(str)),
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[*early_addons, *self._args.node_role_policies],
                # desired_size starts at the minimum and then belongs to the cluster autoscaler (or whatever scales
                # the group); re-applying the stack must not reset a busy pool to its minimum.
                ignore_changes=["scalingConfig.desiredSize"],
            ),
        )

    def _create_batch_node_group(self, pool: BatchPool, early_addons: list[aws.eks.Addon]) -> aws.eks.NodeGroup:
        """CPU nodes for batch work (data preparation), from zero. Not the system pool: that one is fixed-size and
        sized for controllers, and a preparation's worker pods (a core and 4 GiB each, for hours) would starve CoreDNS
        and the autoscaler or never fit. Tainted (facts.cluster.BATCH_TAINT) so nothing else lands here: an idle
        node then has no pod to keep it, and the Cluster Autoscaler removes it (scaleDownUnneededMinutes)."""
        spec = self._args
        lt = self._launch_template(pool.name, pool.disk_gb)
        return aws.eks.NodeGroup(
            f"{self._name}-{pool.name}",
            cluster_name=self.cluster.name,
            node_group_name=f"{spec.name_prefix}-{pool.name}",
            node_role_arn=self._args.node_role_arn,
            subnet_ids=self._args.private_subnet_ids,
            ami_type=SYSTEM_AMI_TYPE,
            capacity_type=pool.capacity_type,
            instance_types=list(pool.instance_types),
            scaling_config=aws.eks.NodeGroupScalingConfigArgs(
                min_size=pool.min_size, max_size=pool.max_size, desired_size=pool.min_size
            ),
            update_config=aws.eks.NodeGroupUpdateConfigArgs(max_unavailable=1),
            labels=pool.labels,
            taints=[
                aws.eks.NodeGroupTaintArgs(key=t["key"], value=t["value"], effect=_TAINT_EFFECTS[t["effect"]])
                for t in pool.taints
            ],
            launch_template=aws.eks.NodeGroupLaunchTemplateArgs(id=lt.id, version=lt.latest_version.apply(str)),
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[*early_addons, *self._args.node_role_policies],
                # As for the GPU pools: desired_size belongs to the Cluster Autoscaler once the group exists.
                ignore_changes=["scalingConfig.desiredSize"],
            ),
        )

    def _efa_networking(
        self, pool: GpuPool
    ) -> tuple[
        pulumi.Output[list[str]], list[aws.ec2.LaunchTemplateNetworkInterfaceArgs], aws.ec2.LaunchTemplatePlacementArgs
    ]:
        """EFA: a cluster placement group and one subnet, so all training nodes share one AZ and one spine (EFA
        traffic does not cross AZs). One EFA interface per network card, sized for the pool's smallest type: the
        first also carries the node's IP traffic, the others are EFA-only (no IP address consumed from the subnet)."""
        spec = self._args
        group = aws.ec2.PlacementGroup(
            f"{self._name}-{pool.name}-pg",
            name=f"{spec.name_prefix}-{pool.name}",
            strategy="cluster",
            tags=self._args.tags,
            opts=pulumi.ResourceOptions(parent=self),
        )
        single_subnet = self._training_subnet()
        # One interface per network card (facts.instance_types): what the EFA device plugin then advertises, and
        # what the autoscaler's node template and the training pod's default request say.
        cards = pool.efa_interfaces_per_node
        interfaces = [
            aws.ec2.LaunchTemplateNetworkInterfaceArgs(
                device_index=0 if card == 0 else 1,
                network_card_index=card,
                interface_type="efa" if card == 0 else "efa-only",
                delete_on_termination="true",
                # EFA needs a security group that allows all traffic to and from itself: the cluster SG does.
                security_groups=[self.security_group_id],
            )
            for card in range(cards)
        ]
        return single_subnet, interfaces, aws.ec2.LaunchTemplatePlacementArgs(group_name=group.name)

    def _training_subnet(self) -> pulumi.Output[list[str]]:
        index = self._args.training_subnet_index
        return pulumi.Output.from_input(self._args.private_subnet_ids).apply(lambda ids: [ids[index]])


def _kubeconfig(cluster_name: str, endpoint: str, ca_data: str, region: str) -> str:
    """A kubeconfig (JSON is valid YAML) that gets a short-lived token from the caller's AWS credentials."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": cluster_name, "cluster": {"server": endpoint, "certificate-authority-data": ca_data}}
            ],
            "contexts": [{"name": cluster_name, "context": {"cluster": cluster_name, "user": cluster_name}}],
            "current-context": cluster_name,
            "users": [
                {
                    "name": cluster_name,
                    "user": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1beta1",
                            "command": "aws",
                            "args": ["eks", "get-token", "--cluster-name", cluster_name, "--region", region],
                            "interactiveMode": "Never",
                        }
                    },
                }
            ],
        },
        indent=2,
    )
