"""A recording mock engine: runs the real Pulumi program in-process with no cloud and no Pulumi CLI.

Every resource registration is recorded (type, name, parent, inputs as the engine receives them, protect,
retain_on_delete, depends_on). Mocked outputs look like AWS's (ARNs, IDs, endpoints) for the stack's region, and
every invoke the program makes is answered; an unanswered invoke is an error, not a silent `{}`.

Used by `python -m ops.preview` and by the tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pulumi

from facts import pulumi_types as tok

ACCOUNT_ID = "123456789012"
STACK_REFERENCE = "pulumi:pulumi:StackReference"
MOCK_ORGANIZATION = "organization"
"""What `pulumi.get_organization()` answers under these mocks (as on a DIY backend)."""
"""The type `pulumi.StackReference` registers (pulumi 3.272.0 sdk/python/lib/pulumi/stack_reference.py)."""


@dataclass
class Account:
    """What already exists in the mocked AWS account, for the program's preview-time look-ups (infra/preflight.py).

    The defaults model a steady state (every configured image and model there, no cluster yet, every offering
    available); tests narrow them to model a first run: "not pushed yet", a cluster EKS upgraded on its own, a zone
    without the instance type. `None` means "anything asked for exists".
    """

    images: set[tuple[str, str]] | None = None
    """(repository name, tag) pairs pushed to ECR."""
    objects: set[tuple[str, str]] | None = None
    """(bucket, key) pairs in S3; a model prefix exists when a `config.json` is under it."""
    secrets: dict[str, str] | None = None
    """Secrets Manager secret name -> current value."""
    clusters: dict[str, str] = field(default_factory=dict)
    """EKS cluster name -> Kubernetes version of the running cluster."""
    offerings: dict[str, list[str]] | None = None
    """instance type -> zones (names) offering it; None: every zone offers every type."""
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    """SageMaker endpoint name -> running primary variant (infra.preflight.RunningVariant fields)."""
    reservations: dict[str, dict[str, str]] = field(default_factory=dict)
    """Capacity reservation ID -> {"zone": ..., "instance_type": ...} (DescribeCapacityReservations)."""

    @classmethod
    def empty(cls) -> Account:
        """A new account, before the first `pulumi up`: no image, no model, no secret, no cluster, no endpoint."""
        return cls(images=set(), objects=set(), secrets={})


def _not_found(reason: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """An invoke failure as the engine reports one: the SDK raises `invoke of <tok> failed: <reason> ()`."""
    return {}, [("", reason)]


@dataclass
class Recorded:
    type: str
    name: str
    custom: bool
    inputs: dict[str, Any]
    parent: str | None = None
    parent_type: str | None = None
    protect: bool = False
    retain_on_delete: bool = False
    depends_on: list[str] = field(default_factory=list)
    ignore_changes: list[str] = field(default_factory=list)
    provider: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    stack: str = ""
    """The stack (layer, infra/layers.py) that registered it."""

    def as_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "parent": self.parent,
            "inputs": self.inputs,
            "protect": self.protect,
            "retain_on_delete": self.retain_on_delete,
            "depends_on": self.depends_on,
        }


def _ints(value: Any) -> Any:
    """The engine's wire format has only floats; integral ones were ints in the program."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _digest(*parts: str, n: int = 17) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:n]


class RecordingMocks(pulumi.runtime.Mocks):
    """Answers the engine like AWS would, deterministically, and records what the program asked for."""

    def __init__(self, region: str, account_id: str = ACCOUNT_ID, account: Account | None = None) -> None:
        self.region = region
        self.account_id = account_id
        self.account = account or Account()
        self.partition = "aws-us-gov" if region.startswith("us-gov-") else "aws"
        self.resources: dict[tuple[str, str], Recorded] = {}
        self.registrations: list[tuple[str, str]] = []
        self.invokes: list[str] = []
        self.stack_references: dict[str, dict[str, Any]] = {}
        """Fully qualified stack name -> its outputs, for `pulumi.StackReference` (the AWS layer's run, for the
        cluster layer; infra/layers.py). A reference to any other stack has no outputs."""

    # -- resources ---------------------------------------------------------------------------------------------
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict]:
        key = (args.typ, args.name)
        self.registrations.append(key)
        rec = self.resources.get(key)
        if rec is None:
            rec = Recorded(type=args.typ, name=args.name, custom=args.custom, inputs=_ints(dict(args.inputs)))
            self.resources[key] = rec
        else:
            rec.inputs, rec.custom = _ints(dict(args.inputs)), args.custom
        rec.provider = args.provider or None
        rec.stack = pulumi.get_stack()
        if args.typ == STACK_REFERENCE:
            name = str(args.inputs.get("name") or args.name)
            outputs = self.stack_references.get(name, {})
            return name, {"name": name, "outputs": outputs, "secretOutputNames": []}
        if not args.custom:
            # Components: don't echo inputs back as state (PROOF.md); they have none of their own.
            return None, {}
        rid, state = self._fake_state(args.typ, args.name, dict(args.inputs))
        rec.state = state
        return rid, state

    def _arn(self, service: str, resource: str, regional: bool = True) -> str:
        region = self.region if regional else ""
        account = self.account_id if regional or service == "iam" else ""
        return f"arn:{self.partition}:{service}:{region}:{account}:{resource}"

    def _fake_state(self, typ: str, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """IDs and computed attributes shaped like AWS's, so dependent inputs look real in previews."""
        state = dict(inputs)
        pkg, _, rest = typ.partition(":")
        module = rest.split("/")[0]
        physical = inputs.get("name") or f"{name}-{_digest(typ, name, n=7)}"
        rid = physical
        if pkg == "aws":
            rid, extra = self._aws_state(typ, module, name, physical, inputs)
            state.update(extra)
        elif pkg == "kubernetes":
            meta = inputs.get("metadata") or {}
            ns = meta.get("namespace")
            rid = f"{ns}/{meta.get('name', name)}" if ns else meta.get("name", name)
        elif pkg == "pulumi" and typ.startswith("pulumi:providers:"):
            rid = _digest(typ, name, n=36)
        return rid, state

    def _aws_state(
        self, typ: str, module: str, name: str, physical: str, inputs: dict[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        h = _digest(typ, name)
        s: dict[str, Any] = {}
        short = typ.rsplit(":", 1)[-1]
        if typ == tok.S3_BUCKET:
            # bucket_prefix: S3 appends a unique suffix (a bucket that must not collide with its own past incarnation).
            prefix = inputs.get("bucketPrefix")
            bucket = inputs.get("bucket") or (
                f"{prefix}{_digest(typ, name, n=8)}" if prefix else f"{name}-{_digest(typ, name, n=8)}"
            )
            s = {
                "bucket": bucket,
                "arn": f"arn:{self.partition}:s3:::{bucket}",
                "bucketRegionalDomainName": f"{bucket}.s3.{self.region}.amazonaws.com",
                "region": self.region,
            }
            return bucket, s
        if module == "iam":
            kind = {"Role": "role", "Policy": "policy", "User": "user", "InstanceProfile": "instance-profile"}.get(
                short
            )
            if kind:
                s = {"arn": self._arn("iam", f"{kind}/{physical}", regional=False), "name": physical}
                if short == "Role":
                    s["uniqueId"] = "AROA" + h.upper()[:17]
                return physical, s
            return f"{physical}-{h[:8]}", s
        if typ == tok.KMS_KEY:
            kid = f"{h[:8]}-{h[8:12]}-4{h[12:15]}-a{h[15:17]}-{_digest(name, n=12)}"
            return kid, {"keyId": kid, "arn": self._arn("kms", f"key/{kid}")}
        if typ == tok.KMS_ALIAS:
            return physical, {"arn": self._arn("kms", physical), "targetKeyArn": inputs.get("targetKeyId")}
        if typ == tok.ECR_REPOSITORY:
            repo = inputs.get("name", physical)
            return repo, {
                "arn": self._arn("ecr", f"repository/{repo}"),
                "repositoryUrl": f"{self.account_id}.dkr.ecr.{self.region}.amazonaws.com/{repo}",
                "registryId": self.account_id,
            }
        if typ == tok.EKS_CLUSTER:
            return physical, {
                "arn": self._arn("eks", f"cluster/{physical}"),
                "endpoint": f"https://{h.upper()}{h[:15].upper()}.gr7.{self.region}.eks.amazonaws.com",
                "certificateAuthority": {
                    "data": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1PQ0sKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
                },
                "identities": [{"oidcs": [{"issuer": f"https://oidc.eks.{self.region}.amazonaws.com/id/{h.upper()}"}]}],
                "vpcConfig": {**(inputs.get("vpcConfig") or {}), "clusterSecurityGroupId": f"sg-{h}"},
                "status": "ACTIVE",
                "platformVersion": "eks.1",
            }
        if typ == tok.EKS_NODE_GROUP:
            ng = inputs.get("nodeGroupName", physical)
            return f"{inputs.get('clusterName')}:{ng}", {
                "arn": self._arn("eks", f"nodegroup/{inputs.get('clusterName')}/{ng}/{h[:8]}"),
                "nodeGroupName": ng,
                "status": "ACTIVE",
                # EKS names the managed Auto Scaling group after the node group (the autoscaler tags it).
                "resources": [{"autoscalingGroups": [{"name": f"eks-{ng}-asg"}]}],
            }
        if typ == tok.SQS_QUEUE:
            queue = inputs.get("name", physical)
            return f"https://sqs.{self.region}.amazonaws.com/{self.account_id}/{queue}", {
                "url": f"https://sqs.{self.region}.amazonaws.com/{self.account_id}/{queue}",
                "arn": self._arn("sqs", queue),
            }
        if typ == tok.AMP_WORKSPACE:
            ws = f"ws-{h[:8]}-{h[8:12]}-{h[12:16]}-{_digest(name, n=4)}-{_digest(typ, n=12)}"
            return ws, {
                "arn": self._arn("aps", f"workspace/{ws}"),
                "prometheusEndpoint": f"https://aps-workspaces.{self.region}.amazonaws.com/workspaces/{ws}/",
            }
        if typ == tok.AMP_SCRAPER:
            sid = f"s-{h[:8]}-{h[8:12]}"
            return sid, {
                "arn": self._arn("aps", f"scraper/{sid}"),
                "roleArn": f"arn:{self.partition}:iam::{self.account_id}:role/aws-service-role/"
                "scraper.aps.amazonaws.com/AWSServiceRoleForAmazonPrometheusScraper",
            }
        if typ == tok.SAGEMAKER_ENDPOINT or typ.startswith("aws:sagemaker/"):
            kind = {"Model": "model", "EndpointConfiguration": "endpoint-config", "Endpoint": "endpoint"}.get(
                short, "x"
            )
            return physical, {"arn": self._arn("sagemaker", f"{kind}/{physical.lower()}"), "name": physical}
        if typ == tok.CLOUDWATCH_LOG_GROUP:
            lg = inputs.get("name", physical)
            return lg, {"arn": self._arn("logs", f"log-group:{lg}")}
        prefixes = {
            "Vpc": "vpc",
            "Subnet": "subnet",
            "InternetGateway": "igw",
            "NatGateway": "nat",
            "Eip": "eipalloc",
            "RouteTable": "rtb",
            "SecurityGroup": "sg",
            "VpcEndpoint": "vpce",
            "FlowLog": "fl",
            "LaunchTemplate": "lt",
            "PlacementGroup": "pg",
            "NetworkAcl": "acl",
        }
        if module == "ec2" and short in prefixes:
            rid = f"{prefixes[short]}-{h}"
            s = {"arn": self._arn("ec2", f"{prefixes[short]}/{rid}")}
            if short == "Eip":
                s["publicIp"] = f"198.51.100.{int(h[:2], 16) % 250 + 1}"
            if short == "LaunchTemplate":
                s["latestVersion"] = 1
            if short == "Subnet":
                s["availabilityZone"] = inputs.get("availabilityZone")
            if short == "Vpc":
                s["defaultSecurityGroupId"] = f"sg-{_digest('default', h)}"
            return rid, s
        return f"{physical}-{h[:8]}", {"arn": self._arn(module, f"{short.lower()}/{physical}")}

    # -- invokes -----------------------------------------------------------------------------------------------
    def call(self, args: pulumi.runtime.MockCallArgs) -> Any:
        self.invokes.append(args.token)
        handler = self._invokes().get(args.token)
        if handler is None:
            raise NotImplementedError(
                f"the mock engine has no answer for invoke {args.token}; add one to ops/mocks.py "
                "so previews stay realistic"
            )
        return handler(dict(args.args))

    def _invokes(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        suffixes = "abcd"
        zone_prefix = {"us-east-1": "use1", "us-west-2": "usw2", "eu-west-1": "euw1"}.get(self.region, "xx1")
        return {
            tok.GET_AVAILABILITY_ZONES: lambda a: {
                "names": [f"{self.region}{s}" for s in suffixes],
                "zoneIds": [f"{zone_prefix}-az{i + 1}" for i in range(len(suffixes))],
                "state": "available",
                "id": self.region,
            },
            tok.GET_CALLER_IDENTITY: lambda a: {
                "accountId": self.account_id,
                "arn": f"arn:{self.partition}:iam::{self.account_id}:user/preview",
                "userId": "AIDAPREVIEW",
                "id": self.account_id,
            },
            tok.GET_PARTITION: lambda a: {
                "partition": self.partition,
                "dnsSuffix": "amazonaws.com",
                "id": self.partition,
            },
            # Shaped like AWS's answer for the S3 prefix list; the ranges are illustrative, not the live list.
            tok.EC2_GET_PREFIX_LIST: lambda a: {
                "id": f"pl-{_digest(a.get('name') or '', n=8)}",
                "name": a.get("name") or "",
                "cidrBlocks": ["52.216.0.0/15", "54.231.0.0/16", "3.5.0.0/19"],
            },
            tok.ECR_GET_IMAGE: self._get_image,
            tok.S3_GET_OBJECTS: self._get_objects,
            tok.SECRETSMANAGER_GET_SECRET_VERSION: self._get_secret_version,
            tok.EKS_GET_CLUSTER: self._get_cluster,
            tok.EC2_GET_INSTANCE_TYPE_OFFERINGS: self._get_offerings,
            tok.GET_REGION: lambda a: {
                "name": self.region,
                "region": self.region,
                "id": self.region,
                "endpoint": f"ec2.{self.region}.amazonaws.com",
            },
        }

    # -- look-ups of what exists in the account (Account) ------------------------------------------------------------
    def _get_image(self, a: dict[str, Any]) -> Any:
        repo, tag = a.get("repositoryName"), a.get("imageTag")
        images = self.account.images
        if images is not None and (repo, tag) not in images:
            return _not_found(
                f"ImageNotFoundException: The image with imageId {{imageTag:'{tag}'}} does not exist "
                f"within the repository with name '{repo}'"
            )
        digest = "sha256:" + hashlib.sha256(f"{repo}:{tag}".encode()).hexdigest()
        return {
            "id": digest,
            "imageDigest": digest,
            "imageTags": [tag],
            "repositoryName": repo,
            "registryId": self.account_id,
        }

    def _get_objects(self, a: dict[str, Any]) -> dict[str, Any]:
        bucket, prefix = a.get("bucket"), a.get("prefix") or ""
        objects = self.account.objects
        if objects is None:
            keys = [f"{prefix}config.json", f"{prefix}model.safetensors"]
        else:
            keys = sorted(k for b, k in objects if b == bucket and k.startswith(prefix))
        keys = keys[: int(a.get("maxKeys") or 1000)]
        return {"id": bucket, "bucket": bucket, "keys": keys, "commonPrefixes": [], "owners": [], "requestCharged": ""}

    def _get_secret_version(self, a: dict[str, Any]) -> Any:
        name = a.get("secretId")
        secrets = self.account.secrets
        if secrets is not None and name not in secrets:
            return _not_found(f"ResourceNotFoundException: Secrets Manager can't find the specified secret ({name})")
        value = (secrets or {}).get(name, "preview-key sk-preview-0000000000000000\n")
        return {
            "id": name,
            "arn": self._arn("secretsmanager", f"secret:{name}-AbCdEf"),
            "secretId": name,
            "secretString": value,
            "secretBinary": "",
            "versionId": "v1",
            "versionStages": ["AWSCURRENT"],
        }

    def _get_cluster(self, a: dict[str, Any]) -> Any:
        name = a.get("name")
        if name not in self.account.clusters:
            return _not_found(f"couldn't find resource: ResourceNotFoundException: No cluster found for name: {name}.")
        return {
            "id": name,
            "name": name,
            "version": self.account.clusters[name],
            "status": "ACTIVE",
            "arn": self._arn("eks", f"cluster/{name}"),
        }

    def _get_offerings(self, a: dict[str, Any]) -> dict[str, Any]:
        wanted: list[str] = []
        for f in a.get("filters") or []:
            if f.get("name") == "instance-type":
                wanted += list(f.get("values") or [])
        zones = [f"{self.region}{s}" for s in "abcd"]
        offers = self.account.offerings
        rows = [(t, z) for t in wanted for z in (zones if offers is None else offers.get(t, []))]
        return {
            "id": self.region,
            "locationType": a.get("locationType"),
            "instanceTypes": [t for t, _ in rows],
            "locations": [z for _, z in rows],
            "locationTypes": ["availability-zone"] * len(rows),
        }


@dataclass
class Run:
    """What one run of the program under the mock engine produced."""

    stack: str
    mocks: RecordingMocks
    outputs: dict[str, Any]
    secret_outputs: set[str]
    layers: dict[str, Run] = field(default_factory=dict)
    """For an environment's run (ops.preview): the run of each layer's stack by layer ("aws", "cluster"); this run's
    resources are theirs together."""

    @property
    def resources(self) -> list[Recorded]:
        if self.layers:
            return [r for run in self.layers.values() for r in run.resources]
        return list(self.mocks.resources.values())

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == typ]

    def one(self, typ: str, name: str | None = None) -> Recorded:
        found = [r for r in self.of_type(typ) if name is None or r.name == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {typ} {name or ''}, found {[r.name for r in found]}")
        return found[0]

    def duplicate_names(self) -> list[tuple[str, str]]:
        """The real engine rejects two resources with the same type and name; the mock engine does not."""
        seen: set[tuple[str, str]] = set()
        dups = []
        if self.layers:
            return [d for run in self.layers.values() for d in run.duplicate_names()]
        for key in self.mocks.registrations:
            if key in seen:
                dups.append(key)
            seen.add(key)
        return dups


def config_strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Config as the Pulumi engine passes it: every value a string, structured values as JSON."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, (list, dict)):
            out[k] = json.dumps(v)
        else:
            out[k] = str(v)
    return out


def run_program(
    program: Callable[[], Mapping[str, Any]],
    config_values: Mapping[str, Any],
    stack: str,
    project: str,
    region: str,
    mocks: RecordingMocks | None = None,
    account: Account | None = None,
) -> Run:
    """Run `program` (returns its stack outputs) under a fresh recording mock engine (or the given one)."""
    # A previous asyncio.run() (or test) may have closed the loop; the mock engine needs a current one.
    asyncio.set_event_loop(asyncio.new_event_loop())
    pulumi.runtime.set_all_config(config_strings(config_values))
    mocks = mocks or RecordingMocks(region, account=account)
    pulumi.runtime.set_mocks(mocks, project=project, stack=stack, preview=False, organization=MOCK_ORGANIZATION)

    finished = False

    def record_options(args: pulumi.ResourceTransformationArgs) -> None:
        # The root stack (and its transformations) outlives this run in-process: stay out of later runs.
        if finished:
            return None
        rec = mocks.resources.setdefault(
            (args.type_, args.name), Recorded(type=args.type_, name=args.name, custom=True, inputs={})
        )
        opts = args.opts
        rec.protect = bool(opts.protect)
        rec.retain_on_delete = bool(opts.retain_on_delete)
        rec.ignore_changes = list(opts.ignore_changes or [])
        if opts.parent is not None and opts.parent._type != tok.STACK:
            rec.parent = opts.parent._name
            rec.parent_type = opts.parent._type
        deps = opts.depends_on or []
        if not isinstance(deps, list):
            deps = [deps]
        rec.depends_on = [f"{d._type}::{d._name}" for d in deps if isinstance(d, pulumi.Resource)]
        return None

    pulumi.runtime.register_stack_transformation(record_options)

    outputs: dict[str, Any] = {}
    secrets: set[str] = set()

    @pulumi.runtime.test
    def _run() -> asyncio.Future:
        result = program()

        async def collect() -> None:
            for key, value in result.items():
                out = pulumi.Output.from_input(value)
                outputs[key] = await out.future()
                if await out.is_secret():
                    secrets.add(key)

        return asyncio.ensure_future(collect())

    _run()
    finished = True
    return Run(stack=stack, mocks=mocks, outputs=outputs, secret_outputs=secrets)
