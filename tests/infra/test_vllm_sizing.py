"""vLLM sizing: the arithmetic behind --max-model-len / --gpu-memory-utilization / --tensor-parallel-size, and the
preview-time config error for a model/instance pair that cannot fit."""

from __future__ import annotations

import pytest

from facts.instance_types import gpu_memory_gib
from infra.config import ConfigError
from infra.config import load_stack as stack_config
from infra.vllm_sizing import (
    GIB,
    MODEL_SHAPES,
    SizingError,
    shape_name,
    size_vllm,
    sizing_for,
)

LLAMA_8B = MODEL_SHAPES["llama-3.1-8b"]


def test_llama_8b_full_context_needs_16_gib_of_kv_cache() -> None:
    """The failure the sizing prevents: vLLM's default context is max_position_embeddings."""
    assert LLAMA_8B.kv_bytes_per_token(1) == 128 * 1024  # 2 (K,V) x 32 layers x 8 KV heads x 128 x 2 bytes
    assert LLAMA_8B.kv_bytes_per_token(1) * LLAMA_8B.max_position_embeddings == 16 * GIB
    assert LLAMA_8B.weight_bytes / GIB == pytest.approx(14.96, abs=0.01)
    # an A10G reports 22.5 GiB, not 24
    assert gpu_memory_gib("ml.g5.2xlarge") == pytest.approx(22.49, abs=0.01)


def test_llama_8b_on_one_a10g_gets_a_context_that_fits() -> None:
    s = sizing_for("llama-3.1-8b-instruct", "", "ml.g5.2xlarge", 1)
    assert s.tensor_parallel_size == 1 and s.gpu_memory_utilization == 0.90
    # the KV cache holds two full-length sequences, in whole 1024-token steps
    kv_tokens = s.kv_cache_gib * GIB / LLAMA_8B.kv_bytes_per_token(1)
    assert 2 * s.max_model_len <= kv_tokens < 2 * (s.max_model_len + 1024)
    assert s.max_model_len == 13312 < LLAMA_8B.max_position_embeddings
    assert s.args() == ["--tensor-parallel-size", "1", "--max-model-len", "13312", "--gpu-memory-utilization", "0.90"]


def test_tensor_parallel_splits_weights_and_kv_heads() -> None:
    one = size_vllm(LLAMA_8B, "g5.12xlarge", 1)
    four = size_vllm(LLAMA_8B, "g5.12xlarge", 4)
    assert four.kv_cache_gib > one.kv_cache_gib
    assert LLAMA_8B.kv_bytes_per_token(4) * 4 == LLAMA_8B.kv_bytes_per_token(1)
    assert four.max_model_len == LLAMA_8B.max_position_embeddings  # capped at the model's own context
    # more GPUs than KV heads: vLLM replicates the heads, so a GPU still holds one
    assert MODEL_SHAPES["llama-3.1-70b"].kv_bytes_per_token(16) == MODEL_SHAPES["llama-3.1-70b"].kv_bytes_per_token(8)


@pytest.mark.parametrize(
    ("shape", "instance_type", "gpus", "why"),
    [
        ("llama-3.1-8b", "ml.g4dn.xlarge", 1, "weights do not fit"),  # 15 GiB of weights on a 15 GiB T4
        ("llama-3.1-70b", "g5.12xlarge", 4, "weights do not fit"),
        ("llama-3.1-8b", "g6.xlarge", 3, "divisible by 3"),
        ("llama-3.2-3b", "ml.m5.large", 1, "no GPU"),
    ],
)
def test_pairs_that_cannot_fit_say_why(shape: str, instance_type: str, gpus: int, why: str) -> None:
    with pytest.raises(SizingError, match=why):
        size_vllm(MODEL_SHAPES[shape], instance_type, gpus)


def test_shape_from_the_model_prefix_or_the_key() -> None:
    assert shape_name("models/llama-3.1-8b-instruct") == "llama-3.1-8b"
    assert shape_name("llama-3.1-8b") == "llama-3.1-8b"
    assert shape_name("debug-llama") == "debug-llama"
    assert shape_name("my-finetune", "llama-3.2-1b") == "llama-3.2-1b"


def test_shipped_stacks_fit() -> None:
    for stack in ("dev", "staging", "prod"):
        stack_config(stack)  # raises ConfigError when a pair cannot fit


def test_prod_model_on_a_t4_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as exc:
        stack_config("prod", sagemakerInstanceType="ml.g4dn.xlarge")
    msg = str(exc.value)
    assert "llm-platform:sagemakerInstanceType = 'ml.g4dn.xlarge'" in msg
    assert "cannot serve llama-3.1-8b with vLLM" in msg and "weights do not fit" in msg


def test_eks_tensor_parallel_is_the_replicas_gpus() -> None:
    """70B fits on eight L40S (tensor parallel 8), not on four L4s: the error names the pool's key."""
    common = {"servingModelPrefix": "llama-3.1-70b", "servingOnSagemaker": False, "inferenceMinSize": 0,
              "inferenceMaxSize": 1}  # fmt: skip
    stack_config("prod", inferenceInstanceTypes=["g6e.48xlarge"], servingGpusPerReplica=8, **common)
    with pytest.raises(ConfigError, match=r"inferenceInstanceTypes = .*g6.12xlarge.*: cannot serve llama-3.1-70b"):
        stack_config("prod", inferenceInstanceTypes=["g6.12xlarge"], servingGpusPerReplica=4, **common)


def test_unknown_model_needs_a_shape_with_vllm_only() -> None:
    with pytest.raises(ConfigError, match=r"servingModelPrefix = 'my-finetune'.*set llm-platform:servingModelShape"):
        stack_config("prod", servingModelPrefix="my-finetune")
    assert stack_config("prod", servingModelPrefix="my-finetune", servingModelShape="llama-3.1-8b")
    assert stack_config("dev", servingModelPrefix="my-finetune")  # built-in engine: nothing to size
    with pytest.raises(ConfigError, match="servingModelShape = 'llama-9'"):
        stack_config("dev", servingModelShape="llama-9")


def test_overhead_grows_with_the_sequences_vllm_runs_on_large_gpus() -> None:
    """vLLM runs 1024 sequences by default on GPUs of 70 GiB and more (not A100s), 256 elsewhere; the sampler holds
    vocab-wide buffers per sequence, so the overhead is derived per instance from max_num_seqs x vocab."""
    from infra.vllm_sizing import (
        RUNTIME_OVERHEAD_GIB,
        SAMPLER_BYTES_PER_LOGIT,
        default_max_num_seqs,
        runtime_overhead_gib,
    )

    assert [default_max_num_seqs(t) for t in ("g5.2xlarge", "g6e.2xlarge", "p4de.24xlarge", "p5.48xlarge",
                                              "ml.p5e.48xlarge")] == [256, 256, 256, 1024, 1024]  # fmt: skip
    assert runtime_overhead_gib(LLAMA_8B, "ml.g5.2xlarge") == RUNTIME_OVERHEAD_GIB  # calibrated at 256 sequences
    h100 = runtime_overhead_gib(LLAMA_8B, "p5.48xlarge")
    assert h100 == pytest.approx(RUNTIME_OVERHEAD_GIB + 768 * 128256 * SAMPLER_BYTES_PER_LOGIT / GIB)
    assert h100 == pytest.approx(4.38, abs=0.01)  # past the flat 2 GiB the review warned about
    small_vocab = runtime_overhead_gib(MODEL_SHAPES["smollm2-1.7b"], "p5.48xlarge")
    assert RUNTIME_OVERHEAD_GIB < small_vocab < h100  # 49,152 tokens: less than Llama 3's 128,256
    # the KV cache and the context on an H100 are what remains after it
    s = size_vllm(LLAMA_8B, "p5.48xlarge", 1)
    budget = 0.90 * gpu_memory_gib("p5.48xlarge")
    assert s.kv_cache_gib == pytest.approx(budget - LLAMA_8B.weight_bytes / GIB - h100, abs=0.01)
