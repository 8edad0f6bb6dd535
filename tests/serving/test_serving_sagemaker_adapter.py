"""The SageMaker adapter (`serving.sagemaker`) on its own: which body becomes which request, and the answer's shape."""

from __future__ import annotations

import pytest

from serving.errors import APIError
from serving.protocol import ChatCompletionRequest, CompletionRequest
from serving.sagemaker import InvocationsAdapter

ANSWER = {"choices": [{"index": 0, "text": " world"}]}


def test_tgi_body_becomes_a_completion_and_returns_generated_text() -> None:
    adapter = InvocationsAdapter("m")
    raw = {"inputs": "hello", "parameters": {"max_new_tokens": 3, "do_sample": False, "return_full_text": True}}
    body = adapter.parse(raw)
    assert isinstance(body, CompletionRequest)
    assert (body.model, body.prompt, body.max_tokens, body.temperature) == ("m", "hello", 3, 0.0)
    assert adapter.render(ANSWER, raw) == [{"generated_text": "hello world"}]
    plain = InvocationsAdapter("m")
    raw = {"inputs": "hello"}
    plain.parse(raw)
    assert plain.render(ANSWER, raw) == [{"generated_text": " world"}]


def test_openai_bodies_pass_through_with_the_default_model() -> None:
    adapter = InvocationsAdapter("m")
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert isinstance(adapter.parse(chat), ChatCompletionRequest) and adapter.parse(chat).model == "m"
    assert adapter.render(ANSWER, chat) is ANSWER


@pytest.mark.parametrize("raw", [[], "x", {"neither": 1}])
def test_other_bodies_are_400(raw: object) -> None:
    with pytest.raises(APIError) as err:
        InvocationsAdapter("m").parse(raw)
    assert err.value.status == 400
