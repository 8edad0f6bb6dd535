"""Gateway mode: a second instance fronts the shared server as its upstream (as it fronts vLLM in the GPU image)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from ops.net import free_port
from tests.serving.conftest import ALICE_KEY, FRONT_KEY, MODEL_ID, ServerFactory, ServingProcess


@pytest.fixture(scope="module")
def front(
    start_server: ServerFactory, server: ServingProcess, tmp_path_factory: pytest.TempPathFactory
) -> ServingProcess:
    keys = tmp_path_factory.mktemp("front-secrets") / "keys"
    keys.write_text(f"front-team {FRONT_KEY}\n")
    return start_server("--upstream", server.url, "--upstream-api-key", ALICE_KEY, "--api-keys-file", str(keys))


def oai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "through the gateway"}], "max_tokens": 12}


def test_models_and_completion_pass_through(front: ServingProcess, server: ServingProcess) -> None:
    assert [m.id for m in oai(front.url, FRONT_KEY).models.list()] == [MODEL_ID]
    kw = {"model": MODEL_ID, "prompt": "same answer", "max_tokens": 8, "temperature": 0}
    via = oai(front.url, FRONT_KEY).completions.create(**kw)  # type: ignore[call-overload]
    direct = oai(server.url, ALICE_KEY).completions.create(**kw)  # type: ignore[call-overload]
    assert via.choices[0].text == direct.choices[0].text
    assert via.usage == direct.usage


def test_streaming_passes_through(front: ServingProcess, server: ServingProcess) -> None:
    direct = oai(server.url, ALICE_KEY).chat.completions.create(temperature=0, **CHAT)  # type: ignore[call-overload]
    chunks = list(oai(front.url, FRONT_KEY).chat.completions.create(temperature=0, stream=True, **CHAT))  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    # the gateway asked the upstream for usage but the client did not: no usage-only chunk reaches the client
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    with_usage = list(
        oai(front.url, FRONT_KEY).chat.completions.create(
            temperature=0, stream=True, stream_options={"include_usage": True}, **CHAT
        )  # type: ignore[call-overload]
    )
    assert with_usage[-1].usage == direct.usage


def test_keys_are_enforced_at_the_front(front: ServingProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        oai(front.url, ALICE_KEY).chat.completions.create(**CHAT)  # the upstream's key is not a front key
    assert httpx.post(front.url + "/v1/chat/completions", json=CHAT).status_code == 401
    assert httpx.post(front.url + "/invocations", json={"inputs": "x"}).status_code == 401


def test_upstream_errors_keep_their_status(front: ServingProcess) -> None:
    with pytest.raises(openai.NotFoundError):
        oai(front.url, FRONT_KEY).chat.completions.create(**{**CHAT, "model": "nope"})
    with pytest.raises(openai.BadRequestError):
        oai(front.url, FRONT_KEY).completions.create(model=MODEL_ID, prompt="word " * 3000)


def test_front_audits_with_upstream_usage(front: ServingProcess) -> None:
    r = oai(front.url, FRONT_KEY).chat.completions.create(stream=True, **CHAT)  # type: ignore[call-overload]
    list(r)
    headers = {"Authorization": f"Bearer {FRONT_KEY}"}
    sm = httpx.post(front.url + "/invocations", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}},
                    headers=headers, timeout=60)  # fmt: skip
    assert sm.status_code == 200 and isinstance(sm.json()[0]["generated_text"], str)
    time.sleep(0.2)
    lines = [a for a in front.audit_lines() if a["status"] == 200 and a["endpoint"] == "chat_completions"]
    assert lines and all(a["key_id"] == "front-team" for a in lines)
    assert lines[-1]["stream"] and lines[-1]["prompt_tokens"] > 0 and lines[-1]["completion_tokens"] > 0
    assert httpx.get(front.url + "/readyz").status_code == 200


# `python -m serving` standing in for `vllm serve`, minus the vLLM-only flags the gateway adds (prefix caching)
VLLM_STAND_IN = (
    "import runpy, sys; "
    # vLLM has no API keys of its own (the gateway holds them); our stand-in must be told to serve without
    "sys.argv = ['serving', '--allow-unauthenticated', "
    "*(a for a in sys.argv[1:] if not a.endswith('enable-prefix-caching'))]; "
    "runpy.run_module('serving', run_name='__main__')"
)


def test_engine_vllm_spawns_and_stops_the_engine_process(
    start_server: ServerFactory, debug_model_dir: Path, keys_file: Path
) -> None:
    """`--engine vllm` as in the GPU image, with the built-in server standing in for `vllm serve <model>` (the
    command gets the model directory, --host, --port and --served-model-name, exactly as vLLM does)."""
    engine_port = free_port()
    gateway = start_server(
        "--model", str(debug_model_dir), "--engine", "vllm", "--served-model-name", MODEL_ID,
        "--vllm-command", f"{sys.executable} -c {shlex.quote(VLLM_STAND_IN)} --model", "--vllm-port", str(engine_port),
        "--api-keys-file", str(keys_file),
    )  # fmt: skip
    r = oai(gateway.url, ALICE_KEY).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert r.model == MODEL_ID and r.usage is not None and r.usage.completion_tokens >= 1
    assert httpx.get(f"http://127.0.0.1:{engine_port}/readyz").status_code == 200  # the engine is a separate process
    assert gateway.stop() == 0
    with pytest.raises(httpx.TransportError):  # the gateway stopped its engine after draining
        httpx.get(f"http://127.0.0.1:{engine_port}/readyz", timeout=2)


def test_n_prompt_lists_echo_and_streamed_logprobs_pass_through(front: ServingProcess, server: ServingProcess) -> None:
    kw = {"model": MODEL_ID, "prompt": ["one", "two"], "n": 2, "max_tokens": 3, "temperature": 0, "echo": True,
          "logprobs": 1}  # fmt: skip
    via = oai(front.url, FRONT_KEY).completions.create(**kw)  # type: ignore[call-overload]
    direct = oai(server.url, ALICE_KEY).completions.create(**kw)  # type: ignore[call-overload]
    assert [c.text for c in via.choices] == [c.text for c in direct.choices] and len(via.choices) == 4
    assert via.usage == direct.usage
    chunks = list(oai(front.url, FRONT_KEY).chat.completions.create(
        stream=True, temperature=0, n=2, logprobs=True, **CHAT,  # type: ignore[call-overload]
    ))  # fmt: skip
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert any(c.choices[0].logprobs for c in chunks if c.choices)
