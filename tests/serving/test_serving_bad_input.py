"""Bad requests get a clear 4xx in OpenAI's error format, and the server keeps answering."""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServingProcess

HEADERS = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "application/json"}
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}

CASES = [
    ("malformed json", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, "invalid_json"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_request"),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-17"}, 404, "model_not_found"),
    ("prompt longer than context", "/v1/completions", {"model": MODEL_ID, "prompt": "word " * 3000}, 400,
     "context_length_exceeded"),
    ("max_tokens zero", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, None),
    ("temperature negative", "/v1/chat/completions", {**CHAT, "temperature": -1}, 400, None),
    ("top_p above 1", "/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400, None),
    ("top_p wrong type", "/v1/chat/completions", {**CHAT, "top_p": "high"}, 400, None),
    ("n above 16", "/v1/chat/completions", {**CHAT, "n": 17}, 400, "invalid_value"),
    ("token id beyond the vocabulary", "/v1/completions", {"model": MODEL_ID, "prompt": [[1, 2], [10**9]]}, 400,
     None),
    ("too many stops", "/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ("no messages", "/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400, None),
    ("bad role", "/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     None),
    ("missing prompt", "/v1/completions", {"model": MODEL_ID}, 400, None),
    ("invocations without inputs", "/invocations", {"foo": 1}, 400, None),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_clear_4xx(server: ServingProcess, path: str, body: object, status: int, code: str) -> None:
    content = body if isinstance(body, bytes) else None
    payload = None if isinstance(body, bytes) else body
    r = httpx.post(server.url + path, content=content, json=payload, headers=HEADERS, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code
    # the server is unaffected
    ok = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers=HEADERS, timeout=30)
    assert ok.status_code == 200


def test_bad_streaming_request_fails_before_the_stream(server: ServingProcess) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions", json={**CHAT, "stream": True, "temperature": -1}, headers=HEADERS
    )
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")


def test_unknown_route_and_method(server: ServingProcess) -> None:
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/v1/completions").status_code == 405
