"""Policy rules as plain functions over recorded resources (the pack and `infra.preview` both run them)."""

from __future__ import annotations

from policy.iam import iam_document_violations, is_full_access_managed_policy

__all__ = ["iam_document_violations", "is_full_access_managed_policy"]
