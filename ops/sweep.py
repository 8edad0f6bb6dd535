"""Find (and, only when asked, delete) what a stack left behind in its AWS account and region.

Ownership is decided from tags alone, per resource, by `Ownership.owns`:

* the stack's own tag (`llm-platform:stack=<stack>`, from facts/tags.py) marks everything Pulumi created;
* resources that Kubernetes controllers created for the stack's cluster carry no Pulumi tags, so they are
  recognised by the ownership tags those controllers set, keyed by the cluster's name (unique per account and
  region, and read from the stack's outputs): the AWS Load Balancer Controller's `elbv2.k8s.aws/cluster`
  (and its legacy `ingress.k8s.aws/cluster`), the in-tree cloud provider's and EBS CSI driver's
  `kubernetes.io/cluster/<name>=owned` and `KubernetesCluster`, the VPC CNI's `cluster.k8s.amazonaws.com/name`,
  and EKS's own `eks:cluster-name` / `eks:eks-cluster-name` / `aws:eks:cluster-name` on nodes it launched.
* a resource whose stack tag names another stack is never ours, whatever else it carries; an untagged resource
  is never ours. `kubernetes.io/cluster/<name>=shared` (subnets shared with a cluster) is not ownership.

Per-service describe calls do the finding, because they return state (an ENI in use, a volume attached) that
decides whether a leftover may be deleted, and because controller-created resources are matched by tag *keys*
that embed the cluster name. The Resource Groups Tagging API then catches anything else still carrying the
stack tag (a VPC, a KMS key, a log group ...) so nothing tagged for the stack goes unreported; those are
reported only, never deleted here: `pulumi destroy` (or a `pulumi refresh` then destroy) owns them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import boto3
from botocore.exceptions import ClientError, WaiterError

from facts.tags import STACK_TAG

# Tags that name the owning cluster, as the controllers running in it write them. Value must equal the name.
CLUSTER_NAME_TAGS = (
    "elbv2.k8s.aws/cluster",  # AWS Load Balancer Controller: LBs, target groups, backend/frontend SGs
    "ingress.k8s.aws/cluster",  # the same controller's pre-2.x tag, still read by it on old resources
    "cluster.k8s.amazonaws.com/name",  # VPC CNI: ENIs it creates for pod IPs
    "KubernetesCluster",  # in-tree cloud provider and EBS CSI driver (with k8s-tag-cluster-id), legacy form
    "eks:cluster-name",  # EKS managed node groups: their instances and launch-template volumes
    "eks:eks-cluster-name",  # Karpenter / EKS Auto Mode nodes
    "aws:eks:cluster-name",  # EKS itself: the cluster security group and control-plane ENIs
)
# `kubernetes.io/cluster/<name>`: in-tree provider (classic ELBs, their SGs), EBS CSI with k8s-tag-cluster-id,
# Karpenter nodes. Only the value "owned" means the cluster created it; "shared" marks things it merely uses.
CLUSTER_OWNED_PREFIX = "kubernetes.io/cluster/"


@dataclass(frozen=True)
class Ownership:
    """Which stack (and which of its clusters) a sweep works for."""

    stack: str
    cluster_name: str | None = None

    def __post_init__(self) -> None:
        # An empty name would match every untagged-but-keyed resource; refuse it instead of sweeping too widely.
        if not self.stack:
            raise ValueError("a sweep needs a stack name")
        if self.cluster_name is not None and not self.cluster_name:
            raise ValueError("cluster_name must be None or a non-empty name")

    def owns(self, tags: Mapping[str, str]) -> str | None:
        """The `key=value` that makes this resource ours, or None. Another stack's tag always wins."""
        stack = tags.get(STACK_TAG)
        if stack is not None:
            return f"{STACK_TAG}={stack}" if stack == self.stack else None
        if self.cluster_name is None:
            return None
        for key in CLUSTER_NAME_TAGS:
            if tags.get(key) == self.cluster_name:
                return f"{key}={self.cluster_name}"
        owned_key = CLUSTER_OWNED_PREFIX + self.cluster_name
        if tags.get(owned_key) == "owned":
            return f"{owned_key}=owned"
        return None


@dataclass
class Finding:
    """One leftover resource."""

    service: str
    kind: str
    id: str
    arn: str | None
    matched_by: str
    state: str | None = None
    deletable: bool = True
    """False when deleting it now would fail or is not this tool's job (an ENI in use, a VPC)."""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_ARN_RE = re.compile(r"arn:[A-Za-z0-9-]+:[A-Za-z0-9-]+:[^'\"\s,)]*")


def arn_parts(arn: str) -> tuple[str, str, str]:
    """(service, resource type, resource id) of an ARN; S3 bucket ARNs carry no type, so they get "bucket"."""
    parts = arn.split(":", 5)
    service, resource = parts[2], parts[5] if len(parts) > 5 else ""
    if service == "s3" and "/" not in resource:
        return service, "bucket", resource
    # Resource types end at whichever of "/" or ":" comes first (instance/i-1, log-group:/aws/eks/x).
    cut = min((i for i in (resource.find("/"), resource.find(":")) if i >= 0), default=-1)
    if cut < 0:
        return service, resource, resource
    return service, resource[:cut], resource[cut + 1 :]


def _tags(items: Iterable[Mapping[str, str]] | None, key: str = "Key", value: str = "Value") -> dict[str, str]:
    return {t[key]: t.get(value, "") for t in items or ()}


def _chunks(seq: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


class Sweeper:
    """Finds leftovers of one stack with boto3 clients for one region, and deletes them on request."""

    def __init__(self, ownership: Ownership, region: str, session: boto3.Session | None = None) -> None:
        self.ownership = ownership
        self.region = region
        self._session = session or boto3.Session(region_name=region)
        self._clients: dict[str, Any] = {}

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._session.client(service, region_name=self.region)
        return self._clients[service]

    # ---- finding -------------------------------------------------------------------------------------------

    def find(self) -> list[Finding]:
        """Every leftover, in deletion order (KINDS)."""
        found: list[Finding] = []
        # One call per collector, in registry order (a collector may serve several kinds).
        for collect in dict.fromkeys(k.collect for k in KINDS):
            found.extend(collect(self))
        found.extend(self._tagged_elsewhere(found))
        rank = {k: i for i, k in enumerate(DELETE_ORDER)}
        return sorted(found, key=lambda f: rank.get((f.service, f.kind), len(rank)))

    def find_controller_owned_load_balancers(self) -> list[Finding]:
        """Load balancers and target groups matched by a cluster tag (the controllers' own, not Pulumi's)."""
        return [f for f in self._classic_elbs() + self._elbv2() if not f.matched_by.startswith(STACK_TAG + "=")]

    def _finding(self, service: str, kind: str, rid: str, tags: Mapping[str, str], **kw: Any) -> Finding | None:
        why = self.ownership.owns(tags)
        return Finding(service, kind, rid, matched_by=why, **kw) if why else None

    def _ec2_pages(self, op: str, key: str, **kw: Any) -> Iterator[dict[str, Any]]:
        for page in self.client("ec2").get_paginator(op).paginate(**kw):
            yield from page[key]

    def _instances(self) -> list[Finding]:
        out = []
        states = ["pending", "running", "stopping", "stopped"]
        for page in (
            self.client("ec2")
            .get_paginator("describe_instances")
            .paginate(Filters=[{"Name": "instance-state-name", "Values": states}])
        ):
            for res in page["Reservations"]:
                for inst in res["Instances"]:
                    f = self._finding(
                        "ec2",
                        "instance",
                        inst["InstanceId"],
                        _tags(inst.get("Tags")),
                        arn=None,
                        state=inst["State"]["Name"],
                    )
                    if f:
                        out.append(f)
        return out

    def _nat_gateways(self) -> list[Finding]:
        out = []
        for nat in self._ec2_pages("describe_nat_gateways", "NatGateways"):
            if nat["State"] in ("deleted", "deleting"):
                continue
            f = self._finding(
                "ec2", "nat-gateway", nat["NatGatewayId"], _tags(nat.get("Tags")), arn=None, state=nat["State"]
            )
            if f:
                out.append(f)
        return out

    def _vpc_endpoints(self) -> list[Finding]:
        out = []
        for ep in self._ec2_pages("describe_vpc_endpoints", "VpcEndpoints"):
            state = str(ep.get("State", "")).lower()
            if state in ("deleted", "deleting"):
                continue
            f = self._finding(
                "ec2",
                "vpc-endpoint",
                ep["VpcEndpointId"],
                _tags(ep.get("Tags")),
                arn=None,
                state=state,
                extra={"service": ep.get("ServiceName")},
            )
            if f:
                out.append(f)
        return out

    def _network_interfaces(self) -> list[Finding]:
        out = []
        for eni in self._ec2_pages("describe_network_interfaces", "NetworkInterfaces"):
            status = eni.get("Status", "")
            f = self._finding(
                "ec2", "network-interface", eni["NetworkInterfaceId"], _tags(eni.get("TagSet")), arn=None, state=status
            )
            if f:
                # An attached ENI belongs to something still running (instance, LB, endpoint): deleting that
                # owner frees it; detaching it by force would break the owner, so only `available` ones go.
                f.deletable = status == "available"
                if not f.deletable:
                    f.note = "attached: goes with its instance / load balancer; deleted only once available"
                out.append(f)
        return out

    def _elastic_ips(self) -> list[Finding]:
        out = []
        for addr in self.client("ec2").describe_addresses()["Addresses"]:
            f = self._finding(
                "ec2",
                "elastic-ip",
                addr["AllocationId"],
                _tags(addr.get("Tags")),
                arn=None,
                extra={"public_ip": addr.get("PublicIp")},
            )
            if f:
                f.deletable = "AssociationId" not in addr
                f.state = "associated" if not f.deletable else "unassociated"
                out.append(f)
        return out

    def _volumes(self) -> list[Finding]:
        out = []
        for vol in self._ec2_pages("describe_volumes", "Volumes"):
            f = self._finding("ec2", "volume", vol["VolumeId"], _tags(vol.get("Tags")), arn=None, state=vol["State"])
            if f:
                f.deletable = vol["State"] == "available"
                if not f.deletable:
                    f.note = "attached: deleted once its instance is gone"
                out.append(f)
        return out

    def _security_groups(self) -> list[Finding]:
        out = []
        for sg in self._ec2_pages("describe_security_groups", "SecurityGroups"):
            if sg["GroupName"] == "default":  # goes with its VPC; AWS refuses to delete it alone
                continue
            f = self._finding(
                "ec2",
                "security-group",
                sg["GroupId"],
                _tags(sg.get("Tags")),
                arn=None,
                extra={"name": sg["GroupName"], "vpc_id": sg.get("VpcId")},
            )
            if f:
                out.append(f)
        return out

    def _classic_elbs(self) -> list[Finding]:
        elb = self.client("elb")
        names = [lb["LoadBalancerName"] for lb in elb.describe_load_balancers()["LoadBalancerDescriptions"]]
        out = []
        for chunk in _chunks(names, 20):
            for desc in elb.describe_tags(LoadBalancerNames=chunk)["TagDescriptions"]:
                f = self._finding(
                    "elb",
                    "classic-load-balancer",
                    desc["LoadBalancerName"],
                    _tags(desc.get("Tags")),
                    arn=None,
                    note="Service type LoadBalancer handled by the in-tree provider",
                )
                if f:
                    out.append(f)
        return out

    def _elbv2(self) -> list[Finding]:
        elbv2 = self.client("elbv2")
        lbs = [lb for p in elbv2.get_paginator("describe_load_balancers").paginate() for lb in p["LoadBalancers"]]
        tgs = [tg for p in elbv2.get_paginator("describe_target_groups").paginate() for tg in p["TargetGroups"]]
        tags: dict[str, dict[str, str]] = {}
        arns = [lb["LoadBalancerArn"] for lb in lbs] + [tg["TargetGroupArn"] for tg in tgs]
        for chunk in _chunks(arns, 20):
            for desc in elbv2.describe_tags(ResourceArns=chunk)["TagDescriptions"]:
                tags[desc["ResourceArn"]] = _tags(desc.get("Tags"))
        out = []
        for lb in lbs:
            f = self._finding(
                "elbv2",
                "load-balancer",
                lb["LoadBalancerName"],
                tags.get(lb["LoadBalancerArn"], {}),
                arn=lb["LoadBalancerArn"],
                state=lb.get("State", {}).get("Code"),
                extra={"type": lb.get("Type")},
            )
            if f:
                out.append(f)
        for tg in tgs:
            f = self._finding(
                "elbv2",
                "target-group",
                tg["TargetGroupName"],
                tags.get(tg["TargetGroupArn"], {}),
                arn=tg["TargetGroupArn"],
            )
            if f:
                out.append(f)
        return out

    def _sagemaker(self) -> list[Finding]:
        sm = self.client("sagemaker")
        out = []
        listings = (
            ("endpoint", "list_endpoints", "Endpoints", "EndpointName", "EndpointArn"),
            ("endpoint-config", "list_endpoint_configs", "EndpointConfigs", "EndpointConfigName", "EndpointConfigArn"),
            ("model", "list_models", "Models", "ModelName", "ModelArn"),
        )
        for kind, op, key, name_key, arn_key in listings:
            for page in sm.get_paginator(op).paginate():
                for item in page[key]:
                    tags = _tags(sm.list_tags(ResourceArn=item[arn_key]).get("Tags"))
                    f = self._finding(
                        "sagemaker",
                        kind,
                        item[name_key],
                        tags,
                        arn=item[arn_key],
                        state=item.get("EndpointStatus"),
                        note="bills per instance-hour until deleted" if kind == "endpoint" else "",
                    )
                    if f:
                        out.append(f)
        return out

    def _ecr(self) -> list[Finding]:
        ecr = self.client("ecr")
        out = []
        for page in ecr.get_paginator("describe_repositories").paginate():
            for repo in page["repositories"]:
                tags = _tags(ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"]).get("tags"))
                f = self._finding("ecr", "repository", repo["repositoryName"], tags, arn=repo["repositoryArn"])
                if f:
                    images = [
                        i
                        for p in ecr.get_paginator("list_images").paginate(repositoryName=repo["repositoryName"])
                        for i in p["imageIds"]
                    ]
                    f.extra["images"] = len(images)
                    out.append(f)
        return out

    def _s3(self) -> list[Finding]:
        s3 = self.client("s3")
        out = []
        for bucket in s3.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            try:
                tags = _tags(s3.get_bucket_tagging(Bucket=name).get("TagSet"))
            except ClientError as err:
                # Untagged buckets answer NoSuchTagSet; buckets in other regions or of other owners may refuse.
                if err.response["Error"]["Code"] in (
                    "NoSuchTagSet",
                    "AccessDenied",
                    "PermanentRedirect",
                    "AuthorizationHeaderMalformed",
                    "NoSuchBucket",
                ):
                    continue
                raise
            f = self._finding("s3", "bucket", name, tags, arn=f"arn:aws:s3:::{name}")
            if f:
                versions = markers = 0
                for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
                    versions += len(page.get("Versions", []))
                    markers += len(page.get("DeleteMarkers", []))
                f.extra.update(object_versions=versions, delete_markers=markers)
                out.append(f)
        return out

    def _tagged_elsewhere(self, known: list[Finding]) -> list[Finding]:
        """Anything else still carrying the stack tag, via the Resource Groups Tagging API (report only)."""
        known_arns = {f.arn for f in known if f.arn}
        known_ids = {f.id for f in known}
        out = []
        pages = (
            self.client("resourcegroupstaggingapi")
            .get_paginator("get_resources")
            .paginate(TagFilters=[{"Key": STACK_TAG, "Values": [self.ownership.stack]}])
        )
        for page in pages:
            for res in page["ResourceTagMappingList"]:
                # Pull the ARN out of whatever wraps it: moto 5.2.5 answers SageMaker endpoint configs with a
                # tuple's repr; a malformed answer must not turn into a duplicate or a crash.
                match = _ARN_RE.search(res["ResourceARN"])
                if not match:
                    continue
                arn = match.group(0)
                service, kind, last = arn_parts(arn)
                # Kinds a describe call above already judged (with their state: a terminated instance stays
                # visible to the tagging API for a while, a deleted LB too) are not second-guessed here.
                if (service, kind) in _COVERED or arn in known_arns or last in known_ids:
                    continue
                why = self.ownership.owns(_tags(res.get("Tags")))
                if not why:
                    continue
                out.append(
                    Finding(
                        service,
                        kind,
                        last,
                        arn=arn,
                        matched_by=why,
                        deletable=False,
                        note="not deleted by the sweep: run `pulumi refresh` then `pulumi destroy`",
                    )
                )
        return out

    # ---- deleting ------------------------------------------------------------------------------------------

    def delete(self, findings: list[Finding], log: Callable[[str], None] = print, wait_s: float = 600) -> list[str]:
        """Delete the deletable findings in dependency order; returns one line per failure.

        Only findings from `find` come here, so nothing beyond what was reported is touched. An ENI, volume or
        Elastic IP that was attached at sweep time is read again when its turn comes: the instances and load
        balancers deleted before it usually set it free.
        """
        failures: list[str] = []
        rank = {k: i for i, k in enumerate(DELETE_ORDER)}
        for f in sorted(findings, key=lambda f: rank.get((f.service, f.kind), len(rank))):
            if not f.deletable and not self._freed(f):
                continue
            try:
                self._delete_one(f, wait_s)
                log(f"  deleted {f.service} {f.kind} {f.id}")
            except (ClientError, WaiterError, TimeoutError) as err:
                failures.append(f"{f.service} {f.kind} {f.id}: {err}")
                log(f"  FAILED  {f.service} {f.kind} {f.id}: {err}")
        return failures

    def _freed(self, f: Finding) -> bool:
        """Whether an attached ENI / volume / EIP has become deletable since the sweep (ownership is unchanged)."""
        kind = KINDS_BY_KEY.get((f.service, f.kind))
        if kind is None or kind.freed is None:
            return False
        try:
            f.deletable = kind.freed(self, f.id)
        except ClientError:  # already gone (deleted with its instance): nothing to do
            return False
        return f.deletable

    def _delete_one(self, f: Finding, wait_s: float) -> None:
        kind = KINDS_BY_KEY.get((f.service, f.kind))
        if kind is None:
            raise ClientError({"Error": {"Code": "Unsupported", "Message": "no delete for this kind"}}, "delete")
        kind.delete(self, f, wait_s)

    # -- per-kind deletes and "freed" checks (the registry, KINDS, names them) ----------------------------------
    def _waiter_config(self, delay: int, wait_s: float) -> dict[str, int]:
        return {"Delay": delay, "MaxAttempts": max(1, int(wait_s / delay))}

    def _terminate_instance(self, f: Finding, wait_s: float) -> None:
        ec2 = self.client("ec2")
        ec2.terminate_instances(InstanceIds=[f.id])
        # ENIs, volumes and SGs they hold are freed only once the instance is terminated.
        ec2.get_waiter("instance_terminated").wait(InstanceIds=[f.id], WaiterConfig=self._waiter_config(5, wait_s))

    def _delete_load_balancer(self, f: Finding, wait_s: float) -> None:
        elbv2 = self.client("elbv2")
        elbv2.delete_load_balancer(LoadBalancerArn=f.arn)
        # Target groups stay "in use" until the LB (and its listeners) are really gone.
        elbv2.get_waiter("load_balancers_deleted").wait(
            LoadBalancerArns=[f.arn], WaiterConfig=self._waiter_config(5, wait_s)
        )

    def _delete_nat_gateway(self, f: Finding, wait_s: float) -> None:
        ec2 = self.client("ec2")
        ec2.delete_nat_gateway(NatGatewayId=f.id)
        ec2.get_waiter("nat_gateway_deleted").wait(NatGatewayIds=[f.id], WaiterConfig=self._waiter_config(10, wait_s))

    def _delete_repository(self, f: Finding, wait_s: float) -> None:
        ecr = self.client("ecr")
        images = [i for p in ecr.get_paginator("list_images").paginate(repositoryName=f.id) for i in p["imageIds"]]
        for chunk in _chunks(images, 100):
            ecr.batch_delete_image(repositoryName=f.id, imageIds=chunk)
        ecr.delete_repository(repositoryName=f.id)

    def _eni_available(self, eni_id: str) -> bool:
        enis = self.client("ec2").describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"]
        return bool(enis) and enis[0]["Status"] == "available"

    def _volume_available(self, volume_id: str) -> bool:
        vols = self.client("ec2").describe_volumes(VolumeIds=[volume_id])["Volumes"]
        return bool(vols) and vols[0]["State"] == "available"

    def _address_free(self, allocation_id: str) -> bool:
        addrs = self.client("ec2").describe_addresses(AllocationIds=[allocation_id])["Addresses"]
        return bool(addrs) and "AssociationId" not in addrs[0]

    def _delete_security_group(self, group_id: str, wait_s: float) -> None:
        ec2 = self.client("ec2")
        sg = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        # Rules that reference other groups (the LB controller's backend SG in the node SG and back) make
        # deletion fail with DependencyViolation in either order; dropping this group's own rules first breaks
        # the cycle without touching any group that is not ours.
        if sg.get("IpPermissions"):
            ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=sg["IpPermissions"])
        if sg.get("IpPermissionsEgress"):
            ec2.revoke_security_group_egress(GroupId=group_id, IpPermissions=sg["IpPermissionsEgress"])
        # ENIs of a just-deleted load balancer or endpoint linger for a minute or two: retry while they do.
        deadline = time.monotonic() + wait_s
        while True:
            try:
                ec2.delete_security_group(GroupId=group_id)
                return
            except ClientError as err:
                if err.response["Error"]["Code"] != "DependencyViolation" or time.monotonic() > deadline:
                    raise
                in_use = ec2.describe_network_interfaces(Filters=[{"Name": "group-id", "Values": [group_id]}])
                if not in_use["NetworkInterfaces"]:
                    # No ENI holds it, so another group's rule references it: waiting will not help, and that
                    # group is not ours to edit.
                    raise
                time.sleep(10)

    def _empty_and_delete_bucket(self, bucket: str) -> None:
        s3 = self.client("s3")
        # Every version and delete marker must go, or a versioned bucket refuses deletion.
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
            objects = [
                {"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            for chunk in _chunks(objects, 1000):
                s3.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
        s3.delete_bucket(Bucket=bucket)


@dataclass(frozen=True)
class Kind:
    """One kind of leftover, in one place: how it is named in findings and ARNs, which collector finds it, how it is
    deleted, and (for what may be attached at sweep time) how to tell it has been set free since."""

    service: str
    kind: str
    arn_type: tuple[str, str]
    """(ARN service, ARN resource type): the tagging-API catch-all leaves these to the collector."""
    collect: Callable[[Sweeper], list[Finding]]
    delete: Callable[[Sweeper, Finding, float], None]
    freed: Callable[[Sweeper, str], bool] | None = None


def _call(method: str, *arg_names: str) -> Callable[..., None]:
    """A delete that is one client call with the finding's id (or ARN) as the named parameter."""
    service, op = method.split(".")

    def delete(sweeper: Sweeper, f: Finding, wait_s: float) -> None:
        getattr(sweeper.client(service), op)(**{n: (f.arn if n.endswith("Arn") else f.id) for n in arg_names})

    return delete


# In deletion order: dependants before what they depend on. Instances hold ENIs and volumes and are targets of target
# groups; load balancers hold target groups (via listeners), ENIs and security groups; NAT gateways and VPC endpoints
# hold ENIs and EIPs; ENIs reference security groups; SageMaker endpoints use endpoint configs, which name models.
# ECR and S3 depend on nothing here.
KINDS: tuple[Kind, ...] = (
    Kind("ec2", "instance", ("ec2", "instance"), Sweeper._instances, Sweeper._terminate_instance),
    Kind(
        "sagemaker",
        "endpoint",
        ("sagemaker", "endpoint"),
        Sweeper._sagemaker,
        _call("sagemaker.delete_endpoint", "EndpointName"),
    ),
    Kind(
        "sagemaker",
        "endpoint-config",
        ("sagemaker", "endpoint-config"),
        Sweeper._sagemaker,
        _call("sagemaker.delete_endpoint_config", "EndpointConfigName"),
    ),
    Kind(
        "sagemaker",
        "model",
        ("sagemaker", "model"),
        Sweeper._sagemaker,
        _call("sagemaker.delete_model", "ModelName"),
    ),
    Kind(
        "elb",
        "classic-load-balancer",
        ("elasticloadbalancing", "loadbalancer"),
        Sweeper._classic_elbs,
        _call("elb.delete_load_balancer", "LoadBalancerName"),
    ),
    Kind(
        "elbv2",
        "load-balancer",
        ("elasticloadbalancing", "loadbalancer"),
        Sweeper._elbv2,
        Sweeper._delete_load_balancer,
    ),
    Kind(
        "elbv2",
        "target-group",
        ("elasticloadbalancing", "targetgroup"),
        Sweeper._elbv2,
        _call("elbv2.delete_target_group", "TargetGroupArn"),
    ),
    Kind("ec2", "nat-gateway", ("ec2", "natgateway"), Sweeper._nat_gateways, Sweeper._delete_nat_gateway),
    Kind(
        "ec2",
        "vpc-endpoint",
        ("ec2", "vpc-endpoint"),
        Sweeper._vpc_endpoints,
        lambda sw, f, _w: sw.client("ec2").delete_vpc_endpoints(VpcEndpointIds=[f.id]),
    ),
    Kind(
        "ec2",
        "network-interface",
        ("ec2", "network-interface"),
        Sweeper._network_interfaces,
        _call("ec2.delete_network_interface", "NetworkInterfaceId"),
        Sweeper._eni_available,
    ),
    Kind(
        "ec2",
        "elastic-ip",
        ("ec2", "elastic-ip"),
        Sweeper._elastic_ips,
        _call("ec2.release_address", "AllocationId"),
        Sweeper._address_free,
    ),
    Kind(
        "ec2",
        "volume",
        ("ec2", "volume"),
        Sweeper._volumes,
        _call("ec2.delete_volume", "VolumeId"),
        Sweeper._volume_available,
    ),
    Kind(
        "ec2",
        "security-group",
        ("ec2", "security-group"),
        Sweeper._security_groups,
        lambda sw, f, wait_s: sw._delete_security_group(f.id, wait_s),
    ),
    Kind("ecr", "repository", ("ecr", "repository"), Sweeper._ecr, Sweeper._delete_repository),
    Kind("s3", "bucket", ("s3", "bucket"), Sweeper._s3, lambda sw, f, _w: sw._empty_and_delete_bucket(f.id)),
)
KINDS_BY_KEY = {(k.service, k.kind): k for k in KINDS}
DELETE_ORDER = tuple(KINDS_BY_KEY)
"""(service, kind) in deletion order (derived from KINDS)."""
_COVERED = {k.arn_type for k in KINDS}
"""(ARN service, ARN resource type) of the kinds the describe-based collectors handle (derived from KINDS)."""


def report_text(findings: list[Finding], ownership: Ownership, region: str) -> str:
    """A report grouped by service, one line per resource with its ID/ARN and why it is counted as ours."""
    head = f"Sweep of {region} for stack '{ownership.stack}'"
    head += f" (cluster '{ownership.cluster_name}')" if ownership.cluster_name else " (no cluster name: stack tag only)"
    if not findings:
        return head + ": nothing left.\n"
    lines = [head + f": {len(findings)} leftover(s)."]
    for service in sorted({f.service for f in findings}):
        lines.append(f"\n[{service}]")
        for f in (f for f in findings if f.service == service):
            ident = f.arn or f.id
            bits = [f"{f.kind:<22} {ident}"]
            if f.state:
                bits.append(f"state={f.state}")
            bits.extend(f"{k}={v}" for k, v in f.extra.items() if v is not None)
            bits.append(f"matched by {f.matched_by}")
            if not f.deletable:
                bits.append("(not deletable by the sweep)")
            if f.note:
                bits.append(f"- {f.note}")
            lines.append("  " + "  ".join(bits))
    return "\n".join(lines) + "\n"
