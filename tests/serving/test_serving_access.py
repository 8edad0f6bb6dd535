"""Keys, per-key limits and the audit log."""

from __future__ import annotations

import time

import boto3
import httpx
import openai
import pytest
from botocore.config import Config

from serving.auth import KeyStore, hash_key
from serving.errors import APIError
from serving.limits import RateLimiter
from tests.serving.conftest import ALICE_KEY, LIMITED_KEY, MODEL_ID, ServingProcess

PROMPT_MARKER = "confidential-prompt-text-7f3a"


def client(server: ServingProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_missing_and_wrong_keys_get_401(server: ServingProcess) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "x"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError) as err:
        client(server, "sk-wrong").completions.create(model=MODEL_ID, prompt="x", max_tokens=1)
    assert err.value.status_code == 401
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_over_the_per_key_limit_gets_429_with_retry_after(server: ServingProcess) -> None:
    limited = client(server, LIMITED_KEY)  # rpm=2
    for _ in range(2):
        limited.completions.create(model=MODEL_ID, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        limited.completions.create(model=MODEL_ID, prompt="x", max_tokens=1)
    assert int(err.value.response.headers["Retry-After"]) >= 1
    # other keys are not affected
    client(server, ALICE_KEY).completions.create(model=MODEL_ID, prompt="x", max_tokens=1)


def test_audit_line_per_request_without_prompt_or_key(server: ServingProcess) -> None:
    c = client(server, ALICE_KEY)
    r = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": PROMPT_MARKER}], max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        client(server, ALICE_KEY + "-wrong").completions.create(model=MODEL_ID, prompt=PROMPT_MARKER, max_tokens=1)
    time.sleep(0.2)
    lines = server.audit_lines()
    mine = [line for line in lines if line["request_id"] == r.id]
    assert len(mine) == 1
    line = mine[0]
    assert line["key_id"] == "alice" and line["model"] == MODEL_ID and line["status"] == 200
    assert r.usage is not None
    assert (line["prompt_tokens"], line["completion_tokens"]) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert line["latency_ms"] > 0
    assert any(x["status"] == 401 for x in lines)
    everything = server.logs()
    assert PROMPT_MARKER not in everything
    assert ALICE_KEY not in everything and LIMITED_KEY not in everything


def test_sagemaker_invoke_endpoint_through_boto3(server: ServingProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    runtime = boto3.client(
        "sagemaker-runtime",
        region_name="us-east-1",
        endpoint_url=server.url,
        config=Config(retries={"max_attempts": 1}),
    )

    # boto3 posts to /endpoints/<name>/invocations; SageMaker rewrites that to the container's /invocations, so the
    # test does the same rewrite with a request hook
    def to_container_path(request, **_: object) -> None:
        request.url = server.url + "/invocations"

    runtime.meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint", to_container_path)
    body = b'{"inputs": "Hello from SageMaker", "parameters": {"max_new_tokens": 6, "do_sample": false}}'
    r = runtime.invoke_endpoint(
        EndpointName="llm", Body=body, ContentType="application/json", CustomAttributes=f"api_key={ALICE_KEY}"
    )
    import json

    out = json.loads(r["Body"].read())
    assert isinstance(out, list) and isinstance(out[0]["generated_text"], str)
    chat = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'
    r = runtime.invoke_endpoint(
        EndpointName="llm", Body=chat, ContentType="application/json", CustomAttributes=f"api_key={ALICE_KEY}"
    )
    out = json.loads(r["Body"].read())
    assert out["object"] == "chat.completion" and out["model"] == MODEL_ID and out["usage"]["completion_tokens"] >= 1
    with pytest.raises(runtime.exceptions.ClientError):
        runtime.invoke_endpoint(EndpointName="llm", Body=body, ContentType="application/json")  # no key: 401


# -- units -----------------------------------------------------------------------------------------------------------


def test_key_file_keeps_only_hashes() -> None:
    store = KeyStore.parse(f"a {ALICE_KEY} rpm=5\nb sha256:{hash_key('sk-b')} tpm=9\n", 100, 1000)
    assert ALICE_KEY not in repr(store._entries)
    a = store.authenticate(ALICE_KEY, 100, 1000)
    assert (a.key_id, a.rpm, a.tpm) == ("a", 5, 1000)
    assert store.authenticate("sk-b", 100, 1000).tpm == 9
    with pytest.raises(APIError):
        store.authenticate("sk-c", 100, 1000)
    with pytest.raises(ValueError):
        KeyStore.parse("a sk-one-0123456789ab\na sk-two-0123456789ab\n", 1, 1)  # duplicate ids


def test_rate_limiter_windows_slide() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    key = KeyStore.parse("k sk-k-0123456789abcdef rpm=2 tpm=100", 1, 1).authenticate("sk-k-0123456789abcdef", 1, 1)
    limiter.admit(key)
    limiter.admit(key)
    with pytest.raises(APIError) as err:
        limiter.admit(key)
    assert err.value.status == 429 and err.value.headers()["Retry-After"] == "60"
    now[0] = 61.0
    limiter.settle(limiter.admit(key), 150)
    now[0] = 100.0
    with pytest.raises(APIError) as err:
        limiter.admit(key)
    assert err.value.code == "tokens_rate_limit_exceeded" and err.value.headers()["Retry-After"] == "21"
