"""Registry: ECR repositories for the training and serving images."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

IMAGES = ("training", "serving")

LIFECYCLE_POLICY = {
    "rules": [
        {
            "rulePriority": 1,
            "description": "Untagged layers from failed or superseded pushes",
            "selection": {
                "tagStatus": "untagged",
                "countType": "sinceImagePushed",
                "countUnit": "days",
                "countNumber": 7,
            },
            "action": {"type": "expire"},
        },
    ]
}
"""Only untagged images ever expire. A stack deploys whatever tag (or digest of a tagged image) its config names, for
as long as it names it: a count- or age-based rule on tagged images ("keep the 50 most recent") eventually expires a
pinned release that a stack still runs, and its nodes then fail to pull. A prefix rule is no safer: ECR expires whole
images, so an image carrying both a `ci-*` tag and a release tag matches a `ci-*` rule and loses both (ECR user
guide, lifecycle policy examples, "Filtering on multiple tags"). Tags are immutable, so the number of tagged
images grows only with pushes; prune them deliberately (`aws ecr batch-delete-image`) once no stack names them."""


@dataclass
class RegistryArgs:
    name_prefix: str
    """Prefix of the repository names (StackConfig.name_prefix)."""
    force_delete: bool
    """Let a destroy delete repositories that still hold images (forceDestroyBuckets)."""
    kms_key_arn: pulumi.Input[str]
    tags: dict[str, str]


class Registry(pulumi.ComponentResource):
    """ECR repositories for the training and serving images: immutable tags, scan on push, KMS, untagged images
    expire."""

    repository_urls: dict[str, pulumi.Output[str]]
    """Repository URLs by image (training, serving): the image references workloads run; exported."""
    repository_arns: dict[str, pulumi.Output[str]]
    """Repository ARNs by image: the SageMaker execution role may pull from exactly these."""

    def __init__(self, name: str, args: RegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("llm-platform:infra:Registry", name, None, opts)
        self.repositories = {}
        for image in IMAGES:
            repo = aws.ecr.Repository(
                f"{name}-{image}",
                name=f"{args.name_prefix}/{image}",
                # Immutable tags: a deployed tag always means the same image, so rollbacks and audits are exact.
                image_tag_mutability="IMMUTABLE",
                image_scanning_configuration={"scan_on_push": True},
                encryption_configurations=[{"encryption_type": "KMS", "kms_key": args.kms_key_arn}],
                force_delete=args.force_delete,
                tags=args.tags,
                opts=pulumi.ResourceOptions(parent=self),
            )
            aws.ecr.LifecyclePolicy(
                f"{name}-{image}-lifecycle",
                repository=repo.name,
                policy=json.dumps(LIFECYCLE_POLICY),
                opts=pulumi.ResourceOptions(parent=self),
            )
            self.repositories[image] = repo
        self.repository_urls = {k: r.repository_url for k, r in self.repositories.items()}
        self.repository_arns = {k: r.arn for k, r in self.repositories.items()}
        self.register_outputs({f"{k}_repository_url": v for k, v in self.repository_urls.items()})
