"""Each rule fires on a deliberately bad resource or stack and stays quiet on a good one."""

from __future__ import annotations

import json

import pytest

from facts import pulumi_types as tok
from facts.tags import stack_tags
from policy.rules import RULES, RULES_BY_NAME, Res, StackContext, evaluate, is_taggable

TAGS = stack_tags("dev", "dev")
CTX = StackContext(stack="dev", production=False, max_gpus=4)
PROD = StackContext(stack="dev", production=True, max_gpus=4)  # a production-marked stack; tags say dev
BUCKET = tok.S3_BUCKET


def messages(rule: str, resources: list[Res], ctx: StackContext = CTX) -> list[str]:
    return [f.message for f in RULES_BY_NAME[rule].check(resources, ctx)]


def bucket_stack(
    sse: str = "aws:kms", block: bool = True, tls: bool = True, protect: bool = False, force: bool = False
) -> list[Res]:
    name = "llmp-dev-datasets"
    policy = {
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false" if tls else "true"}},
            }
        ]
    }
    return [
        Res(BUCKET, "storage-datasets", {"bucket": name, "forceDestroy": force, "tags": TAGS}, protect=protect),
        Res(
            tok.S3_BUCKET_SERVER_SIDE_ENCRYPTION_CONFIGURATION,
            "storage-datasets-sse",
            {"bucket": name, "rules": [{"applyServerSideEncryptionByDefault": {"sseAlgorithm": sse}}]},
        ),
        Res(
            tok.S3_BUCKET_PUBLIC_ACCESS_BLOCK,
            "storage-datasets-pab",
            {
                "bucket": name,
                "blockPublicAcls": True,
                "blockPublicPolicy": block,
                "ignorePublicAcls": True,
                "restrictPublicBuckets": True,
            },
        ),
        Res(
            tok.S3_BUCKET_POLICY,
            "storage-datasets-policy",
            {"bucket": name, "policy": json.dumps(policy)},
        ),
    ]


def test_good_bucket_passes_every_s3_rule() -> None:
    for rule in ("s3-bucket-kms-encryption", "s3-public-access-blocked", "s3-tls-only"):
        assert messages(rule, bucket_stack()) == []


def test_bucket_without_kms_encryption() -> None:
    [msg] = messages("s3-bucket-kms-encryption", bucket_stack(sse="AES256"))
    assert "storage-datasets" in msg and "aws:kms" in msg
    [msg] = messages("s3-bucket-kms-encryption", bucket_stack()[:1])
    assert "has no BucketServerSideEncryptionConfiguration" in msg


def test_bucket_public_access_not_fully_blocked() -> None:
    [msg] = messages("s3-public-access-blocked", bucket_stack(block=False))
    assert "storage-datasets" in msg and "blockPublicPolicy" in msg


def test_bucket_without_tls_only_policy() -> None:
    [msg] = messages("s3-tls-only", bucket_stack(tls=False))
    assert "aws:SecureTransport" in msg and "storage-datasets" in msg


def test_companions_pair_by_property_dependency_when_the_name_is_unknown() -> None:
    """In a real preview an auto-named bucket's id is unknown; pulumi-policy's property dependencies pair them."""
    resources = [
        Res(r.type, r.name, {k: v for k, v in r.props.items() if k != "bucket"}, refs={"bucket": ("storage-datasets",)})
        if r.type != BUCKET
        else Res(r.type, r.name, {"tags": TAGS})
        for r in bucket_stack()
    ]
    assert messages("s3-tls-only", resources) == []


SG = tok.EC2_SECURITY_GROUP
IN_RULE = tok.VPC_SECURITY_GROUP_INGRESS_RULE
SG_RULE = tok.EC2_SECURITY_GROUP_RULE
WORLD = ["0.0.0.0/0"]


def sg(name: str, proto: str, port: int, **cidrs: list[str]) -> Res:
    return Res(SG, name, {"ingress": [{"protocol": proto, "fromPort": port, "toPort": port, **cidrs}]})


@pytest.mark.parametrize(
    ("res", "fires"),
    [
        (sg("cluster-nodes", "tcp", 22, cidrBlocks=WORLD), True),
        (sg("web-lb", "tcp", 443, cidrBlocks=WORLD), False),
        (sg("web-lb", "-1", 0, ipv6CidrBlocks=["::/0"]), True),
        (sg("cluster-nodes", "tcp", 443, cidrBlocks=WORLD), True),
        (sg("cluster-nodes", "tcp", 443, cidrBlocks=["10.0.0.0/16"]), False),
        (Res(IN_RULE, "db-in", {"ipProtocol": "tcp", "fromPort": 5432, "toPort": 5432, "cidrIpv4": WORLD[0]}), True),
        (Res(IN_RULE, "alb-https", {"ipProtocol": "tcp", "fromPort": 443, "toPort": 443, "cidrIpv4": WORLD[0]}), False),
        (Res(SG_RULE, "ssh", {"type": "ingress", "protocol": "tcp", "fromPort": 22, "toPort": 22, "ipv6CidrBlocks": ["::/0"]}), True),  # noqa: E501
        (Res(SG_RULE, "out", {"type": "egress", "protocol": "-1", "fromPort": 0, "toPort": 0, "cidrBlocks": WORLD}), False),  # noqa: E501
    ],
)  # fmt: skip
def test_open_ingress(res: Res, fires: bool) -> None:
    found = messages("no-open-ingress", [res])
    assert bool(found) is fires
    if fires:
        assert res.name in found[0] and "restrict the source" in found[0]


def test_iam_wildcards() -> None:
    bad = {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    good = {"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}]}
    role_policy = tok.IAM_ROLE_POLICY
    assert len(messages("iam-no-wildcards", [Res(role_policy, "reader", {"policy": json.dumps(bad)})])) == 2
    assert messages("iam-no-wildcards", [Res(role_policy, "reader", {"policy": json.dumps(good)})]) == []
    inline = Res(tok.IAM_ROLE, "r", {"inlinePolicies": [{"name": "x", "policy": json.dumps(bad)}]})
    assert messages("iam-no-wildcards", [inline])
    # a key policy's "*" resource is the key, and the account root administers it
    root_admin = {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ]
    }
    assert messages("iam-no-wildcards", [Res(tok.KMS_KEY, "k", {"policy": json.dumps(root_admin)})]) == []
    anyone = {"Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*", "Resource": "*"}]}
    assert messages("iam-no-wildcards", [Res(tok.KMS_KEY, "k", {"policy": json.dumps(anyone)})])


def test_full_access_managed_policies() -> None:
    attach = tok.IAM_ROLE_POLICY_ATTACHMENT
    bad = Res(attach, "sm", {"policyArn": "arn:aws:iam::aws:policy/AmazonSageMakerFullAccess"})
    good = Res(attach, "node", {"policyArn": "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy"})
    [msg] = messages("iam-no-full-access-managed-policies", [bad, good])
    assert "AmazonSageMakerFullAccess" in msg and "'sm'" in msg


CLUSTER = tok.EKS_CLUSTER
ENC = {"provider": {"keyArn": "arn:aws:kms:us-east-1:123456789012:key/x"}, "resources": ["secrets"]}


@pytest.mark.parametrize(
    ("vpc", "fires"),
    [
        ({"endpointPublicAccess": True, "publicAccessCidrs": ["0.0.0.0/0"]}, True),
        ({"endpointPublicAccess": True}, True),  # AWS default: open to the world
        ({}, True),
        ({"endpointPublicAccess": True, "publicAccessCidrs": ["203.0.113.0/24"]}, False),
        ({"endpointPublicAccess": False, "endpointPrivateAccess": True}, False),
    ],
)
def test_eks_endpoint(vpc: dict, fires: bool) -> None:
    assert bool(messages("eks-endpoint-not-public", [Res(CLUSTER, "cluster-eks", {"vpcConfig": vpc})])) is fires


def test_eks_secrets_encryption() -> None:
    assert messages("eks-secrets-encryption", [Res(CLUSTER, "c", {"encryptionConfig": ENC})]) == []
    [msg] = messages("eks-secrets-encryption", [Res(CLUSTER, "cluster-eks", {})])
    assert "cluster-eks" in msg and "secrets" in msg


NODE_GROUP = tok.EKS_NODE_GROUP
TAINT = [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]


def node_group(name: str, types: list[str], max_size: int, taints: list | None = None, capacity: str = "ON_DEMAND"):
    props = {
        "instanceTypes": types,
        "scalingConfig": {"minSize": 0.0, "maxSize": float(max_size), "desiredSize": 0.0},
        "taints": taints if taints is not None else TAINT,
        "capacityType": capacity,
        "tags": TAGS,
    }
    return Res(NODE_GROUP, name, props)


def test_gpu_node_groups_tainted() -> None:
    assert messages("gpu-node-groups-tainted", [node_group("gpu", ["g6.xlarge"], 2)]) == []
    assert messages("gpu-node-groups-tainted", [node_group("system", ["t3.large"], 2, taints=[])]) == []
    [msg] = messages("gpu-node-groups-tainted", [node_group("cluster-training", ["g6.xlarge"], 2, taints=[])])
    assert "cluster-training" in msg and "NO_SCHEDULE" in msg


def test_gpu_budget() -> None:
    ok = [node_group("a", ["g6.xlarge"], 2), node_group("b", ["g6.xlarge"], 2)]  # 4 GPUs, budget 4
    assert messages("gpu-budget", ok) == []
    over = [node_group("a", ["g6.xlarge"], 2), node_group("b", ["g6.12xlarge"], 1)]  # 2 + 4 GPUs
    found = messages("gpu-budget", over)
    assert found and all("6 GPUs" in m and "budget of 4" in m for m in found)
    # without a known budget the rule is not applicable rather than guessing
    assert evaluate(over, StackContext())["rules"][[r.name for r in RULES].index("gpu-budget")]["status"] == "n/a"


def test_required_tags_introspects_pulumi_aws() -> None:
    assert is_taggable(tok.S3_BUCKET) and is_taggable(tok.EKS_NODE_GROUP)
    assert not is_taggable(tok.S3_BUCKET_POLICY)
    assert not is_taggable(tok.K8S_NAMESPACE)
    untagged = Res(tok.EC2_VPC, "network-vpc", {"tags": {"Name": "x"}})
    [msg] = messages("required-tags", [untagged])
    assert "network-vpc" in msg and "llm-platform:stack" in msg
    other_stack = Res(tok.EC2_VPC, "network-vpc", {"tags": stack_tags("prod", "prod")})
    assert "tag it with its own stack" in messages("required-tags", [other_stack])[0]
    assert messages("required-tags", [Res(tok.EC2_VPC, "v", {"tags": TAGS})]) == []


def test_production_data_protected() -> None:
    stack = bucket_stack(protect=False, force=True)
    found = messages("production-data-protected", stack, PROD)
    assert len(found) == 2 and any("protectData" in m for m in found) and any("forceDestroy" in m for m in found)
    assert messages("production-data-protected", bucket_stack(protect=True), PROD) == []
    assert messages("production-data-protected", stack, CTX) == []  # not production


def test_advisories() -> None:
    spot = node_group("serving", ["g6.xlarge"], 2, capacity="SPOT")
    assert messages("spot-in-production", [spot], PROD) and not messages("spot-in-production", [spot], CTX)
    nat = [Res(tok.EC2_NAT_GATEWAY, "network-nat-0", {})]
    assert messages("single-nat-in-production", nat, PROD)
    assert not messages("single-nat-in-production", nat * 3, PROD)
    vpc = Res(tok.EC2_VPC, "network-vpc", {})
    assert messages("vpc-flow-logs", [vpc])
    assert not messages("vpc-flow-logs", [vpc, Res(tok.EC2_FLOW_LOG, "fl", {"vpcId": "vpc-1"})])


def test_advisory_violations_do_not_fail_the_verdict() -> None:
    verdict = evaluate([node_group("serving", ["g6.xlarge"], 2, capacity="SPOT")], PROD)
    assert verdict["passed"] and verdict["advisory_violations"] == 1
    verdict = evaluate([node_group("serving", ["g6.xlarge"], 2, taints=[])], PROD)
    assert not verdict["passed"] and verdict["mandatory_violations"] == 1
