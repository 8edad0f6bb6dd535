"""Policy rules as plain functions over a stack's resources, so the same code runs in two places:

- online, inside `pulumi preview --policy-pack policy` (`policy/pack.py` wraps each rule in a pulumi-policy
  `ResourceValidationPolicy` / `StackValidationPolicy`; `policy/__main__.py` serves them), and
- offline, in `python -m ops.preview <stack>` over the inputs the recording mock engine captured.

A rule sees `Res` views: the Pulumi type token, the logical name, the raw engine properties (camelCase wire names,
exactly what pulumi-policy passes as `args.props`: it deserializes the gRPC struct without renaming keys), and the
`protect` option; plus a `StackContext` built from the stack's validated config (GPU budget, production flag).
Rules that need several resources (a bucket and its encryption/public-access/policy resources, the GPU budget over
all node groups) are stack rules; the rest look at one resource at a time.

Every message names the resource and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from facts import pulumi_types as tok
from facts.cluster import PREPARED_PREFIX
from facts.instance_types import GPU_INSTANCE_TYPES
from facts.tags import STACK_TAG, STACK_TAG_KEYS
from policy.iam import iam_document_violations, is_full_access_managed_policy

MANDATORY: Literal["mandatory"] = "mandatory"
ADVISORY: Literal["advisory"] = "advisory"
Level = Literal["mandatory", "advisory"]

OPEN_CIDRS = ("0.0.0.0/0", "::/0")
LB_PUBLIC_PORTS = (80, 443)
_LB_PATTERN = re.compile(r"(^|[^a-z])(alb|nlb|elb|lb|load-?balancer|ingress-lb)([^a-z]|$)", re.IGNORECASE)
GPU_TAINT_KEY = "nvidia.com/gpu"


@dataclass(frozen=True)
class Res:
    """One resource as a rule sees it."""

    type: str
    name: str
    props: Mapping[str, Any]
    protect: bool = False
    urn: str | None = None
    refs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Property -> logical names of the resources it was computed from (pulumi-policy's property dependencies):
    lets a stack rule pair a bucket with its companions while the bucket's name is still unknown in a preview."""

    @property
    def label(self) -> str:
        return f"{self.type} '{self.name}'"


@dataclass(frozen=True)
class StackContext:
    """What rules need to know about the stack beyond its resources; `None` fields mean "not known"."""

    stack: str | None = None
    production: bool | None = None
    max_gpus: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> StackContext:
        """From an `infra.config.StackConfig`."""
        return cls(stack=cfg.stack, production=cfg.production, max_gpus=cfg.cluster.max_gpus)


@dataclass(frozen=True)
class Finding:
    """One violation of one rule; `resource` is None when the stack as a whole violates it."""

    rule: str
    level: Level
    message: str
    resource: Res | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "level": self.level,
            "resource_type": self.resource.type if self.resource else None,
            "resource_name": self.resource.name if self.resource else None,
            "message": self.message,
        }


ResourceCheck = Callable[[Res, StackContext], Iterable[str]]
StackCheck = Callable[[list[Res], StackContext], Iterable[tuple[Res | None, str]]]


@dataclass(frozen=True)
class Rule:
    name: str
    level: Level
    description: str
    resource_check: ResourceCheck | None = None
    stack_check: StackCheck | None = None
    needs: tuple[str, ...] = field(default=())
    """StackContext fields the rule cannot run without (it is reported as not applicable when they are unknown)."""

    def applicable(self, ctx: StackContext) -> bool:
        return all(getattr(ctx, f) is not None for f in self.needs)

    def check(self, resources: list[Res], ctx: StackContext) -> list[Finding]:
        if not self.applicable(ctx):
            return []
        found: list[Finding] = []
        if self.resource_check:
            for res in resources:
                found += [Finding(self.name, self.level, m, res) for m in self.resource_check(res, ctx)]
        if self.stack_check:
            found += [Finding(self.name, self.level, m, r) for r, m in self.stack_check(resources, ctx)]
        return found


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def one_block(value: Any) -> Mapping[str, Any]:
    """A nested block that pulumi-aws models as an object (v7) or a one-element list (older schemas)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else {}
    return value if isinstance(value, Mapping) else {}


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _of_type(resources: list[Res], token: str) -> list[Res]:
    return [r for r in resources if r.type == token]


# ---------------------------------------------------------------------------------------------------------------
# S3: encryption, public access, TLS-only (each lives in its own resource next to the bucket)

BUCKET = tok.S3_BUCKET
BUCKET_SSE = tok.S3_BUCKET_SERVER_SIDE_ENCRYPTION_CONFIGURATION
BUCKET_PAB = tok.S3_BUCKET_PUBLIC_ACCESS_BLOCK
BUCKET_POLICY = tok.S3_BUCKET_POLICY
PAB_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")


def _get(props: Mapping[str, Any], key: str) -> Any:
    """props[key], or None when the engine does not know it yet (pulumi-policy raises UnknownValueError)."""
    try:
        return props.get(key)
    except Exception as exc:
        if type(exc).__name__ == "UnknownValueError":
            return None
        raise


def _bucket_keys(bucket: Res) -> list[str]:
    keys = [f"res:{bucket.name}"]
    physical = _get(bucket.props, "bucket") or _get(bucket.props, "id")
    return keys + ([str(physical)] if physical else [])


def _companions(resources: list[Res], token: str) -> dict[str, list[Res]]:
    """Companion resources (encryption, public access block, policy) by the bucket they configure."""
    found: dict[str, list[Res]] = {}
    for r in _of_type(resources, token):
        keys = [f"res:{n}" for n in r.refs.get("bucket", ())]
        value = _get(r.props, "bucket")
        keys += [str(value)] if value else []
        for key in keys:
            found.setdefault(key, []).append(r)
    return found


def _for_bucket(companions: dict[str, list[Res]], bucket: Res) -> list[Res]:
    seen: dict[int, Res] = {}
    for key in _bucket_keys(bucket):
        for r in companions.get(key, []):
            seen[id(r)] = r
    # A bucket named by prefix (S3 appends a suffix) has no name in its inputs: its companions name a bucket that
    # starts with the prefix once names are known (offline preview); in an online preview the refs pair them.
    prefix = _get(bucket.props, "bucketPrefix")
    if prefix and not _get(bucket.props, "bucket"):
        for key, found in companions.items():
            if key.startswith(str(prefix)):
                for r in found:
                    seen[id(r)] = r
    return list(seen.values())


def _sse_uses_kms(rules: Any) -> bool:
    for rule in as_list(rules):
        default = one_block(rule.get("applyServerSideEncryptionByDefault") if isinstance(rule, Mapping) else None)
        if str(default.get("sseAlgorithm", "")).startswith("aws:kms"):
            return True
    return False


def check_bucket_kms(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    sse = _companions(resources, BUCKET_SSE)
    for b in _of_type(resources, BUCKET):
        inline = one_block(b.props.get("serverSideEncryptionConfiguration")).get("rule")
        configs = _for_bucket(sse, b)
        if any(_sse_uses_kms(c.props.get("rules")) for c in configs) or _sse_uses_kms(inline):
            continue
        what = "uses a non-KMS algorithm" if configs else "has no BucketServerSideEncryptionConfiguration"
        yield (
            b,
            (
                f"bucket {b.label} {what}: add aws.s3.BucketServerSideEncryptionConfiguration(bucket=<bucket>.id, "
                "rules=[{apply_server_side_encryption_by_default: {sse_algorithm: 'aws:kms', "
                "kms_master_key_id: <key>}}])"
            ),
        )


def check_bucket_public_access(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    blocks = _companions(resources, BUCKET_PAB)
    for b in _of_type(resources, BUCKET):
        pabs = _for_bucket(blocks, b)
        if not pabs:
            yield (
                b,
                (
                    f"bucket {b.label} has no BucketPublicAccessBlock: add one for <bucket>.id with "
                    + ", ".join(PAB_FLAGS)
                    + " all true"
                ),
            )
            continue
        missing = [f for f in PAB_FLAGS if not any(_truthy(p.props.get(f)) for p in pabs)]
        if missing:
            yield b, f"bucket {b.label}: public access is not fully blocked: set {', '.join(missing)} to true"


def _denies_insecure_transport(policy: Any) -> bool:
    doc = _json(policy)
    if not isinstance(doc, Mapping):
        return False
    for stmt in as_list(doc.get("Statement")):
        if not isinstance(stmt, Mapping) or stmt.get("Effect") != "Deny":
            continue
        actions = [str(a).lower() for a in as_list(stmt.get("Action"))]
        principal = stmt.get("Principal")
        everyone = principal == "*" or (isinstance(principal, Mapping) and as_list(principal.get("AWS")) == ["*"])
        cond = one_block(stmt.get("Condition")).get("Bool")
        insecure = isinstance(cond, Mapping) and str(cond.get("aws:SecureTransport")).lower() == "false"
        if everyone and insecure and ("s3:*" in actions or "*" in actions):
            return True
    return False


def check_bucket_tls_only(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    policies = _companions(resources, BUCKET_POLICY)
    for b in _of_type(resources, BUCKET):
        if any(_denies_insecure_transport(p.props.get("policy")) for p in _for_bucket(policies, b)):
            continue
        yield (
            b,
            (
                f"bucket {b.label} does not deny plain-HTTP access: add a BucketPolicy statement "
                "{Effect: Deny, Principal: '*', Action: 's3:*', Resource: [<arn>, <arn>/*], "
                "Condition: {Bool: {aws:SecureTransport: 'false'}}}"
            ),
        )


# ---------------------------------------------------------------------------------------------------------------
# Security groups

SG = tok.EC2_SECURITY_GROUP
SG_INGRESS_RULE = tok.VPC_SECURITY_GROUP_INGRESS_RULE
SG_RULE = tok.EC2_SECURITY_GROUP_RULE


def _is_load_balancer(res: Res) -> bool:
    tags = res.props.get("tags") or {}
    names = [res.name, res.props.get("name"), res.props.get("namePrefix"), res.props.get("description")]
    names.append(tags.get("Name") if isinstance(tags, Mapping) else None)
    return any(isinstance(n, str) and _LB_PATTERN.search(n) for n in names)


def _open_ingress(rule: Mapping[str, Any], cidr_keys: tuple[str, ...]) -> list[str]:
    return [c for k in cidr_keys for c in as_list(rule.get(k)) if c in OPEN_CIDRS]


def _web_port(rule: Mapping[str, Any]) -> bool:
    proto = str(rule.get("protocol", rule.get("ipProtocol", ""))).lower()
    try:
        lo, hi = int(rule.get("fromPort")), int(rule.get("toPort"))
    except (TypeError, ValueError):
        return False
    return proto in ("tcp", "6") and lo == hi and lo in LB_PUBLIC_PORTS


def check_open_ingress(res: Res, ctx: StackContext) -> Iterable[str]:
    if res.type == SG:
        rules = [r for r in as_list(res.props.get("ingress")) if isinstance(r, Mapping)]
        cidr_keys: tuple[str, ...] = ("cidrBlocks", "ipv6CidrBlocks")
    elif res.type == SG_INGRESS_RULE:
        rules, cidr_keys = [res.props], ("cidrIpv4", "cidrIpv6")
    elif res.type == SG_RULE and res.props.get("type") == "ingress":
        rules, cidr_keys = [res.props], ("cidrBlocks", "ipv6CidrBlocks")
    else:
        return
    lb = _is_load_balancer(res)
    for rule in rules:
        open_cidrs = _open_ingress(rule, cidr_keys)
        if not open_cidrs or (lb and _web_port(rule)):
            continue
        ports = f"{rule.get('protocol', rule.get('ipProtocol'))} {rule.get('fromPort')}-{rule.get('toPort')}"
        yield (
            f"{res.label} allows ingress from {', '.join(open_cidrs)} ({ports}): restrict the source to the VPC CIDR, "
            "a prefix list or a security group; only load-balancer security groups may open tcp 80/443 to the world"
        )


# ---------------------------------------------------------------------------------------------------------------
# IAM

IAM_DOCUMENT_TYPES = (
    tok.IAM_ROLE_POLICY,
    tok.IAM_POLICY,
    tok.IAM_USER_POLICY,
    tok.IAM_GROUP_POLICY,
)
KMS_KEY = tok.KMS_KEY
POLICY_ARN_TYPES = (
    tok.IAM_ROLE_POLICY_ATTACHMENT,
    tok.IAM_USER_POLICY_ATTACHMENT,
    tok.IAM_GROUP_POLICY_ATTACHMENT,
    tok.IAM_POLICY_ATTACHMENT,
)


def check_iam_documents(res: Res, ctx: StackContext) -> Iterable[str]:
    docs: list[tuple[str, Any, bool]] = []
    if res.type in IAM_DOCUMENT_TYPES:
        docs.append(("policy", res.props.get("policy"), False))
    elif res.type == tok.IAM_ROLE:
        for i, inline in enumerate(as_list(res.props.get("inlinePolicies"))):
            if isinstance(inline, Mapping) and inline.get("policy"):
                docs.append((f"inline policy {inline.get('name', i)}", inline["policy"], False))
    elif res.type == KMS_KEY and res.props.get("policy"):
        docs.append(("key policy", res.props.get("policy"), True))
    for what, doc, key_policy in docs:
        if doc is None:
            continue
        for problem in iam_document_violations(doc, key_policy=key_policy):
            yield f"{res.label} {what}: {problem}"


def check_full_access_policies(res: Res, ctx: StackContext) -> Iterable[str]:
    arns: list[Any] = []
    if res.type in POLICY_ARN_TYPES:
        arns = [res.props.get("policyArn")]
    elif res.type == tok.IAM_ROLE:
        arns = as_list(res.props.get("managedPolicyArns"))
    for arn in arns:
        if is_full_access_managed_policy(arn):
            yield f"{res.label} attaches the AWS-managed {arn}: write a policy with the actions and resources needed"


_DATASETS_ARN = re.compile(r"^arn:aws[a-z-]*:s3:::[^/]*-datasets-[^/]*(/.*)?$")
_S3_WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion", "s3:RestoreObject", "s3:ReplicateObject")


def _writes_s3_objects(action: str) -> bool:
    """Whether an Allow of `action` (a name or a pattern such as s3:Put* or *) lets its holder change objects."""
    return action.lower().startswith(("s3:put", "s3:delete")) or any(_matches(w, [action]) for w in _S3_WRITES)


def check_datasets_write_scope(res: Res, ctx: StackContext) -> Iterable[str]:
    """Workload and controller roles (inline role policies) never change the raw datasets: the one write any of them
    gets there is data preparation's, under `prepared/` (infra/identity.py PREPARE_WRITES). People upload datasets
    through their team policies (aws.iam.Policy, checked by team-grants-within-access-level), not through these."""
    if res.type != tok.IAM_ROLE_POLICY:
        return
    doc = _json(res.props.get("policy"))
    for stmt in as_list(doc.get("Statement") if isinstance(doc, Mapping) else None):
        if not isinstance(stmt, Mapping) or stmt.get("Effect") != "Allow":
            continue
        writes = [str(a) for a in as_list(stmt.get("Action")) if _writes_s3_objects(str(a))]
        if not writes:
            continue
        resources = [str(r) for r in as_list(stmt.get("Resource"))]
        outside = [
            r for r in resources if (_DATASETS_ARN.match(r) or r == "*") and not r.endswith(f"/{PREPARED_PREFIX}/*")
        ]
        if outside:
            yield (
                f"{res.label} statement {stmt.get('Sid', '?')} allows {', '.join(writes)} on {', '.join(outside)}: "
                f"workload roles may write the datasets bucket only under {PREPARED_PREFIX}/* (data preparation)"
            )


# ---------------------------------------------------------------------------------------------------------------
# EKS

EKS_CLUSTER = tok.EKS_CLUSTER
NODE_GROUP = tok.EKS_NODE_GROUP


def check_eks_endpoint(res: Res, ctx: StackContext) -> Iterable[str]:
    if res.type != EKS_CLUSTER:
        return
    vpc = one_block(res.props.get("vpcConfig"))
    # AWS defaults: public endpoint on, open to 0.0.0.0/0.
    if vpc.get("endpointPublicAccess") is False or str(vpc.get("endpointPublicAccess")).lower() == "false":
        return
    cidrs = as_list(vpc.get("publicAccessCidrs")) or ["0.0.0.0/0 (the AWS default)"]
    open_ = [c for c in cidrs if str(c).split(" ")[0] in OPEN_CIDRS]
    if open_:
        yield (
            f"{res.label} has a public API endpoint open to {', '.join(map(str, open_))}: set "
            "vpc_config.endpoint_public_access=false (reach it over the VPC) or list the allowed CIDRs in "
            "vpc_config.public_access_cidrs (publicApiCidrs in the stack config)"
        )


def check_eks_secrets_encryption(res: Res, ctx: StackContext) -> Iterable[str]:
    if res.type != EKS_CLUSTER:
        return
    enc = one_block(res.props.get("encryptionConfig"))
    if "secrets" in as_list(enc.get("resources")) and one_block(enc.get("provider")).get("keyArn"):
        return
    yield (
        f"{res.label} does not encrypt Kubernetes secrets with KMS: set encryption_config="
        "{provider: {key_arn: <kms key arn>}, resources: ['secrets']}"
    )


def _gpu_types(res: Res) -> list[str]:
    return [t for t in as_list(res.props.get("instanceTypes")) if t in GPU_INSTANCE_TYPES]


def _is_gpu_node_group(res: Res) -> bool:
    return res.type == NODE_GROUP and (bool(_gpu_types(res)) or "NVIDIA" in str(res.props.get("amiType", "")).upper())


def check_gpu_taints(res: Res, ctx: StackContext) -> Iterable[str]:
    if not _is_gpu_node_group(res):
        return
    for taint in as_list(res.props.get("taints")):
        if (
            isinstance(taint, Mapping)
            and taint.get("key") == GPU_TAINT_KEY
            and taint.get("effect") in ("NO_SCHEDULE", "NO_EXECUTE")
        ):
            return
    yield (
        f"GPU node group {res.label} has no '{GPU_TAINT_KEY}' NO_SCHEDULE taint: add taints=[{{key: "
        f"'{GPU_TAINT_KEY}', value: 'true', effect: 'NO_SCHEDULE'}}] so only GPU workloads land there"
    )


def node_group_max_gpus(res: Res) -> int:
    """GPUs a node group can reach at its max size (worst case over its instance types)."""
    per_node = max((GPU_INSTANCE_TYPES[t].gpus for t in _gpu_types(res)), default=0)
    max_size = one_block(res.props.get("scalingConfig")).get("maxSize") or 0
    return int(float(max_size)) * per_node


def check_gpu_budget(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    groups = [r for r in resources if _is_gpu_node_group(r)]
    total = sum(node_group_max_gpus(g) for g in groups)
    assert ctx.max_gpus is not None
    if total <= ctx.max_gpus:
        return
    parts = ", ".join(f"{g.name}={node_group_max_gpus(g)}" for g in groups)
    for g in groups:
        if node_group_max_gpus(g):
            yield (
                g,
                (
                    f"GPU node groups can scale to {total} GPUs ({parts}), over the stack's budget of {ctx.max_gpus} "
                    f"(maxGpus): lower scaling_config.max_size of {g.label} or raise maxGpus in the stack config"
                ),
            )


# ---------------------------------------------------------------------------------------------------------------
# Tags


@cache
def is_taggable(token: str) -> bool:
    """True when the pulumi_aws resource class for `token` accepts a `tags` argument (introspected, not listed)."""
    pkg, _, rest = token.partition(":")
    if pkg != "aws" or ":" not in rest:
        return False
    module, _, cls_name = rest.partition(":")
    module = module.split("/")[0]
    try:
        mod = importlib.import_module("pulumi_aws" if module == "index" else f"pulumi_aws.{module}")
        cls = getattr(mod, cls_name)
        params = inspect.signature(getattr(cls, "_internal_init", cls.__init__)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return "tags" in params


def check_tags(res: Res, ctx: StackContext) -> Iterable[str]:
    if not is_taggable(res.type):
        return
    tags = res.props.get("tags") or res.props.get("tagsAll") or {}
    tags = tags if isinstance(tags, Mapping) else {}
    missing = [k for k in STACK_TAG_KEYS if not tags.get(k)]
    if missing:
        yield (
            f"{res.label} is missing tag(s) {', '.join(missing)}: pass tags=facts.tags.stack_tags(stack, environment)"
            " (cost allocation and the teardown sweep key on them)"
        )
    elif ctx.stack is not None and tags.get(STACK_TAG) != ctx.stack:
        yield f"{res.label} has {STACK_TAG}={tags.get(STACK_TAG)!r} in stack {ctx.stack!r}: tag it with its own stack"


# ---------------------------------------------------------------------------------------------------------------
# Production data protection


def check_production_data_protected(res: Res, ctx: StackContext) -> Iterable[str]:
    if not ctx.production or res.type not in (BUCKET, KMS_KEY):
        return
    what = "data bucket" if res.type == BUCKET else "KMS key (it decrypts the data)"
    if not res.protect:
        yield f"{what} {res.label} is not protected in a production stack: set protectData: true in the stack config"
    if res.type == BUCKET and _truthy(res.props.get("forceDestroy")):
        yield (
            f"{what} {res.label} has force_destroy in a production stack (destroy would delete its objects): "
            "set forceDestroyBuckets: false"
        )


# ---------------------------------------------------------------------------------------------------------------
# Production audit trail and backup (infra/audit.py, infra/backup.py)

TRAIL = tok.CLOUDTRAIL_TRAIL
REPLICATION = tok.S3_BUCKET_REPLICATION_CONFIG
OBJECT_LOCK = tok.S3_BUCKET_OBJECT_LOCK_CONFIGURATION
REPLICATED_DATA = ("models", "checkpoints")
"""Data buckets (by their `llm-platform:data` tag) a production stack must replicate to a second region."""


def check_production_audit_trail(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    if not ctx.production:
        return
    trails = _of_type(resources, TRAIL)
    if not trails:
        # Judged on a stack that holds data (every stack of this program does); a partial inventory without buckets,
        # such as one rule's test case, has nothing the trail would be for.
        if _of_type(resources, BUCKET):
            yield None, "production stack has no CloudTrail trail: set auditTrail: true (infra/audit.py)"
        return
    locks = _companions(resources, OBJECT_LOCK)
    buckets = {b.name: b for b in _of_type(resources, BUCKET)}
    for trail in trails:
        if not _truthy(trail.props.get("enableLogFileValidation")):
            yield trail, f"trail {trail.label} does not validate log files: set enable_log_file_validation=True"
        if not trail.props.get("kmsKeyId"):
            yield trail, f"trail {trail.label} is not encrypted with a KMS key: set kms_key_id"
        # The trail's bucket must lock its files: its lock configuration names the trail's bucket (once names are
        # known), or configures the bucket the trail refers to (in a preview, by resource reference).
        target = [n for n in trail.refs.get("s3BucketName", ())] or [
            b.name for b in buckets.values() if _get(b.props, "bucket") == trail.props.get("s3BucketName")
        ]
        candidates = [lk for name in target if name in buckets for lk in _for_bucket(locks, buckets[name])]
        candidates += [
            lk for lk in _of_type(resources, OBJECT_LOCK) if lk.props.get("bucket") == trail.props.get("s3BucketName")
        ]
        locked = [
            lk
            for lk in candidates
            if one_block(one_block(lk.props.get("rule")).get("defaultRetention")).get("mode") == "COMPLIANCE"
        ]
        if not locked:
            yield trail, f"trail {trail.label} writes to a bucket without a COMPLIANCE Object Lock: set auditLockMode"


def check_production_replication(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    if not ctx.production:
        return
    configs = _companions(resources, REPLICATION)
    for b in _of_type(resources, BUCKET):
        tags = b.props.get("tags") if isinstance(b.props.get("tags"), Mapping) else {}
        if tags.get("llm-platform:data") not in REPLICATED_DATA:
            continue
        rules = [r for c in _for_bucket(configs, b) for r in as_list(c.props.get("rules"))]
        if not any(isinstance(r, Mapping) and r.get("status") == "Enabled" for r in rules):
            yield (
                b,
                (
                    f"production {tags.get('llm-platform:data')} bucket {b.label} is not replicated to a second "
                    "region: set backupReplicaRegion (infra/backup.py)"
                ),
            )


# ---------------------------------------------------------------------------------------------------------------
# People: what a team's access level allows at most (infra/teams.py declares the grants; this is the ceiling)

ACCESS_TAG = "llm-platform:access"
TEAM_CEILING: dict[str, tuple[str, ...]] = {
    "viewer": ("eks:DescribeCluster", "s3:ListBucket", "s3:GetBucketLocation", "sagemaker:Describe*"),
    "ml-engineer": (
        "eks:DescribeCluster",
        "s3:ListBucket",
        "s3:GetBucketLocation",
        "s3:GetObject",
        "s3:GetObjectVersion",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
        "s3:DeleteObject",
        "kms:Decrypt",
        "kms:GenerateDataKey",
        "sagemaker:Describe*",
        "sagemaker:CreateTrainingJob",
        "sagemaker:StopTrainingJob",
        "sagemaker:CreateProcessingJob",
        "sagemaker:StopProcessingJob",
        "sagemaker:AddTags",
        "iam:PassRole",
        "logs:GetLogEvents",
        "logs:FilterLogEvents",
        "logs:DescribeLogStreams",
    ),
}
TEAM_CEILING["admin"] = (
    *TEAM_CEILING["ml-engineer"],
    "sagemaker:UpdateEndpoint",
    "sagemaker:UpdateEndpointWeightsAndCapacities",
    "sagemaker:CreateEndpointConfig",
)
"""Allowed actions per access level (patterns). Whatever the level, no person writes or deletes models (only the
training role does), and only an ml-engineer or admin passes a role (and only to SageMaker)."""
TEAM_EKS_POLICIES = {
    "viewer": ("AmazonEKSViewPolicy",),
    "ml-engineer": ("AmazonEKSViewPolicy",),
    "admin": ("AmazonEKSViewPolicy", "AmazonEKSEditPolicy", "AmazonEKSAdminPolicy"),
}
_MODEL_WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion")


def _matches(action: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p.replace("*", ".*"), action, re.IGNORECASE) for p in patterns)


def _team_level(res: Res) -> str | None:
    tags = res.props.get("tags")
    return tags.get(ACCESS_TAG) if isinstance(tags, Mapping) else None


def check_team_grants(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    for policy in _of_type(resources, tok.IAM_POLICY):
        level = _team_level(policy)
        if level is None:
            continue
        ceiling = TEAM_CEILING.get(level)
        if ceiling is None:
            yield policy, f"{policy.label} has unknown {ACCESS_TAG} {level!r}: one of {', '.join(TEAM_CEILING)}"
            continue
        doc = _json(policy.props.get("policy"))
        for stmt in as_list(doc.get("Statement") if isinstance(doc, Mapping) else None):
            if not isinstance(stmt, Mapping) or stmt.get("Effect") != "Allow":
                continue
            actions = [str(a) for a in as_list(stmt.get("Action"))]
            resources_ = [str(r) for r in as_list(stmt.get("Resource"))]
            over = [a for a in actions if not _matches(a, ceiling)]  # "s3:*" or "s3:Get*" match no ceiling entry
            if over:
                yield policy, f"{policy.label} ({level}) allows {', '.join(over)}: beyond what {level} may do"
            writes = [a for a in actions if _matches(a, _MODEL_WRITES)]
            if writes and any("-models-" in r for r in resources_):
                yield policy, f"{policy.label} ({level}) lets people {', '.join(writes)} models: only training does"
            if "iam:PassRole" in actions:
                passed = one_block(one_block(stmt.get("Condition")).get("StringEquals")).get("iam:PassedToService")
                if passed != "sagemaker.amazonaws.com":
                    yield policy, f"{policy.label} ({level}) passes roles to any service: condition it on SageMaker"
    levels = {
        e.props.get("principalArn"): _team_level(e)
        for e in _of_type(resources, tok.EKS_ACCESS_ENTRY)
        if _team_level(e) is not None
    }
    for assoc in _of_type(resources, tok.EKS_ACCESS_POLICY_ASSOCIATION):
        level = levels.get(assoc.props.get("principalArn"))
        if level is None:
            continue
        policy = str(assoc.props.get("policyArn", "")).rsplit("/", 1)[-1]
        if policy not in TEAM_EKS_POLICIES.get(level, ()):
            yield assoc, f"{assoc.label}: a {level} team may not get {policy} (allowed: {TEAM_EKS_POLICIES.get(level)})"
        if one_block(assoc.props.get("accessScope")).get("type") != "namespace":
            yield assoc, f"{assoc.label}: team access is namespace-scoped; cluster-wide is clusterAdminArns' alone"


# ---------------------------------------------------------------------------------------------------------------
# Advisory

NAT_GATEWAY = tok.EC2_NAT_GATEWAY
VPC = tok.EC2_VPC
FLOW_LOG = tok.EC2_FLOW_LOG


def check_spot_in_production(res: Res, ctx: StackContext) -> Iterable[str]:
    if ctx.production and res.type == NODE_GROUP and res.props.get("capacityType") == "SPOT":
        yield (
            f"node group {res.label} uses SPOT capacity in a production stack (nodes can be reclaimed with 2 minutes' "
            "notice): use ON_DEMAND for serving pools, or accept the interruptions knowingly"
        )


def check_single_nat_in_production(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    nats = _of_type(resources, NAT_GATEWAY)
    if ctx.production and len(nats) == 1:
        yield (
            nats[0],
            (
                f"production stack has a single NAT gateway ({nats[0].name}): losing its zone cuts every private "
                "subnet off the internet; set natGateways: perAz"
            ),
        )


def check_flow_logs(resources: list[Res], ctx: StackContext) -> Iterable[tuple[Res | None, str]]:
    vpcs = _of_type(resources, VPC)
    # VPC ids are not known before creation, so count: every VPC needs a flow log that names a VPC.
    logs = [f for f in _of_type(resources, FLOW_LOG) if f.props.get("vpcId")]
    if len(logs) < len(vpcs):
        for vpc in vpcs[len(logs) :]:
            yield (
                vpc,
                (
                    f"VPC {vpc.label} has no flow log: add aws.ec2.FlowLog(vpc_id=<vpc>.id, traffic_type='ALL', ...) "
                    "so network incidents can be investigated"
                ),
            )


# ---------------------------------------------------------------------------------------------------------------
# The rule set

RULES: tuple[Rule, ...] = (
    Rule("s3-bucket-kms-encryption", MANDATORY, "S3 buckets are encrypted with KMS", stack_check=check_bucket_kms),
    Rule(
        "s3-public-access-blocked",
        MANDATORY,
        "S3 buckets block all public access (all four public access block flags)",
        stack_check=check_bucket_public_access,
    ),
    Rule(
        "s3-tls-only",
        MANDATORY,
        "S3 bucket policies deny requests without TLS (aws:SecureTransport=false)",
        stack_check=check_bucket_tls_only,
    ),
    Rule(
        "no-open-ingress",
        MANDATORY,
        "No security-group ingress from 0.0.0.0/0 or ::/0, except tcp 80/443 on load-balancer security groups",
        resource_check=check_open_ingress,
    ),
    Rule(
        "iam-no-wildcards",
        MANDATORY,
        "IAM documents allow no '*' actions, no s3:*/kms:*, no '*' resources for S3/KMS, no NotAction/NotResource",
        resource_check=check_iam_documents,
    ),
    Rule(
        "datasets-written-only-under-prepared",
        MANDATORY,
        f"Workload and controller roles write the datasets bucket only under {PREPARED_PREFIX}/ (data preparation)",
        resource_check=check_datasets_write_scope,
    ),
    Rule(
        "iam-no-full-access-managed-policies",
        MANDATORY,
        "No AWS-managed *FullAccess policies attached",
        resource_check=check_full_access_policies,
    ),
    Rule(
        "eks-endpoint-not-public",
        MANDATORY,
        "The EKS API endpoint is private, or public only to an allowlist of CIDRs",
        resource_check=check_eks_endpoint,
    ),
    Rule(
        "eks-secrets-encryption",
        MANDATORY,
        "EKS encrypts Kubernetes secrets with a KMS key",
        resource_check=check_eks_secrets_encryption,
    ),
    Rule(
        "gpu-node-groups-tainted",
        MANDATORY,
        f"GPU node groups carry the {GPU_TAINT_KEY} NO_SCHEDULE taint",
        resource_check=check_gpu_taints,
    ),
    Rule(
        "gpu-budget",
        MANDATORY,
        "GPU node groups at max size stay within the stack's GPU budget (maxGpus)",
        stack_check=check_gpu_budget,
        needs=("max_gpus",),
    ),
    Rule(
        "required-tags",
        MANDATORY,
        "Every taggable AWS resource carries the project, environment, stack and managed-by tags",
        resource_check=check_tags,
    ),
    Rule(
        "production-data-protected",
        MANDATORY,
        "In production stacks, data buckets and the data KMS key are protected and buckets not force-destroyable",
        resource_check=check_production_data_protected,
        needs=("production",),
    ),
    Rule(
        "production-audit-trail",
        MANDATORY,
        "Production stacks have a KMS-encrypted CloudTrail trail with log-file validation into a COMPLIANCE-locked "
        "bucket",
        stack_check=check_production_audit_trail,
        needs=("production",),
    ),
    Rule(
        "production-replication",
        MANDATORY,
        "Production models and checkpoints buckets replicate to a second region",
        stack_check=check_production_replication,
        needs=("production",),
    ),
    Rule(
        "team-grants-within-access-level",
        MANDATORY,
        "Team IAM policies and EKS access policies stay within the team's access level (viewer, ml-engineer, admin); "
        "no person writes models",
        stack_check=check_team_grants,
    ),
    Rule(
        "spot-in-production",
        ADVISORY,
        "Production node groups use on-demand capacity",
        resource_check=check_spot_in_production,
        needs=("production",),
    ),
    Rule(
        "single-nat-in-production",
        ADVISORY,
        "Production stacks have a NAT gateway per zone",
        stack_check=check_single_nat_in_production,
        needs=("production",),
    ),
    Rule("vpc-flow-logs", ADVISORY, "Every VPC has a flow log", stack_check=check_flow_logs),
)

RULES_BY_NAME = {r.name: r for r in RULES}


def evaluate(resources: list[Res], ctx: StackContext, rules: Iterable[Rule] = RULES) -> dict[str, Any]:
    """Run every rule; return the verdict as JSON-ready data (what `ops.preview` prints as `"policy"`)."""
    results = []
    for rule in rules:
        findings = rule.check(resources, ctx)
        results.append(
            {
                "name": rule.name,
                "level": rule.level,
                "description": rule.description,
                "status": "n/a" if not rule.applicable(ctx) else ("fail" if findings else "pass"),
                "violations": [f.as_json() for f in findings],
            }
        )
    mandatory = sum(len(r["violations"]) for r in results if r["level"] == MANDATORY)
    advisory = sum(len(r["violations"]) for r in results if r["level"] == ADVISORY)
    return {
        "passed": mandatory == 0,
        "mandatory_violations": mandatory,
        "advisory_violations": advisory,
        "rules": results,
    }


def resources_from_report(report: Mapping[str, Any]) -> list[Res]:
    """`Res` views of an `ops.preview` JSON report's resources."""
    return [
        Res(type=r["type"], name=r["name"], props=r.get("inputs") or {}, protect=bool(r.get("protect")))
        for r in report.get("resources", [])
    ]


__all__ = [
    "RULES",
    "RULES_BY_NAME",
    "Finding",
    "Res",
    "Rule",
    "StackContext",
    "evaluate",
    "iam_document_violations",
    "is_full_access_managed_policy",
    "is_taggable",
    "resources_from_report",
]
