"""Fuzzing the API from its own request models: bodies generated from the pydantic models' JSON schemas (the same
schemas /openapi.json documents), valid and mutated (lists beyond their `maxItems` included), against a running
server. Whatever the body: never a 5xx, always an OpenAI-shaped error or a complete response, and the server keeps
serving.

Fixed budget for CI: `derandomize=True` (the same examples every run, no example database) and a fixed
`max_examples` per model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from serving.protocol import ChatCompletionRequest, CompletionRequest, SageMakerRequest
from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServingProcess

EXAMPLES = 50
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def mostly(valid: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` nine times in ten: enough well-formed bodies reach the engine, enough broken ones the validation."""
    return st.integers(0, 9).flatmap(lambda i: other if i == 0 else valid)


# any JSON value: what a mutation puts in place of a well-typed one
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# fields whose well-typed values should mostly be cheap to serve (the server's own limits still get tried)
OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    "model": mostly(st.just(MODEL_ID), st.text(max_size=300)),
    "max_tokens": mostly(st.integers(1, 6), st.integers()),
    "max_completion_tokens": mostly(st.integers(1, 6), st.integers()),
    "max_new_tokens": mostly(st.integers(1, 6), st.integers()),
    "n": mostly(st.just(1), st.integers()),
}


def from_schema(schema: dict[str, Any], defs: dict[str, Any], name: str = "") -> st.SearchStrategy[Any]:
    """A strategy for JSON values matching a (pydantic-generated) JSON schema, with some values mutated."""
    if name in OVERRIDES:
        return OVERRIDES[name]
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, name))
    if "anyOf" in schema:
        return st.one_of(*[from_schema(s, defs, name) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return st.text(max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        return mostly(st.integers(schema.get("minimum"), schema.get("maximum")), st.integers())
    if kind == "number":
        return mostly(st.floats(schema.get("minimum"), schema.get("maximum")), st.floats())
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        within = st.lists(items, min_size=low, max_size=3 if high is None else max(low, min(3, high)))
        if high is None:
            return within
        # now and then a list beyond its bound (up to a few thousand copies of one item): refused with one 400
        beyond = st.builds(lambda item, n: [item] * n, items, st.integers(high + 1, high + 4000))
        return mostly(within, beyond)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {k: mostly(from_schema(v, defs, k), JSON) for k, v in props.items()}
        obj = st.fixed_dictionaries(
            {k: fields[k] for k in props if k in required},
            optional={k: fields[k] for k in props if k not in required},
        )
        # now and then a parameter the server does not implement (refused with 400 unless it is a no-op value), a
        # known field that changes nothing (accepted), or an unknown one (ignored, named in X-Ignored-Params)
        names = ["logprobs", "ignore_eos", "tools", "echo", "prompt_cache_key", "metadata", "x_unknown", "name"]
        junk = st.dictionaries(st.sampled_from(names), JSON, max_size=2)
        return mostly(obj, st.tuples(obj, junk).map(lambda t: {**t[0], **t[1]}))
    return JSON


def bodies(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    schema = model.model_json_schema()
    return mostly(from_schema(schema, schema.get("$defs", {})), JSON)


@pytest.fixture(scope="module")
def client(server: ServingProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ALICE_KEY}"}, timeout=60) as c:
        yield c


def check(client: httpx.Client, path: str, body: Any) -> None:
    stream = isinstance(body, dict) and body.get("stream") is True
    content = json.dumps(body).encode()  # NaN / Infinity become JSON's non-standard literals: the server must cope
    with client.stream("POST", path, content=content, headers={"Content-Type": "application/json"}) as r:
        raw = r.read()
    assert r.status_code in (200, 400, 404, 413), (r.status_code, raw[:500], body)
    if r.status_code != 200:
        error = json.loads(raw)["error"]
        assert error["message"] and error["type"] == (
            "not_found_error" if r.status_code == 404 else "invalid_request_error"
        )
        return
    if stream and r.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in raw.decode().splitlines() if line]
        assert not any('"error"' in e for e in events), events[-3:]
        if path == "/invocations" and "inputs" in body and "messages" not in body:
            # TGI's stream (serving/sagemaker.py): no [DONE]; the last event carries the whole text
            assert json.loads(events[-1][len("data:") :])["generated_text"] is not None
        else:
            assert events[-1] == "data: [DONE]"
    else:
        out = json.loads(raw)
        assert out["choices"] if isinstance(out, dict) else out[0]["generated_text"] is not None


@FUZZ
@given(body=bodies(CompletionRequest))
def test_fuzz_completions(client: httpx.Client, body: Any) -> None:
    check(client, "/v1/completions", body)


@FUZZ
@given(body=bodies(ChatCompletionRequest))
def test_fuzz_chat_completions(client: httpx.Client, body: Any) -> None:
    check(client, "/v1/chat/completions", body)


@FUZZ
@given(body=bodies(SageMakerRequest) | bodies(ChatCompletionRequest))
def test_fuzz_invocations(client: httpx.Client, body: Any) -> None:
    check(client, "/invocations", body)


def test_server_still_healthy_after_fuzzing(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    ok = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "still here", "max_tokens": 2})
    assert ok.status_code == 200
