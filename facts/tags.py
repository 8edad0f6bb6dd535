"""The tags every taggable resource of a stack carries: cost allocation and teardown sweeps key on them."""

from __future__ import annotations

PROJECT_TAG = "llm-platform:project"
ENVIRONMENT_TAG = "llm-platform:environment"
STACK_TAG = "llm-platform:stack"
MANAGED_BY_TAG = "llm-platform:managed-by"

PROJECT = "llm-platform"
MANAGED_BY = "pulumi"

STACK_TAG_KEYS = (PROJECT_TAG, ENVIRONMENT_TAG, STACK_TAG, MANAGED_BY_TAG)


def stack_tags(stack: str, environment: str) -> dict[str, str]:
    """The tag set for one stack. The stack tag alone identifies what a teardown sweep may touch."""
    return {
        PROJECT_TAG: PROJECT,
        ENVIRONMENT_TAG: environment,
        STACK_TAG: stack,
        MANAGED_BY_TAG: MANAGED_BY,
    }
