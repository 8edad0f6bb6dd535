"""The EKS cluster under the mock engine: control plane access and encryption, add-ons, node groups and the
scheduling contract (labels, taints) the GPU pools offer to workloads."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import yaml

from facts import pulumi_types as tok
from facts.cluster import GPU_TAINT, POOL_LABEL
from facts.tags import stack_tags
from infra.cluster import (
    ADDONS,
    CLUSTER_ADMIN_POLICY_ARN,
    CONTROL_PLANE_LOG_TYPES,
    GPU_AMI_TYPE,
    LOCAL_NVME_NODE_CONFIG,
    Cluster,
    ClusterArgs,
)
from infra.config import ConfigError, StackConfig
from infra.config import load_stack as stack_config
from ops.mocks import Run
from tests.helpers import run_component

KMS_ARN = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-4333-a444-555555555555"
SUBNETS = ["subnet-aaa", "subnet-bbb"]
ADMIN = "arn:aws:iam::123456789012:role/platform-admins"

NODE_GROUP = tok.EKS_NODE_GROUP
LAUNCH_TEMPLATE = tok.EC2_LAUNCH_TEMPLATE

DEPLOYER_CIDR = "1.2.3.4/32"
"""A globally routable address standing in for the deployer's egress IP (documentation ranges are refused)."""


def run_cluster(cfg: StackConfig, **extra: Any) -> Run:
    def program() -> dict[str, Any]:
        cluster = Cluster(
            "cluster",
            ClusterArgs(
                cluster=cfg.cluster,
                name_prefix=cfg.name_prefix,
                region=cfg.region,
                vpc_cidr=cfg.network.vpc_cidr,
                vpc_id="vpc-123",
                private_subnet_ids=SUBNETS,
                cluster_role_arn="arn:aws:iam::123456789012:role/cluster",
                node_role_arn="arn:aws:iam::123456789012:role/node",
                kms_key_arn=KMS_ARN,
                tags=stack_tags(cfg.stack, cfg.environment),
                **extra,
            ),
        )
        return {
            "name": cluster.name,
            "kubeconfig": cluster.kubeconfig,
            "security_group_id": cluster.security_group_id,
            "node_groups": sorted(cluster.node_groups),
        }

    return run_component(cfg, program)


@pytest.fixture
def dev() -> tuple[StackConfig, Run]:
    # Function scope: a Run recorded earlier can pick up option records from later runs (see the report on
    # ops/mocks.py), so each test gets a fresh one (~0.1 s).
    # The workstation path (kubernetesDeployer public-allowlist), a routable deployer address supplied at deploy time.
    cfg = stack_config(
        "dev",
        clusterAdminArns=[ADMIN],
        kubernetesDeployer="public-allowlist",
        publicApiEndpoint=True,
        publicApiCidrs=[DEPLOYER_CIDR],
    )
    return cfg, run_cluster(cfg)


def test_control_plane_is_private_encrypted_and_logged(dev: tuple[StackConfig, Run]) -> None:
    cfg, run = dev
    eks = run.one(tok.EKS_CLUSTER).inputs
    assert eks["name"] == cfg.name_prefix == "llmp-dev"
    assert eks["version"] == cfg.cluster.kubernetes_version
    assert eks["accessConfig"]["authenticationMode"] == "API"
    vpc = eks["vpcConfig"]
    assert vpc["endpointPrivateAccess"] is True
    assert vpc["subnetIds"] == SUBNETS
    # the public endpoint is open to the deployer's allowlist only
    assert vpc["endpointPublicAccess"] is True
    assert vpc["publicAccessCidrs"] == list(cfg.cluster.public_api_cidrs) == [DEPLOYER_CIDR]
    assert eks["encryptionConfig"] == {"provider": {"keyArn": KMS_ARN}, "resources": ["secrets"]}
    assert sorted(eks["enabledClusterLogTypes"]) == sorted(CONTROL_PLANE_LOG_TYPES)
    assert len(set(eks["enabledClusterLogTypes"])) == 5
    assert eks["tags"] == stack_tags("dev", "dev")
    log_group = run.one(tok.CLOUDWATCH_LOG_GROUP).inputs
    assert log_group["name"] == "/aws/eks/llmp-dev/cluster"
    assert log_group["retentionInDays"] > 0


def test_public_endpoint_off_means_no_public_access() -> None:
    cfg = stack_config("dev", publicApiEndpoint=False, publicApiCidrs=[])
    vpc = run_cluster(cfg).one(tok.EKS_CLUSTER).inputs["vpcConfig"]
    assert vpc["endpointPublicAccess"] is False
    assert vpc["endpointPrivateAccess"] is True
    assert "publicAccessCidrs" not in vpc


def test_api_security_group_admits_only_https_from_the_vpc(dev: tuple[StackConfig, Run]) -> None:
    cfg, run = dev
    sg = run.one(tok.EC2_SECURITY_GROUP).inputs
    assert sg["vpcId"] == "vpc-123"
    assert [(r["fromPort"], r["toPort"], r["cidrBlocks"]) for r in sg["ingress"]] == [
        (443, 443, [cfg.network.vpc_cidr])
    ]
    assert sg["egress"] == []
    assert run.outputs["security_group_id"].startswith("sg-")


def test_admins_get_access_entries_with_cluster_admin_policy(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    entry = run.one(tok.EKS_ACCESS_ENTRY).inputs
    assert entry["principalArn"] == ADMIN
    assoc = run.one(tok.EKS_ACCESS_POLICY_ASSOCIATION).inputs
    assert assoc["principalArn"] == ADMIN
    assert assoc["policyArn"] == CLUSTER_ADMIN_POLICY_ARN
    assert assoc["accessScope"] == {"type": "cluster"}


def test_a_stack_without_a_break_glass_admin_role_is_refused() -> None:
    for admins in ([], ["arn:aws:iam::123456789012:user/alice"]):
        with pytest.raises(ConfigError, match="at least one IAM role besides the identity that creates the cluster"):
            stack_config("dev", clusterAdminArns=admins)


def test_all_managed_addons_with_network_policy_enabled(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    addons = {r.inputs["addonName"]: r for r in run.of_type(tok.EKS_ADDON)}
    assert set(addons) == set(ADDONS)
    assert {"vpc-cni", "coredns", "kube-proxy", "eks-pod-identity-agent", "aws-ebs-csi-driver"} <= set(addons)
    assert json.loads(addons["vpc-cni"].inputs["configurationValues"]) == {"enableNetworkPolicy": "true"}
    # CoreDNS and the EBS CSI controller are Deployments: they wait for the system nodes
    assert "aws:eks/nodeGroup:NodeGroup::cluster-system" in addons["coredns"].depends_on
    assert addons["vpc-cni"].depends_on == []
    system = run.one(NODE_GROUP, "cluster-system")
    assert "aws:eks/addon:Addon::cluster-addon-vpc-cni" in system.depends_on


def test_ebs_csi_role_through_pod_identity() -> None:
    run = run_cluster(stack_config("dev"), ebs_csi_role_arn="arn:aws:iam::123456789012:role/ebs")
    addon = run.one(tok.EKS_ADDON, "cluster-addon-aws-ebs-csi-driver").inputs
    assert addon["podIdentityAssociations"] == [
        {"roleArn": "arn:aws:iam::123456789012:role/ebs", "serviceAccount": "ebs-csi-controller-sa"}
    ]


def test_system_node_group(dev: tuple[StackConfig, Run]) -> None:
    cfg, run = dev
    ng = run.one(NODE_GROUP, "cluster-system").inputs
    assert ng["labels"] == {POOL_LABEL: "system"}
    assert ng["instanceTypes"] == [cfg.cluster.system_instance_type]
    assert ng["scalingConfig"]["desiredSize"] == cfg.cluster.system_node_count
    assert ng["subnetIds"] == SUBNETS
    assert "taints" not in ng


@pytest.mark.parametrize("purpose", ["training", "inference"])
def test_gpu_node_groups_offer_the_pool_contract(dev: tuple[StackConfig, Run], purpose: str) -> None:
    cfg, run = dev
    pool = cfg.cluster.pool(purpose)
    rec = run.one(NODE_GROUP, f"cluster-{purpose}")
    ng = rec.inputs
    assert ng["nodeGroupName"] == f"llmp-dev-{purpose}"
    assert ng["amiType"] == GPU_AMI_TYPE == "AL2023_x86_64_NVIDIA"
    assert ng["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]
    assert (GPU_TAINT["key"], GPU_TAINT["value"]) == ("nvidia.com/gpu", "true")
    assert ng["labels"] == pool.labels
    assert ng["labels"][POOL_LABEL] == pool.name
    assert ng["instanceTypes"] == list(pool.instance_types)
    assert ng["capacityType"] == pool.capacity_type == "SPOT"
    assert ng["scalingConfig"] == {"minSize": pool.min_size, "maxSize": pool.max_size, "desiredSize": pool.min_size}
    assert ng["subnetIds"] == SUBNETS
    assert "diskSize" not in ng  # the launch template sizes the disk
    assert ng["tags"] == stack_tags("dev", "dev")


def test_launch_templates_encrypt_root_volume_require_imdsv2_and_propagate_tags(dev: tuple[StackConfig, Run]) -> None:
    cfg, run = dev
    templates = {r.name: r.inputs for r in run.of_type(LAUNCH_TEMPLATE)}
    assert set(templates) == {"cluster-system-lt", "cluster-training-lt", "cluster-inference-lt", "cluster-batch-lt"}
    for name, lt in templates.items():
        ebs = lt["blockDeviceMappings"][0]["ebs"]
        assert ebs["encrypted"] == "true", name
        assert ebs["volumeType"] == "gp3"
        assert lt["metadataOptions"]["httpTokens"] == "required"
        assert lt["metadataOptions"]["httpPutResponseHopLimit"] == 1
        kinds = {spec["resourceType"]: spec["tags"] for spec in lt["tagSpecifications"]}
        assert {"instance", "volume"} <= set(kinds)
        for tags in kinds.values():
            assert stack_tags("dev", "dev").items() <= tags.items()
        assert "imageId" not in lt
    # System nodes: EKS's own bootstrap only. GPU nodes: scratch, caches and images on the instance's NVMe.
    assert "userData" not in templates["cluster-system-lt"]
    for pool in ("training", "inference"):
        user_data = base64.b64decode(templates[f"cluster-{pool}-lt"]["userData"]).decode()
        assert user_data == LOCAL_NVME_NODE_CONFIG
        node_config = yaml.safe_load(user_data.split("---\n", 1)[1].split("\n--BOUNDARY--")[0])
        assert node_config["kind"] == "NodeConfig" and node_config["apiVersion"] == "node.eks.aws/v1alpha1"
        assert node_config["spec"]["instance"]["localStorage"] == {"strategy": "RAID0"}
    assert templates["cluster-inference-lt"]["blockDeviceMappings"][0]["ebs"]["volumeSize"] == (
        cfg.cluster.pool("inference").disk_gb
    )


def test_node_groups_use_their_launch_template(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    for ng in run.of_type(NODE_GROUP):
        assert ng.inputs["launchTemplate"]["id"].startswith("lt-")
        assert ng.inputs["launchTemplate"]["version"] == "1"


def test_no_efa_no_placement_group(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    assert run.of_type(tok.EC2_PLACEMENT_GROUP) == []
    assert "networkInterfaces" not in run.one(LAUNCH_TEMPLATE, "cluster-training-lt").inputs


def test_efa_training_pool_single_subnet_placement_group_and_efa_interface() -> None:
    cfg = stack_config("dev", trainingInstanceTypes=["p4d.24xlarge"], trainingEfa=True, trainingMaxSize=1, maxGpus=16)
    run = run_cluster(cfg)
    pg = run.one(tok.EC2_PLACEMENT_GROUP).inputs
    assert pg["strategy"] == "cluster"
    lt = run.one(LAUNCH_TEMPLATE, "cluster-training-lt").inputs
    assert lt["placement"]["groupName"] == pg["name"]
    nics = lt["networkInterfaces"]
    assert len(nics) == 4  # p4d.24xlarge: one EFA interface per network card
    assert [(n["networkCardIndex"], n["deviceIndex"], n["interfaceType"]) for n in nics] == [
        (0, 0, "efa"),
        (1, 1, "efa-only"),
        (2, 1, "efa-only"),
        (3, 1, "efa-only"),
    ]
    for nic in nics:
        assert nic["securityGroups"] == [run.outputs["security_group_id"]]
    assert run.one(NODE_GROUP, "cluster-training").inputs["subnetIds"] == SUBNETS[:1]
    # inference is untouched by training's EFA
    assert "networkInterfaces" not in run.one(LAUNCH_TEMPLATE, "cluster-inference-lt").inputs
    assert run.one(NODE_GROUP, "cluster-inference").inputs["subnetIds"] == SUBNETS


def test_kubeconfig_is_secret_and_uses_exec_auth(dev: tuple[StackConfig, Run]) -> None:
    cfg, run = dev
    assert "kubeconfig" in run.secret_outputs
    kc = json.loads(run.outputs["kubeconfig"])
    user = kc["users"][0]["user"]
    assert "token" not in user
    assert user["exec"]["command"] == "aws"
    assert user["exec"]["args"] == ["eks", "get-token", "--cluster-name", "llmp-dev", "--region", cfg.region]
    assert kc["clusters"][0]["cluster"]["server"].startswith("https://")


def test_provider_is_the_cluster_layers_built_from_the_aws_layers_outputs(run_stack) -> None:
    # Workloads need nodes and DNS: the provider (and so every object) exists only in the cluster layer, applied
    # after the AWS layer's `up` (system node group and every add-on) has finished (infra/layers.py).
    run = run_stack("dev")
    assert not [r for r in run.layers["aws"].resources if r.type == tok.KUBERNETES_PROVIDER]
    provider = run.one(tok.KUBERNETES_PROVIDER)
    assert provider.stack == "dev-cluster" and provider.parent is None
    assert json.loads(provider.inputs["kubeconfig"]) == json.loads(run.layers["aws"].outputs["kubeconfig"])
    aws_side = {(r.type, r.name) for r in run.layers["aws"].resources}
    assert ("aws:eks/nodeGroup:NodeGroup", "cluster-system") in aws_side
    assert {("aws:eks/addon:Addon", f"cluster-addon-{a}") for a in ADDONS} <= aws_side


def test_everything_is_a_child_tagged_and_uniquely_named(dev: tuple[StackConfig, Run]) -> None:
    _, run = dev
    assert run.duplicate_names() == []
    for r in run.resources:
        if r.type == "llm-platform:infra:Cluster":
            continue
        assert r.parent == "cluster", r.name
        assert r.name.startswith("cluster-"), r.name
        if r.type.startswith("aws:") and r.type != tok.EKS_ACCESS_POLICY_ASSOCIATION:
            assert r.inputs.get("tags", {}).items() >= stack_tags("dev", "dev").items(), r.name


def test_autoscaler_owns_desired_size(run_stack) -> None:
    """Pulumi must not reset a GPU pool the autoscaler scaled up (that would kill running training jobs)."""
    for group in run_stack("dev").of_type(NODE_GROUP):
        if group.inputs["amiType"] == "AL2023_x86_64_NVIDIA":
            assert group.ignore_changes == ["scalingConfig.desiredSize"], group.name


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_shipped_stacks(stack: str) -> None:
    cfg = stack_config(stack)
    run = run_cluster(cfg)
    assert run.duplicate_names() == []
    eks = run.one(tok.EKS_CLUSTER).inputs
    assert eks["name"] == cfg.name_prefix
    assert eks["vpcConfig"]["endpointPublicAccess"] is cfg.cluster.public_api_endpoint
    assert len(run.of_type(tok.EKS_ACCESS_ENTRY)) == len(cfg.cluster.admin_arns)
    assert len(run.of_type(NODE_GROUP)) == 4  # system, training, inference, batch
    efa = cfg.cluster.pool("training").efa
    assert len(run.of_type(tok.EC2_PLACEMENT_GROUP)) == (1 if efa else 0)


def test_ebs_csi_volumes_carry_the_stack_tags(run_stack) -> None:
    """PVC-backed volumes are created by the driver, not Pulumi: they must still be attributable to the stack."""
    import json as _json

    from facts.tags import stack_tags

    run = run_stack("dev")
    addon = run.one(tok.EKS_ADDON, "cluster-addon-aws-ebs-csi-driver")
    assert _json.loads(addon.inputs["configurationValues"]) == {
        "controller": {"extraVolumeTags": stack_tags("dev", "dev")}
    }


def test_service_cidr_and_log_retention_come_from_config(run_stack) -> None:
    run = run_stack("prod")
    cluster = run.one(tok.EKS_CLUSTER)
    assert cluster.inputs["kubernetesNetworkConfig"]["serviceIpv4Cidr"] == "172.20.0.0/16"
    logs = run.one(tok.CLOUDWATCH_LOG_GROUP, "cluster-control-plane-logs")
    assert logs.inputs["retentionInDays"] == 90
