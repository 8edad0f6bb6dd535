"""What the deployed program and the serving image agree on about the serving engines."""

from __future__ import annotations

ENGINES = ("builtin", "vllm")

# --quantization choices (serving/quantize.py explains them). vLLM 0.33 `--quantization` values that fit a served
# checkpoint (vllm/model_executor/layers/quantization/__init__.py QUANTIZATION_METHODS; the rest are model-specific).
QUANTIZATIONS = {
    "builtin": ("none", "int8"),
    "vllm": ("none", "fp8", "awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors", "bitsandbytes"),
}
"""servingQuantization / `--quantization` choices per engine: a bad value fails at preview, not as a crash loop."""

ENV_PREFIX = "SERVING_"


def env_name(setting: str) -> str:
    """The environment variable of a serving setting (a `serving.config.ServingConfig` field): `SERVING_<NAME>`.

    serving.config reads its variables through this, and infra writes them through it, so the name exists once; a
    test parses what every stack renders with serving.config's own loader (tests/infra/test_serving_contract.py)."""
    return ENV_PREFIX + setting.upper()


def flag(setting: str) -> str:
    """The command-line flag of a serving setting: `--<name-with-dashes>`."""
    return "--" + setting.replace("_", "-")
