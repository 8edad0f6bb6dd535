"""Fixtures for the operations tests: a moto account seeded with one stack's leftovers and things that must survive."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest

from facts.tags import stack_tags

REGION = "us-east-1"
STACK = "dev"
CLUSTER = "llm-platform-dev"
OTHER_STACK = "staging"
OTHER_CLUSTER = "llm-platform-staging"


@dataclass
class Seeded:
    """IDs of what was created, by who owns it."""

    ours: dict[str, set[str]] = field(default_factory=dict)
    """kind -> ids the sweep must report (and delete with --force)."""
    ours_not_deletable: dict[str, set[str]] = field(default_factory=dict)
    """kind -> ids the sweep must report but leave to pulumi destroy (or to their owner's deletion)."""
    survivors: dict[str, set[str]] = field(default_factory=dict)
    """kind -> ids of another stack's or untagged resources: never reported, never deleted."""

    def add(self, bucket: dict[str, set[str]], kind: str, rid: str) -> str:
        bucket.setdefault(kind, set()).add(rid)
        return rid


def _ec2_tags(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _spec(resource: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    return [{"ResourceType": resource, "Tags": _ec2_tags(tags)}] if tags else []


class Seeder:
    """Creates resources the way Pulumi and the in-cluster controllers would, tags and all."""

    def __init__(self, seeded: Seeded) -> None:
        self.s = seeded
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.elbv2 = boto3.client("elbv2", region_name=REGION)
        self.elb = boto3.client("elb", region_name=REGION)
        self.s3 = boto3.client("s3", region_name=REGION)
        self.ecr = boto3.client("ecr", region_name=REGION)
        self.sm = boto3.client("sagemaker", region_name=REGION)
        vpc = self.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        self.vpc = vpc
        self.subnets = [
            self.ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=f"{REGION}{az}")["Subnet"][
                "SubnetId"
            ]
            for i, az in enumerate("ab")
        ]
        # moto launches from any AMI id; listing its real catalogue costs more than a second per test.
        self.image = "ami-0123456789abcdef0"

    def instance(self, tags: dict[str, str]) -> str:
        return self.ec2.run_instances(
            ImageId=self.image,
            MinCount=1,
            MaxCount=1,
            InstanceType="t3.micro",
            SubnetId=self.subnets[0],
            TagSpecifications=_spec("instance", tags),
        )["Instances"][0]["InstanceId"]

    def security_group(self, name: str, tags: dict[str, str]) -> str:
        return self.ec2.create_security_group(
            GroupName=name, Description=name, VpcId=self.vpc, TagSpecifications=_spec("security-group", tags)
        )["GroupId"]

    def volume(self, tags: dict[str, str]) -> str:
        return self.ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=8, TagSpecifications=_spec("volume", tags))[
            "VolumeId"
        ]

    def eni(self, tags: dict[str, str]) -> str:
        return self.ec2.create_network_interface(
            SubnetId=self.subnets[0], TagSpecifications=_spec("network-interface", tags)
        )["NetworkInterface"]["NetworkInterfaceId"]

    def eip(self, tags: dict[str, str]) -> str:
        return self.ec2.allocate_address(Domain="vpc", TagSpecifications=_spec("elastic-ip", tags))["AllocationId"]

    def alb(self, name: str, tags: dict[str, str], sg: str) -> str:
        return self.elbv2.create_load_balancer(
            Name=name,
            Subnets=self.subnets,
            SecurityGroups=[sg],
            Type="application",
            Tags=_ec2_tags(tags),
        )["LoadBalancers"][0]["LoadBalancerName"]

    def target_group(self, name: str, tags: dict[str, str]) -> str:
        return self.elbv2.create_target_group(
            Name=name, Protocol="HTTP", Port=80, VpcId=self.vpc, TargetType="ip", Tags=_ec2_tags(tags)
        )["TargetGroups"][0]["TargetGroupName"]

    def classic_elb(self, name: str, tags: dict[str, str]) -> str:
        self.elb.create_load_balancer(
            LoadBalancerName=name,
            Subnets=[self.subnets[0]],
            Listeners=[{"Protocol": "TCP", "LoadBalancerPort": 80, "InstancePort": 30080}],
            Tags=_ec2_tags(tags),
        )
        return name

    def bucket(self, name: str, tags: dict[str, str], versions: int = 0) -> str:
        self.s3.create_bucket(Bucket=name)
        if tags:
            self.s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": _ec2_tags(tags)})
        if versions:
            self.s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
            for i in range(versions):
                self.s3.put_object(Bucket=name, Key="ckpt/step.pt", Body=f"v{i}".encode())
            self.s3.delete_object(Bucket=name, Key="ckpt/step.pt")  # leaves a delete marker too
        return name

    def repository(self, name: str, tags: dict[str, str], images: int = 0) -> str:
        self.ecr.create_repository(repositoryName=name, tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        for i in range(images):
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "config": {"digest": f"sha256:{i:064x}"},
                    "layers": [],
                }
            )
            self.ecr.put_image(repositoryName=name, imageManifest=manifest, imageTag=f"v{i}")
        return name

    def sagemaker(self, prefix: str, tags: dict[str, str]) -> tuple[str, str, str]:
        t = _ec2_tags(tags)
        model = f"{prefix}-model"
        self.sm.create_model(
            ModelName=model,
            ExecutionRoleArn="arn:aws:iam::123456789012:role/sm",
            PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/serving:1"},
            Tags=t,
        )
        config = f"{prefix}-config"
        self.sm.create_endpoint_config(
            EndpointConfigName=config,
            Tags=t,
            ProductionVariants=[
                {"VariantName": "main", "ModelName": model, "InitialInstanceCount": 1, "InstanceType": "ml.g4dn.xlarge"}
            ],
        )
        endpoint = f"{prefix}-endpoint"
        self.sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=config, Tags=t)
        return model, config, endpoint


@pytest.fixture
def seeded(aws_env: str, moto_reset: None) -> Iterator[Seeded]:
    """This stack's leftovers (Pulumi-tagged and controller-tagged), another stack's, and untagged resources."""
    s = Seeded()
    seed = Seeder(s)
    ours = stack_tags(STACK, "dev")
    theirs = stack_tags(OTHER_STACK, "staging")
    lbc = {"elbv2.k8s.aws/cluster": CLUSTER, "service.k8s.aws/stack": "serving/gateway"}
    lbc_other = {"elbv2.k8s.aws/cluster": OTHER_CLUSTER}

    # -- this stack, tagged by Pulumi
    s.add(s.ours, "instance", seed.instance(ours))
    s.add(s.ours, "security-group", seed.security_group("dev-nodes", ours))
    s.add(s.ours, "volume", seed.volume(ours))
    s.add(s.ours, "elastic-ip", seed.eip(ours))
    s.add(s.ours, "bucket", seed.bucket("dev-checkpoints-0001", ours, versions=3))
    s.add(s.ours, "repository", seed.repository("dev/serving", ours, images=2))
    model, config, endpoint = seed.sagemaker("dev-llm", ours)
    s.add(s.ours, "model", model)
    s.add(s.ours, "endpoint-config", config)
    s.add(s.ours, "endpoint", endpoint)
    # -- this stack's cluster, tagged by its controllers (no Pulumi tags at all)
    backend_sg = s.add(
        s.ours,
        "security-group",
        seed.security_group(
            "k8s-traffic-dev", {"elbv2.k8s.aws/cluster": CLUSTER, "elbv2.k8s.aws/resource": "backend-sg"}
        ),
    )
    s.add(s.ours, "load-balancer", seed.alb("k8s-serving-gateway", lbc, backend_sg))
    s.add(s.ours, "target-group", seed.target_group("k8s-serving-gw-tg", lbc))
    s.add(
        s.ours,
        "classic-load-balancer",
        seed.classic_elb(
            "a1b2c3-intree",
            {f"kubernetes.io/cluster/{CLUSTER}": "owned", "kubernetes.io/service-name": "serving/legacy"},
        ),
    )
    s.add(
        s.ours,
        "network-interface",
        seed.eni(
            {"cluster.k8s.amazonaws.com/name": CLUSTER, "node.k8s.amazonaws.com/instance_id": "i-0123456789abcdef0"}
        ),
    )
    s.add(
        s.ours,
        "volume",
        seed.volume(
            {
                "ebs.csi.aws.com/cluster": "true",
                "CSIVolumeName": "pvc-1",
                f"kubernetes.io/cluster/{CLUSTER}": "owned",
                "KubernetesCluster": CLUSTER,
            }
        ),
    )
    node = s.add(s.ours, "instance", seed.instance({"eks:eks-cluster-name": CLUSTER, "karpenter.sh/nodepool": "gpu"}))
    # Attached at sweep time, so not deletable then; terminating its node first must free it for deletion.
    data_volume = s.add(s.ours, "volume", seed.volume({"eks:cluster-name": CLUSTER}))
    seed.ec2.attach_volume(VolumeId=data_volume, InstanceId=node, Device="/dev/sdf")
    # -- this stack, tagged, but not the sweep's to delete: pulumi destroy owns VPCs
    tagged_vpc = seed.ec2.create_vpc(CidrBlock="10.8.0.0/16", TagSpecifications=_spec("vpc", ours))["Vpc"]["VpcId"]
    s.add(s.ours_not_deletable, "vpc", tagged_vpc)

    # -- another stack: same kinds, its own tags; one even carries our cluster's LB tag but its own stack tag
    s.add(s.survivors, "instance", seed.instance(theirs))
    s.add(s.survivors, "security-group", seed.security_group("staging-nodes", theirs))
    s.add(s.survivors, "volume", seed.volume(theirs))
    s.add(s.survivors, "bucket", seed.bucket("staging-checkpoints-0001", theirs, versions=1))
    s.add(s.survivors, "repository", seed.repository("staging/serving", theirs, images=1))
    for kind, rid in zip(("model", "endpoint-config", "endpoint"), seed.sagemaker("staging-llm", theirs), strict=True):
        s.add(s.survivors, kind, rid)
    other_sg = s.add(s.survivors, "security-group", seed.security_group("k8s-traffic-staging", lbc_other))
    s.add(s.survivors, "load-balancer", seed.alb("k8s-staging-gateway", lbc_other, other_sg))
    s.add(s.survivors, "target-group", seed.target_group("k8s-staging-tg", lbc | theirs))
    s.add(s.survivors, "network-interface", seed.eni({"cluster.k8s.amazonaws.com/name": OTHER_CLUSTER}))
    s.add(
        s.survivors,
        "volume",
        seed.volume({"ebs.csi.aws.com/cluster": "true", f"kubernetes.io/cluster/{OTHER_CLUSTER}": "owned"}),
    )
    # -- untagged, and "shared" (used by our cluster, not created by it): the traps of region-wide cleanups
    s.add(s.survivors, "instance", seed.instance({}))
    s.add(s.survivors, "security-group", seed.security_group("hand-made", {}))
    s.add(s.survivors, "volume", seed.volume({}))
    s.add(s.survivors, "volume", seed.volume({"ebs.csi.aws.com/cluster": "true"}))  # names no cluster
    s.add(s.survivors, "elastic-ip", seed.eip({}))
    s.add(s.survivors, "network-interface", seed.eni({}))
    s.add(s.survivors, "bucket", seed.bucket("someone-elses-data", {}))
    s.add(s.survivors, "repository", seed.repository("untagged/repo", {}, images=1))
    s.add(
        s.survivors,
        "classic-load-balancer",
        seed.classic_elb("shared-elb", {f"kubernetes.io/cluster/{CLUSTER}": "shared"}),
    )
    yield s
