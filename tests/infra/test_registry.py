"""Registry component: ECR repositories for the two images."""

from __future__ import annotations

import json

from facts import pulumi_types as tok


def test_repositories_are_immutable_scanned_encrypted(shipped) -> None:
    cfg, run = shipped
    repos = run.of_type(tok.ECR_REPOSITORY)
    assert sorted(r.inputs["name"] for r in repos) == [f"llmp-{cfg.stack}/serving", f"llmp-{cfg.stack}/training"]
    for repo in repos:
        assert repo.inputs["imageTagMutability"] == "IMMUTABLE"
        assert repo.inputs["imageScanningConfiguration"]["scanOnPush"] is True
        assert repo.inputs["encryptionConfigurations"] == [
            {"encryptionType": "KMS", "kmsKey": run.outputs["kms_key_arn"]}
        ]
        assert repo.inputs["forceDelete"] is cfg.storage.force_destroy


def test_lifecycle_never_expires_a_tagged_image(shipped) -> None:
    # A stack deploys a pinned tag (or the digest of a tagged image) for as long as its config names it: any rule
    # that selects tagged images ("any", "tagged", a prefix or pattern) can expire it under a running stack.
    _, run = shipped
    policies = run.of_type(tok.ECR_LIFECYCLE_POLICY)
    assert len(policies) == 2
    for policy in policies:
        rules = json.loads(policy.inputs["policy"])["rules"]
        assert rules, "untagged layers of failed pushes must still be cleaned up"
        for rule in rules:
            assert rule["action"] == {"type": "expire"}
            assert rule["selection"]["tagStatus"] == "untagged", rule
            assert not {"tagPrefixList", "tagPatternList"} & set(rule["selection"]), rule


def test_repository_urls_are_exported(shipped) -> None:
    cfg, run = shipped
    assert run.outputs["serving_repository_url"].endswith(
        f".dkr.ecr.{cfg.region}.amazonaws.com/llmp-{cfg.stack}/serving"
    )
