"""Tools and structured outputs on a real model, where the answer text matters (issue 26): SmolLM2-135M-Instruct
behind `python -m serving`, driven with the real `openai` client.

SmolLM2-135M-Instruct's own chat template (from its GGUF) renders no tools, so a tools request to it is refused; the
tool test serves it with the Hermes-format tool template (tests/serving/tool_template.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pydantic
import pytest

from serving.tools import tool_format
from tests.serving.conftest import ALICE_KEY, ServerFactory, ServingProcess
from tests.serving.tool_template import with_tool_template

pytestmark = pytest.mark.real_model

MODEL = "smollm2-tools"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_stock_price",
        "description": "Get the price of a company's stock",
        "parameters": {
            "type": "object",
            "properties": {"ticker": {"type": "string", "maxLength": 8}},
            "required": ["ticker"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from ops.smollm2 import ensure

    return ensure()


@pytest.fixture(scope="module")
def client(
    start_server: ServerFactory, smollm2: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> openai.OpenAI:
    model = with_tool_template(smollm2, tmp_path_factory.mktemp("models") / MODEL)
    server: ServingProcess = start_server(
        "--model", str(model), "--served-model-name", MODEL, "--api-keys-file", str(keys_file),
    )  # fmt: skip
    return openai.OpenAI(base_url=server.url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=300)


def test_smollm2_own_template_has_no_tool_support(smollm2: Path) -> None:
    assert tool_format((smollm2 / "chat_template.jinja").read_text()) is None


def test_smollm2_chooses_the_right_tool_and_its_arguments(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather like in Paris right now?"}],
        tools=[TIME, WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert "paris" in arguments["city"].lower()


class Capital(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)


def test_smollm2_json_schema_answer_validates_and_answers(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer in JSON with the keys city and country."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        response_format=Capital,
        temperature=0,
        max_tokens=60,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), Capital.model_json_schema())
    assert choice.message.parsed is not None and "paris" in choice.message.parsed.city.lower()
