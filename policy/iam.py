"""IAM document checks: pure functions over a policy document, shared by the policy pack and the program's tests.

An identity policy (role inline policy, managed policy) must not allow `*` or `s3:*` / `kms:*` actions, must not
allow S3/KMS actions on `*` resources, and must not allow through `NotAction` / `NotResource` (an allow-list turned
inside out grants everything else). Deny statements are never a violation: a broad deny only narrows access.

A KMS key policy is a resource policy: its `Resource: "*"` means "this key", and the account root administering
the key with `kms:*` is the documented default that lets IAM policies grant use. `key_policy=True` accepts exactly
those two things and still rejects `*` actions for any other principal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

SENSITIVE_SERVICES = ("s3", "kms")
"""Services where a wildcard resource or service-wide wildcard action is a data-exfiltration or key-abuse risk."""


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _parse(document: dict | str) -> dict[str, Any] | None:
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:
            return None
    return document if isinstance(document, dict) else None


def _service(action: str) -> str:
    return action.split(":", 1)[0].lower() if ":" in action else ""


def _is_root_principal(principal: Any) -> bool:
    """True when the statement's only principal is an account root (`arn:...:iam::<account>:root`)."""
    if not isinstance(principal, dict) or set(principal) != {"AWS"}:
        return False
    arns = _as_list(principal["AWS"])
    return bool(arns) and all(isinstance(a, str) and a.startswith("arn:aws") and a.endswith(":root") for a in arns)


def _statements(doc: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    for i, stmt in enumerate(_as_list(doc.get("Statement"))):
        if isinstance(stmt, dict):
            yield str(stmt.get("Sid") or f"#{i}"), stmt


def iam_document_violations(document: dict | str, *, key_policy: bool = False) -> list[str]:
    """Problems with an IAM policy document (dict or JSON string), one message per problem; [] when it is fine."""
    doc = _parse(document)
    if doc is None:
        return ["policy document is not a JSON object"]
    problems: list[str] = []
    for sid, stmt in _statements(doc):
        if str(stmt.get("Effect", "")).lower() != "allow":
            continue
        where = f"statement {sid}"
        if "NotAction" in stmt:
            problems.append(f"{where} allows NotAction (everything except a list): list the actions it needs")
        if "NotResource" in stmt:
            problems.append(f"{where} allows NotResource (everything except a list): list the resources")
        actions = [a for a in _as_list(stmt.get("Action")) if isinstance(a, str)]
        resources = [r for r in _as_list(stmt.get("Resource")) if isinstance(r, str)]
        admin_of_key = key_policy and _is_root_principal(stmt.get("Principal"))
        for action in actions:
            if action == "*" or action.lower() == "*:*":
                problems.append(f"{where} allows every action ('{action}'): list the actions it needs")
            elif _service(action) in SENSITIVE_SERVICES and action.split(":", 1)[1] == "*" and not admin_of_key:
                problems.append(f"{where} allows '{action}': list the {_service(action)} actions it needs")
        if key_policy:
            continue  # a key policy's "*" resource is the key itself
        sensitive = sorted({_service(a) for a in actions if _service(a) in SENSITIVE_SERVICES or a == "*"} - {""})
        if "*" in resources and (sensitive or any(a == "*" for a in actions)):
            services = "/".join(sensitive) or "all"
            problems.append(
                f"{where} allows {services} actions on Resource '*': scope it to the bucket/key ARNs it needs"
            )
    return problems


def is_full_access_managed_policy(arn: str) -> bool:
    """True for AWS-managed `*FullAccess` policies (e.g. arn:aws:iam::aws:policy/AmazonSageMakerFullAccess)."""
    if not isinstance(arn, str):
        return False
    prefix, sep, name = arn.partition(":iam::aws:policy/")
    return bool(sep) and prefix.startswith("arn:aws") and name.rsplit("/", 1)[-1].endswith("FullAccess")
