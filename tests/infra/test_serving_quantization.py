"""servingQuantization: validated per engine at preview time (same choices as the serving container's
--quantization), refused where the built-in engine's int8 would run on a GPU (the container refuses int8 on cuda), and
it reaches the EKS Deployment (vLLM args) and the SageMaker model (built-in engine env on a CPU instance)."""

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
    assert stack_config("dev", **CPU_SAGEMAKER, servingQuantization="int8").serving.quantization == "int8"
    assert stack_config("dev", servingEngine="vllm", servingQuantization="fp8").serving.quantization == "fp8"
    with pytest.raises(
        ConfigError, match=r"servingQuantization = .awq.: must be one of none, int8 with servingEngine builtin"
    ):
        stack_config("dev", servingQuantization="awq")
    with pytest.raises(ConfigError, match="servingQuantization"):
        stack_config("dev", servingEngine="vllm", servingQuantization="int8")


CPU_SAGEMAKER = {"servingOnEks": False, "servingOnSagemaker": True, "sagemakerInstanceType": "ml.m5.xlarge"}
"""Where the built-in engine runs on a CPU: a SageMaker endpoint on a CPU instance (EKS serving is on the GPU pool)."""


def test_builtin_int8_on_a_gpu_is_refused_at_preview() -> None:
    # The serving container refuses int8 on cuda (serving/config.py); the preview says so, naming where it runs.
    with pytest.raises(
        ConfigError,
        match=r"servingQuantization = .int8.: int8 with the builtin engine is CPU-only, but servingOnEks runs on a GPU",
    ):
        stack_config("dev", servingQuantization="int8")
    with pytest.raises(ConfigError, match=r"servingOnSagemaker \(ml.g5.xlarge\) runs on a GPU"):
        stack_config(
            "dev",
            servingOnEks=False,
            servingOnSagemaker=True,
            sagemakerInstanceType="ml.g5.xlarge",
            servingQuantization="int8",
        )


def _env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_builtin_engine_on_eks_gets_no_quantization_by_default() -> None:
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
    cfg = stack_config("dev", **CPU_SAGEMAKER, servingQuantization="int8")
    env = run_endpoint(cfg).one(MODEL).inputs["primaryContainer"]["environment"]
    default = run_endpoint(stack_config("dev", **CPU_SAGEMAKER)).one(MODEL).inputs["primaryContainer"]["environment"]
    # exactly one variable more than the default (engine, device, auth mode are issue 15's and 11's, tested there)
    assert env == {**default, "SERVING_QUANTIZATION": "int8"}
    assert "SERVING_QUANTIZATION" not in default  # unset by default: an unchanged stack keeps its model name
