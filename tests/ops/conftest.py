"""Fixtures for the operations tests: a moto account seeded with one stack's leftovers and things that must survive, and
a fake Kubernetes API for the pre-destroy cleanup."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

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


# -- a Kubernetes cluster for the pre-destroy cleanup ---------------------------------------------------------------


def _meta(ns: str | None, name: str) -> k.V1ObjectMeta:
    return k.V1ObjectMeta(namespace=ns, name=name)


class FakeCluster:
    """Stands in for CoreV1Api/NetworkingV1Api in the pre-destroy Kubernetes cleanup (no cluster here): it answers the
    list, read and delete calls ops.teardown makes with the kubernetes client's own model objects.

    Objects by kind; a deleted object disappears after `linger` more list calls (its finalizers running)."""

    def __init__(self, linger: int = 1) -> None:
        self.linger = linger
        self.objects: dict[tuple[str, str, str], Any] = {}
        self.terminating: dict[tuple[str, str, str], int] = {}
        self.calls: list[str] = []
        self.stuck: set[tuple[str, str, str]] = set()

    def add(self, kind: str, obj: Any) -> None:
        self.objects[(kind, obj.metadata.namespace or "", obj.metadata.name)] = obj

    def _tick(self) -> None:
        for key in list(self.terminating):
            self.terminating[key] -= 1
            if self.terminating[key] <= 0 and key not in self.stuck and self._released(key):
                self.objects.pop(key, None)
                self.terminating.pop(key)

    def _released(self, key: tuple[str, str, str]) -> bool:
        if key[0] == "PersistentVolumeClaim":  # pvc-protection: no pod may still mount it
            return not any(
                kind == "Pod"
                and any(
                    v.persistent_volume_claim and v.persistent_volume_claim.claim_name == key[2]
                    for v in pod.spec.volumes or []
                )
                for (kind, _, _), pod in self.objects.items()
            )
        return True

    def _list(self, kind: str, wrapper: Any) -> Any:
        self._tick()
        # PVs whose claim is gone and whose policy is Delete are removed by the (imitated) CSI provisioner.
        claims = {o.spec.volume_name for (kd, _, _), o in self.objects.items() if kd == "PersistentVolumeClaim"}
        for key, pv in list(self.objects.items()):
            if (
                key[0] == "PersistentVolume"
                and pv.spec.persistent_volume_reclaim_policy == "Delete"
                and key[2] not in claims
                and key not in self.stuck
            ):
                self.objects.pop(key)
        return wrapper(items=[o for (kd, _, _), o in self.objects.items() if kd == kind])

    def _delete(self, kind: str, name: str, namespace: str, body: k.V1DeleteOptions) -> None:
        assert body.propagation_policy == "Foreground"
        self.calls.append(f"{kind} {namespace}/{name}")
        key = (kind, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        self.terminating.setdefault(key, self.linger)

    # -- the CoreV1Api / NetworkingV1Api surface used by ops.teardown
    def list_service_for_all_namespaces(self, *, _request_timeout: object) -> k.V1ServiceList:
        return self._list("Service", k.V1ServiceList)

    def list_ingress_for_all_namespaces(self, *, _request_timeout: object) -> k.V1IngressList:
        return self._list("Ingress", k.V1IngressList)

    def list_persistent_volume_claim_for_all_namespaces(
        self, *, _request_timeout: object
    ) -> k.V1PersistentVolumeClaimList:
        return self._list("PersistentVolumeClaim", k.V1PersistentVolumeClaimList)

    def list_persistent_volume(self, *, _request_timeout: object) -> k.V1PersistentVolumeList:
        return self._list("PersistentVolume", k.V1PersistentVolumeList)

    def list_pod_for_all_namespaces(self, *, _request_timeout: object) -> k.V1PodList:
        return self._list("Pod", k.V1PodList)

    def read_persistent_volume(self, name: str, *, _request_timeout: object) -> k.V1PersistentVolume:
        return self.objects[("PersistentVolume", "", name)]

    def delete_namespaced_service(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("Service", name, namespace, body)

    def delete_namespaced_ingress(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("Ingress", name, namespace, body)

    def delete_namespaced_persistent_volume_claim(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("PersistentVolumeClaim", name, namespace, body)

    def delete_namespaced_pod(
        self, name: str, namespace: str, body: k.V1DeleteOptions, *, _request_timeout: object
    ) -> None:
        self._delete("Pod", name, namespace, body)


def _sample_cluster() -> FakeCluster:
    c = FakeCluster()
    lb = k.V1ServiceSpec(type="LoadBalancer")
    c.add("Service", k.V1Service(metadata=_meta("serving", "gateway"), spec=lb))
    c.add("Service", k.V1Service(metadata=_meta("serving", "engine"), spec=k.V1ServiceSpec(type="ClusterIP")))
    c.add("Service", k.V1Service(metadata=_meta("default", "kubernetes"), spec=k.V1ServiceSpec(type="ClusterIP")))
    c.add("Ingress", k.V1Ingress(metadata=_meta("serving", "api")))
    for ns, claim, pv, policy in (("training", "scratch", "pv-1", "Delete"), ("serving", "cache", "pv-2", "Retain")):
        c.add(
            "PersistentVolumeClaim",
            k.V1PersistentVolumeClaim(metadata=_meta(ns, claim), spec=k.V1PersistentVolumeClaimSpec(volume_name=pv)),
        )
        c.add(
            "PersistentVolume",
            k.V1PersistentVolume(
                metadata=_meta(None, pv), spec=k.V1PersistentVolumeSpec(persistent_volume_reclaim_policy=policy)
            ),
        )
    c.add(
        "PersistentVolumeClaim",
        k.V1PersistentVolumeClaim(  # pending: never bound, no PV
            metadata=_meta("training", "unbound"), spec=k.V1PersistentVolumeClaimSpec()
        ),
    )
    mount = k.V1Volume(name="data", persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(claim_name="scratch"))
    c.add("Pod", k.V1Pod(metadata=_meta("training", "trainer-0"), spec=k.V1PodSpec(containers=[], volumes=[mount])))
    c.add(
        "Pod",
        k.V1Pod(
            metadata=_meta("serving", "engine-0"),
            spec=k.V1PodSpec(containers=[], volumes=[k.V1Volume(name="tmp", empty_dir=k.V1EmptyDirVolumeSource())]),
        ),
    )
    return c


@pytest.fixture
def kube_cluster() -> FakeCluster:
    """A cluster holding what the cleanup must handle: a LoadBalancer Service and an Ingress (AWS load balancers),
    bound claims on Delete and Retain volumes, a pending claim, a pod mounting a claim and one that mounts none, and
    objects that own nothing in AWS. Deleted objects linger for one list call; set `linger` for longer."""
    return _sample_cluster()
