"""What the clients people already use send, accepted as vLLM accepts it (issue 26): leniency, clamping, samplers,
model retrieval and error codes, driven with the real `openai` client where it matters."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.conftest import ALICE_KEY, MODEL_ID, ServingProcess

HEADERS = {"Authorization": f"Bearer {ALICE_KEY}"}
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(server: ServingProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=60)


def post(server: ServingProcess, path: str, body: object) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=HEADERS, timeout=60)


def test_known_no_effect_fields_nulls_and_message_names_are_accepted(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID,
        messages=[
            {"role": "system", "content": "Be brief.", "name": "ops"}, {"role": "user", "content": "hi", "name": "bob"}
        ],
        max_tokens=4,
        temperature=None,
        top_p=None,
        n=None,
        stream=False,
        user="u-1",
        store=True,
        metadata={"team": "a"},
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
        presence_penalty=0.5,
        frequency_penalty=0.2,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )  # fmt: skip
    assert raw.http_response.status_code == 200
    assert "X-Ignored-Params" not in raw.http_response.headers  # all of these are known
    assert raw.parse().choices[0].finish_reason in ("stop", "length")


def test_stream_options_include_obfuscation_is_accepted(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=USER,  # type: ignore[arg-type]
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None


def test_model_is_optional_when_one_model_is_served(server: ServingProcess) -> None:
    r = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "model": None})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL_ID
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL_ID


def test_unknown_fields_are_ignored_and_named_in_a_header(server: ServingProcess) -> None:
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 2, "frobnicate": 1})
    assert r.status_code == 200, r.text
    assert r.headers["X-Ignored-Params"] == "frobnicate"
    # a field name is echoed only in header-safe characters (no header injection, no non-latin-1 crash)
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "x", "max_tokens": 1, "a\r\nSet-Cookie: x=1é": 0})
    assert r.status_code == 200 and r.headers["X-Ignored-Params"] == "a??Set-Cookie??x?1?"
    assert "set-cookie" not in r.headers
    # a known parameter that would change the answer is still refused, not ignored
    r = post(server, "/v1/completions", {"model": MODEL_ID, "prompt": "x", "ignore_eos": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_above_the_cap_is_clamped_and_reported(client: openai.OpenAI, stream: bool) -> None:
    # the shared server's --max-tokens-cap is 256
    raw = client.completions.with_raw_response.create(
        model=MODEL_ID, prompt="The platform serves models", max_tokens=4096, temperature=0, stream=stream
    )
    assert raw.http_response.status_code == 200
    asked, applied = raw.http_response.headers["X-Max-Tokens-Clamped"].split("->")
    assert (asked, applied) == ("4096", "256")
    if not stream:
        usage = raw.parse().usage
        assert usage is not None and usage.completion_tokens <= 256


def test_max_tokens_beyond_the_context_left_is_clamped_to_it(server: ServingProcess, debug_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    context = AutoConfig.from_pretrained(debug_model_dir).max_position_embeddings
    prompt_ids = AutoTokenizer.from_pretrained(debug_model_dir).encode(" a" * (context - 50))
    prompt_tokens = len(prompt_ids)
    assert context - prompt_tokens < 256, "the prompt must leave less room than the cap"
    body = {"model": MODEL_ID, "prompt": " a" * (context - 50), "max_tokens": 256, "temperature": 0}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    # vllm/entrypoints/utils.py get_max_tokens: min(asked, context - prompt), refused only when the prompt fills it
    assert r.headers["X-Max-Tokens-Clamped"] == f"256->{context - r.json()['usage']['prompt_tokens']}"


def test_max_tokens_within_limits_is_not_reported(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=MODEL_ID, prompt="x", max_tokens=3)
    assert "X-Max-Tokens-Clamped" not in raw.http_response.headers


def test_greedy_with_repetition_penalty_equals_transformers_generate(
    client: openai.OpenAI, debug_model_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    prompt = "Models are served and served again"
    ids = tokenizer.encode(prompt)
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    r = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0, extra_body={"repetition_penalty": 1.8}
    )
    assert r.choices[0].text == expected
    assert plain.choices[0].text != expected  # the penalty changed the answer: the test can fail


def test_seeded_sampling_with_the_new_samplers_is_reproducible(client: openai.OpenAI) -> None:
    def run() -> str:
        extra = {"top_k": 8, "min_p": 0.02, "repetition_penalty": 1.2}
        kw = {"frequency_penalty": 0.5, "presence_penalty": 0.3, "seed": 11, "temperature": 1.0}
        r = client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=10, extra_body=extra, **kw)  # type: ignore[call-overload]
        return r.choices[0].text

    assert run() == run()


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"top_k": -2}, "top_k", "invalid_value"),
        ({"min_p": 1.5}, "min_p", "invalid_value"),
        ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"frequency_penalty": "x"}, "frequency_penalty", "invalid_type"),
        ({"prompt": 5}, "prompt", "invalid_type"),  # never the union's branch (`prompt.str`)
        ({"prompt": None}, "prompt", "missing_required_parameter"),
        ({"logprobs": 21}, "logprobs", "invalid_value"),
    ],
)
def test_validation_errors_name_the_parameter_and_carry_a_code(
    client: openai.OpenAI, extra: dict, param: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=2, extra_body=extra)
    body = err.value.body
    assert isinstance(body, dict)
    assert (body["param"], body["code"]) == (param, code), body


def test_retrieve_model(client: openai.OpenAI) -> None:
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-17")
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found" and body["type"] == "not_found_error"


def test_invocations_chat_ids_are_chat_completion_ids(server: ServingProcess) -> None:
    r = post(server, "/invocations", {"messages": USER, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["id"].startswith("chatcmpl-")
    r = post(server, "/invocations", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["id"].startswith("cmpl-")


def test_hugging_face_sagemaker_payload_with_top_k_and_repetition_penalty(server: ServingProcess) -> None:
    # the Hugging Face LLM container's documented example parameters
    parameters = {
        "do_sample": True, "top_p": 0.9, "temperature": 0.8, "top_k": 50, "max_new_tokens": 8,
        "repetition_penalty": 1.03, "stop": ["</s>"], "seed": 3,
    }  # fmt: skip
    r = post(server, "/invocations", {"inputs": "What is a GPU?", "parameters": parameters})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()[0]["generated_text"], str)
    r = post(server, "/invocations", {"inputs": "x", "parameters": {"top_k": -7}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parameters.top_k"


def test_logprobs_equal_the_models_own_log_softmax(client: openai.OpenAI, debug_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(debug_model_dir)
    model = AutoModelForCausalLM.from_pretrained(debug_model_dir).eval()
    prompt = "Models are served"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    ids = tokenizer.encode(prompt)
    out = model.generate(torch.tensor([ids]), max_new_tokens=len(lp.tokens), do_sample=False, pad_token_id=0)
    generated = out[0, len(ids) :].tolist()
    with torch.no_grad():
        expected = torch.log_softmax(model(out[:, :-1]).logits[0, len(ids) - 1 :].float(), dim=-1)
    for i, token in enumerate(generated):
        assert lp.tokens[i] == tokenizer.decode([token])
        assert abs(lp.token_logprobs[i] - float(expected[i, token])) < 1e-4
        top = expected[i].topk(3)
        want = {tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)}
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(abs(lp.top_logprobs[i][k] - want[k]) < 1e-4 for k in want)
    # chat: the same numbers in chat's shape, with sampling (raw logprobs do not depend on the temperature)
    c = client.chat.completions.create(
        model=MODEL_ID,
        messages=USER,
        max_tokens=3,
        temperature=1.5,
        seed=1,
        logprobs=True,
        top_logprobs=2,  # type: ignore[arg-type]
    )
    content = c.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= t.top_logprobs[0].logprob + 1e-6 for t in content)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2, top_logprobs=2)  # type: ignore[arg-type]
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "top_logprobs"
