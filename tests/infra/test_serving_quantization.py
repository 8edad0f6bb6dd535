"""servingQuantization: validated per engine at preview time (same choices as the serving container's
--quantization), and it reaches the EKS Deployment (built-in engine env / vLLM args) and the SageMaker model."""

from __future__ import annotations

import pytest

from facts.serving import QUANTIZATIONS as SERVING_QUANTIZATIONS
from infra.config import ConfigError
from infra.config import load_stack as stack_config
from serving.config import check_quantization
from tests.infra.test_sagemaker_endpoint import MODEL, run_endpoint
from tests.infra.test_serving_eks import container, run_serving


def test_the_serving_container_accepts_what_the_preview_accepts() -> None:
    # One table (facts.serving) feeds both; this checks each side reads it for the right engine.
    for engine, choices in SERVING_QUANTIZATIONS.items():
        for method in choices:
            check_quantization(method, engine)
        other = next(m for e, c in SERVING_QUANTIZATIONS.items() if e != engine for m in c if m not in choices)
        with pytest.raises(ValueError, match=engine):
            check_quantization(other, engine)


def test_default_is_none_and_bad_values_name_the_key() -> None:
    assert stack_config("dev").serving.quantization == "none"
    assert stack_config("dev", servingQuantization="int8").serving.quantization == "int8"
    assert stack_config("dev", servingEngine="vllm", servingQuantization="fp8").serving.quantization == "fp8"
    with pytest.raises(
        ConfigError, match=r"servingQuantization = .awq.: must be one of none, int8 with servingEngine builtin"
    ):
        stack_config("dev", servingQuantization="awq")
    with pytest.raises(ConfigError, match="servingQuantization"):
        stack_config("dev", servingEngine="vllm", servingQuantization="int8")


def _env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_builtin_engine_gets_the_env_var() -> None:
    run, _ = run_serving(stack_config("dev", servingQuantization="int8"))
    assert _env(container(run, "server"))["SERVING_QUANTIZATION"] == "int8"
    run, _ = run_serving(stack_config("dev"))
    assert "SERVING_QUANTIZATION" not in _env(container(run, "server"))


def test_vllm_gets_quantization_and_prefix_caching_args() -> None:
    run, _ = run_serving(stack_config("dev", servingEngine="vllm", servingQuantization="awq"))
    args = container(run, "vllm")["args"]
    assert args[args.index("--quantization") + 1] == "awq"
    assert "--enable-prefix-caching" in args
    assert "SERVING_QUANTIZATION" not in _env(container(run, "server"))  # the gateway loads no model
    run, _ = run_serving(stack_config("dev", servingEngine="vllm"))
    assert "--quantization" not in container(run, "vllm")["args"]


def test_sagemaker_model_gets_the_env_var() -> None:
    cfg = stack_config("dev", servingQuantization="int8")
    env = run_endpoint(cfg).one(MODEL).inputs["primaryContainer"]["environment"]
    default = run_endpoint(stack_config("dev")).one(MODEL).inputs["primaryContainer"]["environment"]
    # exactly one variable more than the default (engine, device, auth mode are issue 15's and 11's, tested there)
    assert env == {**default, "SERVING_QUANTIZATION": "int8"}
    assert "SERVING_QUANTIZATION" not in default  # unset by default: an unchanged stack keeps its model name
