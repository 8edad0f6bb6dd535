"""The audit log records what was served and charged: a client's `model` string only when it names a served model,
and prompt tokens only once they were reserved against the key's budget (billing may read these lines)."""

from __future__ import annotations

import time

import httpx

from tests.serving.conftest import ALICE_KEY, MODEL_ID, TINY_KEY, ServingProcess


def audit_until(server: ServingProcess, predicate: object, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [a for a in server.audit_lines() if predicate(a)]  # type: ignore[operator]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_unknown_model_is_not_written_to_the_audit_log(server: ServingProcess) -> None:
    marker = "user-typed-secret-in-model-field"
    r = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
        json={"model": marker, "prompt": "hi", "max_tokens": 1},
        timeout=30,
    )
    assert r.status_code == 404
    bad = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
        json={"model": marker + "-2", "prompt": "hi", "temperature": 9},
        timeout=30,
    )
    assert bad.status_code == 400
    ok = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
        json={"model": MODEL_ID, "prompt": "hi", "max_tokens": 1},
        timeout=30,
    )
    assert ok.status_code == 200
    assert audit_until(server, lambda a: a["model"] == MODEL_ID and a["status"] == 200)
    assert audit_until(server, lambda a: a["status"] == 404 and a["model"] == "")
    assert marker not in server.stdout_path.read_text()


def test_tpm_refused_request_records_no_prompt_tokens(server: ServingProcess) -> None:
    """`tiny` has tpm=60: a request that may use more is refused (429) before anything is reserved."""
    r = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {TINY_KEY}"},
        json={"model": MODEL_ID, "prompt": "a few words of prompt " * 4, "max_tokens": 59},
        timeout=30,
    )
    assert r.status_code == 429, r.text
    refused = audit_until(server, lambda a: a["key_id"] == "tiny" and a["status"] == 429)
    assert refused and all(a["prompt_tokens"] == 0 and a["completion_tokens"] == 0 for a in refused)
