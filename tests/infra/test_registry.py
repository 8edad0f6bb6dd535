"""Registry component: ECR repositories for the two images."""

from __future__ import annotations

import json


def test_repositories_are_immutable_scanned_encrypted(shipped) -> None:
    cfg, run = shipped
    repos = run.of_type("aws:ecr/repository:Repository")
    assert sorted(r.inputs["name"] for r in repos) == [f"llmp-{cfg.stack}/serving", f"llmp-{cfg.stack}/training"]
    for repo in repos:
        assert repo.inputs["imageTagMutability"] == "IMMUTABLE"
        assert repo.inputs["imageScanningConfiguration"]["scanOnPush"] is True
        assert repo.inputs["encryptionConfigurations"] == [
            {"encryptionType": "KMS", "kmsKey": run.outputs["kms_key_arn"]}
        ]
        assert repo.inputs["forceDelete"] is cfg.storage.force_destroy
    for policy in run.of_type("aws:ecr/lifecyclePolicy:LifecyclePolicy"):
        rules = json.loads(policy.inputs["policy"])["rules"]
        assert [r["selection"]["tagStatus"] for r in rules] == ["untagged", "any"]


def test_repository_urls_are_exported(shipped) -> None:
    cfg, run = shipped
    assert run.outputs["serving_repository_url"].endswith(
        f".dkr.ecr.{cfg.region}.amazonaws.com/llmp-{cfg.stack}/serving"
    )
