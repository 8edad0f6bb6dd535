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


def test_tgi_stream_events_from_openai_chunks() -> None:
    """TGI's stream shape (text-generation-inference router/src/lib.rs `StreamResponse`): one event per chunk with
    text, the last with the whole text and, with details, TGI's finish reason and counts; the usage chunk is not
    passed on."""
    import asyncio

    adapter = InvocationsAdapter("m")
    raw = {"inputs": "Q:", "parameters": {"details": True, "stop": ["\n"], "return_full_text": True}, "stream": True}
    body = adapter.parse(raw)
    assert body.stream and body.include_usage and body.logprobs == 0 and not adapter.sse_done

    def chunk(text: str, finish: str | None = None, lp: float = -1.0) -> dict:
        logprobs = {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [{}], "text_offset": [0]}
        return {"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    async def openai_chunks():  # type: ignore[no-untyped-def]
        yield chunk(" a")
        yield chunk(" b", lp=-2.0)
        yield {"choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}
        yield {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}

    async def collect() -> list[dict]:
        return [e async for e in adapter.render_stream(openai_chunks())]

    events = asyncio.run(collect())
    assert [e["token"]["text"] for e in events] == [" a", " b"] and [e["index"] for e in events] == [1, 2]
    assert events[0]["generated_text"] is None and events[0]["details"] is None
    assert events[1]["token"]["logprob"] == -2.0 and events[1]["generated_text"] == "Q: a b"
    assert events[1]["details"] == {"finish_reason": "stop_sequence", "generated_tokens": 3, "seed": None,
                                    "input_length": 2}  # fmt: skip


def test_tgi_details_without_streaming() -> None:
    adapter = InvocationsAdapter("m")
    raw = {"inputs": "x", "parameters": {"details": True, "seed": 4}}
    adapter.parse(raw)
    answer = {
        "choices": [{"index": 0, "text": "ab", "finish_reason": "length",
                     "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0]}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }  # fmt: skip
    [out] = adapter.render(answer, raw)
    assert out["generated_text"] == "ab"
    assert out["details"]["finish_reason"] == "length" and out["details"]["seed"] == 4
    assert [(t["text"], t["logprob"]) for t in out["details"]["tokens"]] == [("a", -1.0), ("b", -2.0)]
