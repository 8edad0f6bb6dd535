"""Identity component: least privilege, checked on the policy documents the program actually produces."""

from __future__ import annotations

import json

from facts import pulumi_types as tok
from policy.rules import iam_document_violations, is_full_access_managed_policy


def _inline(run, suffix: str) -> dict:
    return json.loads(run.one(tok.IAM_ROLE_POLICY, f"identity-{suffix}-policy").inputs["policy"])


def _grants(doc: dict) -> dict[str, set[str]]:
    """Resource -> actions allowed on it."""
    out: dict[str, set[str]] = {}
    for st in doc["Statement"]:
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        for r in resources:
            out.setdefault(r, set()).update(actions)
    return out


def test_every_policy_document_is_least_privilege(shipped) -> None:
    _, run = shipped
    documents = [json.loads(r.inputs["policy"]) for r in run.of_type(tok.IAM_ROLE_POLICY)]
    documents += [json.loads(r.inputs["assumeRolePolicy"]) for r in run.of_type(tok.IAM_ROLE)]
    assert len(documents) >= 10
    for doc in documents:
        assert iam_document_violations(doc) == [], doc
    for attachment in run.of_type(tok.IAM_ROLE_POLICY_ATTACHMENT):
        assert not is_full_access_managed_policy(attachment.inputs["policyArn"]), attachment.inputs["policyArn"]


def test_training_role_reads_datasets_writes_checkpoints_and_models_only(shipped) -> None:
    _, run = shipped
    o = run.outputs
    grants = _grants(_inline(run, "training"))
    bucket = lambda kind: f"arn:aws:s3:::{o[kind + '_bucket']}"  # noqa: E731
    assert grants[bucket("datasets") + "/*"] == {"s3:GetObject", "s3:GetObjectVersion"}
    assert "s3:DeleteObject" in grants[bucket("checkpoints") + "/*"]
    assert "s3:PutObject" in grants[bucket("models") + "/*"]
    assert "s3:DeleteObject" not in grants[bucket("models") + "/*"]
    s3_resources = {r for r in grants if r.startswith("arn:aws:s3")}
    assert s3_resources == {bucket(k) for k in ("datasets", "checkpoints", "models")} | {
        bucket(k) + "/*" for k in ("datasets", "checkpoints", "models")
    }
    assert grants[o["kms_key_arn"]] == {"kms:Decrypt", "kms:GenerateDataKey"}


def test_serving_role_only_reads_models(shipped) -> None:
    _, run = shipped
    o = run.outputs
    doc = _inline(run, "serving")
    grants = _grants(doc)
    models = f"arn:aws:s3:::{o['models_bucket']}"
    assert set(grants) == {models, models + "/*", o["kms_key_arn"]}
    assert grants[models + "/*"] == {"s3:GetObject", "s3:GetObjectVersion"}
    assert grants[o["kms_key_arn"]] == {"kms:Decrypt"}
    kms = next(s for s in doc["Statement"] if s["Sid"] == "UseProjectKeyViaS3")
    assert kms["Condition"] == {"StringEquals": {"kms:ViaService": f"s3.{o['region']}.amazonaws.com"}}


def test_workload_roles_trust_pod_identity_in_this_account(shipped) -> None:
    _, run = shipped
    for suffix in ("training", "serving", "ebs-csi"):
        trust = json.loads(run.one(tok.IAM_ROLE, f"identity-{suffix}").inputs["assumeRolePolicy"])
        (st,) = trust["Statement"]
        assert st["Principal"] == {"Service": "pods.eks.amazonaws.com"}
        assert set(st["Action"]) == {"sts:AssumeRole", "sts:TagSession"}
        assert st["Condition"] == {"StringEquals": {"aws:SourceAccount": "123456789012"}}


def test_sagemaker_role_pulls_only_project_images(shipped) -> None:
    _, run = shipped
    doc = _inline(run, "sagemaker")
    pull = next(s for s in doc["Statement"] if s["Sid"] == "EcrPullProjectImages")
    assert sorted(pull["Resource"]) == sorted(r.state["arn"] for r in run.of_type(tok.ECR_REPOSITORY))


def test_no_aws_full_access_policies_anywhere(shipped) -> None:
    _, run = shipped
    arns = [a.inputs["policyArn"] for a in run.of_type(tok.IAM_ROLE_POLICY_ATTACHMENT)]
    assert arns and not [a for a in arns if a.endswith("FullAccess")]


def test_cluster_role_may_use_the_secrets_encryption_key(shipped) -> None:
    # EKS encrypts Secrets with the stack key as the cluster role: without these four actions on that key (what
    # terraform-aws-eks attaches), version upgrades fail (aws/containers-roadmap#1533).
    _, run = shipped
    key = run.outputs["kms_key_arn"]
    assert run.one(tok.EKS_CLUSTER).inputs["encryptionConfig"]["provider"]["keyArn"] == key
    policy = run.one(tok.IAM_ROLE_POLICY, "identity-cluster-policy")
    assert policy.inputs["role"] == run.one(tok.IAM_ROLE, "identity-cluster").inputs["name"]
    assert _grants(json.loads(policy.inputs["policy"])) == {
        key: {"kms:Encrypt", "kms:Decrypt", "kms:ListGrants", "kms:DescribeKey"}
    }


def _role_policies(run, role: str) -> set[str]:
    """`type::name` of every attachment and inline policy of the Identity role `role`."""
    found = set()
    for typ in (tok.IAM_ROLE_POLICY_ATTACHMENT, tok.IAM_ROLE_POLICY):
        for r in run.of_type(typ):
            if r.name == f"identity-{role}-policy" or r.name.startswith(f"identity-{role}-managed-"):
                found.add(f"{typ}::{r.name}")
    return found


def test_consumers_depend_on_their_role_policies_not_only_the_role(shipped) -> None:
    # pulumi-aws's docs for aws.eks.Cluster and aws.eks.NodeGroup: depend on the policy attachments explicitly, or
    # EKS can be created before its permissions exist and destroy removes them while EKS still cleans up. The
    # SageMaker Model likewise races its RolePolicy at CreateModel (the role must be able to pull the image).
    cfg, run = shipped
    cluster_policies = _role_policies(run, "cluster")
    assert len(cluster_policies) == 2  # AmazonEKSClusterPolicy + the secrets-key policy
    assert cluster_policies <= set(run.one(tok.EKS_CLUSTER).depends_on)
    node_policies = _role_policies(run, "node")
    assert len(node_policies) == 3
    groups = run.of_type(tok.EKS_NODE_GROUP)
    assert len(groups) == 1 + len(cfg.cluster.gpu_pools) + 1  # system, GPU pools, batch
    for group in groups:
        assert node_policies <= set(group.depends_on), group.name
    if cfg.serving.sagemaker_declared:
        sagemaker_policies = _role_policies(run, "sagemaker")
        assert len(sagemaker_policies) == 1
        assert sagemaker_policies <= set(run.one(tok.SAGEMAKER_MODEL).depends_on)
