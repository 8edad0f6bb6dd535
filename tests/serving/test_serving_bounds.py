"""Bounds before work: every list a client sends is bounded and validated fail-fast, a huge invalid body costs one
error (not one per item), the chat pre-check counts template tokens per message, and a JSON number too long to read
is a 400 (never a 500 with a traceback)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from serving.errors import from_validation_error
from serving.protocol import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_PROMPT_TOKEN_IDS,
    MAX_PROMPTS,
    MAX_STOP_SEQUENCES,
    ChatCompletionRequest,
    CompletionRequest,
    SageMakerRequest,
)
from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServingProcess

AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
CHAT: dict[str, Any] = {"model": MODEL_ID, "max_tokens": 2}

# (model, body): each list beyond its bound, with items that are invalid too (today: one error per item)
HUGE = [
    (CompletionRequest, {"model": MODEL_ID, "prompt": [-1] * 250_000}),  # token ids, each invalid
    (CompletionRequest, {"model": MODEL_ID, "prompt": [0] * (MAX_PROMPT_TOKEN_IDS + 1)}),
    (CompletionRequest, {"model": MODEL_ID, "prompt": ["a"] * 10_000}),  # beyond MAX_PROMPTS
    (CompletionRequest, {"model": MODEL_ID, "prompt": "x", "stop": [0] * 50_000}),
    (ChatCompletionRequest, {**CHAT, "messages": [{}] * 30_000}),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": ""}] * (MAX_MESSAGES + 1)}),
    (ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": [{"type": "x"}] * 50_000}]}),
    (SageMakerRequest, {"inputs": "x", "parameters": {"stop": [None] * 50_000}}),
]


@pytest.mark.parametrize(("model", "body"), HUGE, ids=[f"{m.__name__}-{i}" for i, (m, _) in enumerate(HUGE)])
def test_a_huge_invalid_list_is_one_error(model: Any, body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    # a union (str | list) reports each branch, and the first bad item its own few errors; never one per item
    assert info.value.error_count() <= 4
    error = from_validation_error(info.value)
    assert error.status == 400 and error.param and len(error.message) < 300


def test_every_list_has_a_bound() -> None:
    """Each array in the request schemas (what /openapi.json documents) has maxItems."""

    def arrays(schema: Any, path: str) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        if isinstance(schema, dict):
            if schema.get("type") == "array":
                found.append((path, schema.get("maxItems")))
            for key, value in schema.items():
                found += arrays(value, f"{path}.{key}")
        elif isinstance(schema, list):
            for i, value in enumerate(schema):
                found += arrays(value, f"{path}[{i}]")
        return found

    found = [a for m in (CompletionRequest, ChatCompletionRequest, SageMakerRequest) for a in arrays(
        m.model_json_schema(), m.__name__)]  # fmt: skip
    assert len(found) >= 5
    assert [path for path, bound in found if bound is None] == []
    bounds = {bound for _, bound in found}
    assert {MAX_MESSAGES, MAX_CONTENT_PARTS, MAX_STOP_SEQUENCES, MAX_PROMPTS, MAX_PROMPT_TOKEN_IDS} <= bounds


def post(server: ServingProcess, path: str, content: bytes) -> httpx.Response:
    return httpx.post(
        server.url + path, content=content, headers={**AUTH, "Content-Type": "application/json"}, timeout=60
    )


def test_million_item_body_is_refused_fast_with_one_error(server: ServingProcess) -> None:
    content = json.dumps({"model": MODEL_ID, "prompt": [0] * 300_000}).encode()
    assert len(content) > 900_000
    started = time.monotonic()
    r = post(server, "/v1/completions", content)
    elapsed = time.monotonic() - started
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"].startswith("prompt")
    assert elapsed < 2.0  # today: ~2.5 s of validation and error building on the event loop
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_thirty_thousand_empty_messages_are_refused_before_tokenizing(server: ServingProcess) -> None:
    content = json.dumps({**CHAT, "messages": [{"role": "user", "content": ""}] * 30_000}).encode()
    r = post(server, "/v1/chat/completions", content)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"


def test_chat_pre_check_counts_template_tokens_per_message(server: ServingProcess) -> None:
    """600 empty messages (0 characters) cannot fit the debug model's 512-token context: refused by the pre-check,
    not after rendering and tokenizing them."""
    content = json.dumps({**CHAT, "messages": [{"role": "user", "content": ""}] * 600}).encode()
    r = post(server, "/v1/chat/completions", content)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "template" in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/invocations"])
def test_integer_too_long_to_read_is_a_400(server: ServingProcess, path: str) -> None:
    content = b'{"model":"' + MODEL_ID.encode() + b'","prompt":"x","seed":' + b"9" * 5000 + b"}"
    r = post(server, path, content)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["code"] == "invalid_json"
    assert "Traceback" not in server.logs()


def test_large_logit_bias_is_refused_cheaply(server: ServingProcess) -> None:
    bias = {str(i): 1 for i in range(50_000)}
    r = post(server, "/v1/completions", json.dumps({"model": MODEL_ID, "prompt": "x", "logit_bias": bias}).encode())
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logit_bias"
