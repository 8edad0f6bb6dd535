"""A ChatML chat template that renders tools in the Hermes / Qwen 2.5 format (`<tools>` in the system turn, calls as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, results as `<tool_response>`): the format SmolLM2's tool
prompts and Qwen 2.5's template use. The debug model and SmolLM2-135M-Instruct ship templates without tools, so the
tool tests serve copies of them with this one (`with_tool_template`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERMES_TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}You may call these functions:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
To call one, answer <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for tc in message.tool_calls %}<tool_call>
{"name": {{ tc.function.name | tojson }}, "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def with_tool_template(model_dir: Path, out: Path) -> Path:
    """A copy of `model_dir` (weights linked, not copied) whose chat template renders tools."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name in ("chat_template.jinja", "tokenizer_config.json"):
            continue
        (out / f.name).symlink_to(f.resolve())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").write_text(HERMES_TOOLS_TEMPLATE)
    shutil.copystat(model_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    return out
