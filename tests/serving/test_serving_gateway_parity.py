"""The gateway applies the built-in engine's caps, defaults and token budgets, forwards only allow-listed fields, and
never blames the client's key for the upstream's own 401/429. The upstream here is a scripted fake (a real socket,
an OpenAI-shaped engine that sends no usage and records what it received), so each behaviour can be forced."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from serving.backends.base import RequestContext
from serving.backends.upstream import ENGINE_CAPABILITIES, FORWARDED_FIELDS, UpstreamBackend, estimate_prompt_tokens
from serving.protocol import ChatCompletionRequest
from tests.serving.conftest import MODEL_ID, ServerFactory, ServingProcess

GATE_KEY = "sk-test-gate-0123456789"
DIGITS_KEY = "sk-test-digits-0123456789"  # tpm=2000: the overspend case
STREAMED_CHUNKS = 6


class FakeUpstream(BaseHTTPRequestHandler):
    received: list[dict] = []
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: simplest streaming

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeUpstream.received.append(body)
        prompt = body.get("prompt", "")
        prompt = prompt if isinstance(prompt, str) else "list"  # a prompt list: answered like any plain prompt
        if prompt == "upstream-401":
            return self._json(401, {"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}})
        if prompt == "upstream-429":
            return self._json(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "7"})
        if prompt.startswith("usage-hold"):  # one token per byte, as digits or CJK are: and the real count reported
            time.sleep(1.0)
            usage = {"prompt_tokens": len(prompt.encode()), "completion_tokens": 8}
            usage["total_tokens"] = usage["prompt_tokens"] + 8
            choice = {"index": 0, "text": "12345678", "finish_reason": "length"}
            return self._json(200, {"object": "text_completion", "choices": [choice], "usage": usage})
        if not body.get("stream"):  # no usage in the body, as some engines do
            if prompt.startswith("hold"):
                time.sleep(1.0)
            return self._json(200, {"object": "text_completion", "choices": [{"index": 0, "text": "abcdefgh"}]})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for i in range(STREAMED_CHUNKS if prompt != "slow" else 200):
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.05 if prompt == "slow" else 0)
            self.wfile.write(b"data: [DONE]\n\n")  # and no usage chunk, although the gateway asked for one
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def fake_upstream() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def gate(start_server: ServerFactory, fake_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> ServingProcess:
    keys = tmp_path_factory.mktemp("gate") / "keys"
    keys.write_text(f"gate {GATE_KEY} tpm=400\ndigits {DIGITS_KEY} tpm=2000\n")
    return start_server(
        "--upstream", fake_upstream, "--served-model-name", MODEL_ID, "--api-keys-file", str(keys),
        "--default-max-tokens", "7", "--max-tokens-cap", "100",
    )  # fmt: skip


def call(gate: ServingProcess, body: dict, **kw: object) -> httpx.Response:
    return httpx.post(
        gate.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {GATE_KEY}"}, timeout=60, **kw
    )


def test_default_max_tokens_and_allow_list_reach_the_upstream(gate: ServingProcess) -> None:
    FakeUpstream.received.clear()
    assert call(gate, {"model": MODEL_ID, "prompt": "hello", "user": "u1", "logprobs": False}).status_code == 200
    sent = FakeUpstream.received[-1]
    assert sent["max_tokens"] == 7  # --default-max-tokens, not the upstream's (vLLM: the rest of the context)
    assert set(sent) <= FORWARDED_FIELDS | {"stream_options"} and "logprobs" not in sent
    r = call(gate, {"model": MODEL_ID, "prompt": "hello", "ignore_eos": True, "min_tokens": 50})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    r = call(gate, {"model": MODEL_ID, "prompt": "hello", "max_tokens": 101, "top_k": 5, "repetition_penalty": 1.1})
    assert r.status_code == 200 and r.headers["X-Max-Tokens-Clamped"] == "101->100"  # the cap, clamped as vLLM does
    sent = FakeUpstream.received[-1]
    assert (sent["max_tokens"], sent["top_k"], sent["repetition_penalty"]) == (100, 5, 1.1)  # vLLM's samplers


def test_payload_is_only_allow_listed_fields() -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9, "top_p": 0.5}
    )
    ctx = RequestContext("r", "chat_completions")
    payload = UpstreamBackend("http://127.0.0.1:9", default_max_tokens=3)._payload(body, ctx)
    assert set(payload) <= FORWARDED_FIELDS
    assert payload["max_tokens"] == 9 and payload["top_p"] == 0.5 and ctx.prompt_tokens >= 1


def test_upstream_auth_and_rate_errors_are_about_the_upstream(gate: ServingProcess) -> None:
    r = call(gate, {"model": MODEL_ID, "prompt": "upstream-401"})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_error"
    assert "Incorrect API key" not in r.text and "not your API key" in r.text
    r = call(gate, {"model": MODEL_ID, "prompt": "upstream-429"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_overloaded"
    assert r.headers["Retry-After"] == "7"


def test_streams_without_upstream_usage_are_counted_and_abandoned_ones_charged(gate: ServingProcess) -> None:
    with httpx.stream(
        "POST", gate.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "count me", "stream": True},
        headers={"Authorization": f"Bearer {GATE_KEY}"}, timeout=60,
    ) as r:  # fmt: skip
        assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
    with httpx.stream(
        "POST", gate.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "slow", "stream": True},
        headers={"Authorization": f"Bearer {GATE_KEY}"}, timeout=60,
    ) as r:  # fmt: skip
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)  # three chunks (each followed by a blank line), then the client walks away
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        audit = [a for a in gate.audit_lines() if a["endpoint"] == "completions" and a["stream"]]
        if len(audit) >= 2:
            break
        time.sleep(0.2)
    counted = next(a for a in audit if a["status"] == 200)
    assert counted["completion_tokens"] == STREAMED_CHUNKS and counted["prompt_tokens"] >= 1
    abandoned = next(a for a in audit if a["status"] == 499)
    assert abandoned["completion_tokens"] >= 3 and abandoned["prompt_tokens"] >= 1


def test_gateway_reserves_the_key_budget_before_forwarding(gate: ServingProcess) -> None:
    """tpm=400, six concurrent requests that may each use 141 tokens (41 for the 40-byte prompt + max_tokens 100)
    and really use 12: at most two are in flight at once, the others are refused without reaching the upstream."""
    FakeUpstream.received.clear()
    body = {"model": MODEL_ID, "prompt": "hold" + "x" * 36, "max_tokens": 100}
    with ThreadPoolExecutor(6) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: call(gate, body), range(6))]
    assert 1 <= statuses.count(200) <= 2 and statuses.count(429) == 6 - statuses.count(200)
    assert len(FakeUpstream.received) == statuses.count(200)


def test_concurrent_requests_cannot_overspend_the_key(gate: ServingProcess) -> None:
    """A tpm=2000 key sends 20 concurrent 400-byte prompts of digits that really cost a token per byte: the reservation
    (one token per byte) admits only what fits, so the tokens charged stay within 2000 (with bytes / 4 it was ~7400)."""
    body = {"model": MODEL_ID, "prompt": "usage-hold-" + "7" * 389, "max_tokens": 8}
    with ThreadPoolExecutor(20) as pool:
        statuses = [
            r.status_code
            for r in pool.map(
                lambda _: httpx.post(
                    gate.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {DIGITS_KEY}"},
                    timeout=60,
                ),
                range(20),
            )
        ]  # fmt: skip
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 429}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        charged = [a for a in gate.audit_lines() if a["key_id"] == "digits" and a["status"] == 200]
        if len(charged) == statuses.count(200):
            break
        time.sleep(0.2)
    assert all(a["prompt_tokens"] == 400 for a in charged)  # settled to the upstream's usage
    assert sum(a["prompt_tokens"] + a["completion_tokens"] for a in charged) <= 2000


def test_chat_reservation_counts_template_tokens_for_empty_messages() -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": ""}] * 1000, "max_tokens": 1}
    )
    assert estimate_prompt_tokens(body) >= 1000 * 4  # 0 bytes, but every message renders its role markers
    prompt = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "12345678" * 100}], "max_tokens": 1}
    )
    assert estimate_prompt_tokens(prompt) >= 800  # one token per byte: digits come close to it


def test_vllm_capabilities_are_forwarded_as_sent(gate: ServingProcess) -> None:
    """What vLLM implements and the built-in engine refuses (tools, response_format, logit_bias, ...) reaches the
    upstream unchanged; `n`, `echo`, logprobs and prompt lists too; engine options stay refused."""
    FakeUpstream.received.clear()
    extras = {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "logit_bias": {"42": -100},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    body = {"model": MODEL_ID, "prompt": ["a", "b"], "n": 2, "echo": True, "logprobs": 1, "max_tokens": 3, **extras}
    r = call(gate, body)
    assert r.status_code == 200, r.text
    sent = FakeUpstream.received[-1]
    assert {k: sent[k] for k in extras} == extras
    assert (sent["prompt"], sent["n"], sent["echo"], sent["logprobs"]) == (["a", "b"], 2, True, 1)
    assert set(sent) <= FORWARDED_FIELDS | ENGINE_CAPABILITIES["vllm"] | {"stream_options"}
    r = call(gate, {"model": MODEL_ID, "prompt": "x", "use_beam_search": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search"


def test_the_reservation_covers_every_choice(gate: ServingProcess) -> None:
    """tpm=400 (the `gate` key): 2 prompts x n=2 x max_tokens 100 = 400 completion tokens + the prompts do not fit,
    so the request is refused before reaching the upstream (whatever the key spent before); a small one fits."""
    FakeUpstream.received.clear()
    r = call(gate, {"model": MODEL_ID, "prompt": ["a", "b"], "n": 2, "max_tokens": 100})
    assert r.status_code == 429 and not FakeUpstream.received
    assert call(gate, {"model": MODEL_ID, "prompt": ["a", "b"], "n": 2, "max_tokens": 10}).status_code == 200


def test_reservation_estimates_prompt_lists_and_token_ids() -> None:
    from serving.protocol import CompletionRequest

    one = estimate_prompt_tokens(CompletionRequest.model_validate({"prompt": "abcd"}))
    two = estimate_prompt_tokens(CompletionRequest.model_validate({"prompt": ["abcd", "abcd"]}))
    assert two >= 2 * one - 1
    assert estimate_prompt_tokens(CompletionRequest.model_validate({"prompt": [[1, 2, 3], [4]]})) >= 4
