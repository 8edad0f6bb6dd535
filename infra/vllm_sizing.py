"""vLLM engine arguments sized for the model and the GPUs it runs on, checked when the stack config loads.

vLLM reserves its KV cache up front: `--gpu-memory-utilization` x the GPU's memory, minus the weights and its
profiled activation peak, must hold at least one sequence of `--max-model-len` tokens, or the engine refuses to
start. Left unset, `--max-model-len` is the model's `max_position_embeddings` (131,072 for Llama 3.1: 16 GiB of KV
cache for Llama-3.1-8B), which no 24 GB GPU has after 15 GiB of weights. So the platform sets all three flags from
the model's shape and the instance's GPUs, and a pair that cannot fit fails at preview with the arithmetic, instead
of as a crash-looping pod or a SageMaker endpoint stuck in Creating for the startup health-check timeout.

The model's shape comes from a table of known architectures (`MODEL_SHAPES`), chosen by `servingModelShape` or by
the model prefix's name; the real config.json lives in S3 and is not read at preview.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facts.instance_types import gpu_memory_gib, instance_gpu

GIB = 1024**3

GPU_MEMORY_UTILIZATION = 0.90
"""vLLM's own default, set explicitly: the 10% it leaves is for allocations outside vLLM's accounting (NCCL
buffers, the CUDA context of other processes, fragmentation)."""
RUNTIME_OVERHEAD_GIB = 2.0
"""Per GPU, inside vLLM's budget but not weights or KV cache, at vLLM's default of 256 sequences: the profiled
activation peak of a `max_num_batched_tokens` prefill, CUDA graphs and the sampler's buffers. A deliberate
over-estimate (measured peaks for 1-8B models are ~1-1.5 GiB): vLLM measures the real figure at start-up and hands
the rest to the KV cache, so over-estimating costs context length only, while under-estimating would let a pair pass
preview and fail to start. Where vLLM runs more sequences (large GPUs), `runtime_overhead_gib` adds the sampler's
buffers for the extra ones."""
SAMPLER_BYTES_PER_LOGIT = 26
"""The sampler's memory per (sequence, vocabulary entry) in one step: the logits in the model's dtype (2), their fp32
copy (4), the probabilities (4), the top-p/top-k sort's values and int64 indices (12) and the cumulative sum (4). An
upper bound: not all are alive at once. 1,024 - 256 extra sequences x 128,256 (Llama 3) x 26 bytes = 2.4 GiB more
on an H100: what the flat 2 GiB misses there."""
VLLM_LARGE_GPU_GIB = 70
VLLM_MAX_NUM_SEQS = (256, 1024)
"""vLLM's default `--max-num-seqs` for its OpenAI server: 1024 on a GPU of at least 70 GiB whose name is not an
A100, else 256 (vllm/engine/arg_utils.py `EngineArgs.get_batch_defaults`, vllm-project/vllm main as stored: check
it again when the serving-vllm image's v0.33.0 pin moves). The platform leaves the flag at vLLM's default, so the
sizing assumes the value vLLM will pick."""
MIN_FULL_CONTEXTS = 2
"""The KV cache must hold this many sequences of `--max-model-len` tokens. vLLM itself needs one; two leave room for
the estimate above being low and keep a single long request from serializing all others."""
MIN_MODEL_LEN = 2048
"""Below this the endpoint is not useful for chat (system prompt + history + a 1024-token answer)."""
LEN_GRANULARITY = 1024


class SizingError(ValueError):
    """The model cannot be served by vLLM on the given GPUs; the message says why, with the numbers."""


@dataclass(frozen=True)
class ModelShape:
    """What vLLM's memory use depends on (from the model's config.json)."""

    params: float
    """Parameter count (embeddings included: they are weights in GPU memory too)."""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int
    vocab: int
    """vocab_size: the width of the logits the sampler holds per sequence."""
    dtype_bytes: int = 2
    """bf16/fp16 checkpoints; the training export ships bf16."""

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    def kv_bytes_per_token(self, tensor_parallel: int) -> int:
        """K and V for every layer; with tensor parallelism each GPU holds its share of the KV heads (vLLM
        replicates them when there are fewer KV heads than GPUs)."""
        heads_per_gpu = max(1, -(-self.kv_heads // tensor_parallel))
        return 2 * self.layers * heads_per_gpu * self.head_dim * self.dtype_bytes


MODEL_SHAPES: dict[str, ModelShape] = {
    # config.json of each model on the Hugging Face Hub (meta-llama/*, HuggingFaceTB/SmolLM2-*).
    "llama-3.1-8b": ModelShape(8.03e9, 32, 32, 8, 128, 131072, 128256),
    "llama-3.1-70b": ModelShape(70.6e9, 80, 64, 8, 128, 131072, 128256),
    "llama-3.2-1b": ModelShape(1.24e9, 16, 32, 8, 64, 131072, 128256),
    "llama-3.2-3b": ModelShape(3.21e9, 28, 24, 8, 128, 131072, 128256),
    "smollm2-135m": ModelShape(1.35e8, 30, 9, 3, 64, 8192, 49152),
    "smollm2-360m": ModelShape(3.62e8, 32, 15, 5, 64, 8192, 49152),
    "smollm2-1.7b": ModelShape(1.71e9, 24, 32, 32, 64, 8192, 49152),
    # training/debug_model.py: ~1M parameters, 512 positions, at most 1024 tokens (fp32 export).
    "debug-llama": ModelShape(1.3e6, 4, 4, 2, 32, 512, 1024, dtype_bytes=4),
}


def shape_name(model_prefix: str, configured: str = "") -> str:
    """`servingModelShape` if set, else the prefix's last component without an `-instruct` suffix:
    `models/llama-3.1-8b-instruct` -> `llama-3.1-8b`."""
    if configured:
        return configured
    name = model_prefix.strip("/").rsplit("/", 1)[-1].lower()
    return name if name in MODEL_SHAPES else name.removesuffix("-instruct")


@dataclass(frozen=True)
class VllmSizing:
    tensor_parallel_size: int
    max_model_len: int
    gpu_memory_utilization: float
    kv_cache_gib: float
    """Estimated KV cache per GPU (vLLM measures the real figure at start-up; usually a little more)."""

    def args(self) -> list[str]:
        return [
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--max-model-len",
            str(self.max_model_len),
            "--gpu-memory-utilization",
            f"{self.gpu_memory_utilization:.2f}",
        ]


def default_max_num_seqs(instance_type: str) -> int:
    """The `--max-num-seqs` vLLM picks by itself on this instance's GPU (VLLM_MAX_NUM_SEQS)."""
    t = instance_gpu(instance_type)
    large = t is not None and gpu_memory_gib(instance_type) >= VLLM_LARGE_GPU_GIB and t.gpu != "A100"
    return VLLM_MAX_NUM_SEQS[1] if large else VLLM_MAX_NUM_SEQS[0]


def runtime_overhead_gib(shape: ModelShape, instance_type: str) -> float:
    """Per GPU: RUNTIME_OVERHEAD_GIB (calibrated at 256 sequences) plus the sampler's vocab-wide buffers for every
    sequence vLLM runs beyond 256 on this instance (SAMPLER_BYTES_PER_LOGIT). Not divided by tensor parallelism:
    the logits are gathered whole before sampling."""
    extra = default_max_num_seqs(instance_type) - VLLM_MAX_NUM_SEQS[0]
    return RUNTIME_OVERHEAD_GIB + extra * shape.vocab * SAMPLER_BYTES_PER_LOGIT / GIB


def size_vllm(shape: ModelShape, instance_type: str, gpus: int, where: str = "") -> VllmSizing:
    """Size vLLM for `shape` on `gpus` GPUs of `instance_type` (tensor parallel over all of them)."""
    where = where or f"{gpus} GPU(s) of {instance_type}"
    if instance_gpu(instance_type) is None:
        raise SizingError(f"{instance_type} has no GPU this platform knows: vLLM needs a GPU instance type")
    if shape.heads % gpus:
        raise SizingError(
            f"tensor parallelism over {gpus} GPUs needs the attention heads ({shape.heads}) divisible by {gpus}"
        )
    per_gpu = gpu_memory_gib(instance_type)
    budget = per_gpu * GPU_MEMORY_UTILIZATION
    weights = shape.weight_bytes / gpus / GIB
    overhead = runtime_overhead_gib(shape, instance_type)
    kv_gib = budget - weights - overhead
    arithmetic = (
        f"{GPU_MEMORY_UTILIZATION:.2f} x {per_gpu:.1f} GiB per GPU = {budget:.1f} GiB, minus {weights:.1f} GiB of "
        f"weights and {overhead:.1f} GiB runtime overhead ({default_max_num_seqs(instance_type)} sequences x "
        f"{shape.vocab} vocabulary in the sampler)"
    )
    if kv_gib <= 0:
        raise SizingError(
            f"the weights do not fit on {where}: {arithmetic} leaves no KV cache; use more or larger GPUs"
        )
    kv_tokens = int(kv_gib * GIB // shape.kv_bytes_per_token(gpus))
    fit = kv_tokens // MIN_FULL_CONTEXTS // LEN_GRANULARITY * LEN_GRANULARITY
    max_model_len = min(shape.max_position_embeddings, fit)
    if max_model_len < min(MIN_MODEL_LEN, shape.max_position_embeddings):
        raise SizingError(
            f"too little KV cache on {where}: {arithmetic} leaves {kv_gib:.1f} GiB = {kv_tokens} tokens, less than "
            f"{MIN_FULL_CONTEXTS} sequences of {MIN_MODEL_LEN}; use more or larger GPUs"
        )
    return VllmSizing(gpus, max_model_len, GPU_MEMORY_UTILIZATION, round(kv_gib, 2))


def serving_targets(v: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(config key to blame, instance type, GPUs per replica) for every place the stack runs the engine.
    EKS sizes for the pool's smallest GPU, so a replica fits whichever type the autoscaler picks."""
    targets = []
    if v["servingOnEks"]:
        types = [t for t in v["inferenceInstanceTypes"] if instance_gpu(t) is not None]
        if types:
            smallest = min(types, key=gpu_memory_gib)
            targets.append(("inferenceInstanceTypes", smallest, v["servingGpusPerReplica"]))
    if v["servingOnSagemaker"]:
        t = instance_gpu(v["sagemakerInstanceType"])
        # SageMaker gives the container every GPU of the instance: use them all.
        targets.append(("sagemakerInstanceType", v["sagemakerInstanceType"], t.gpus if t else 0))
    return targets


def check_serving_fit(v: dict[str, Any], project: str) -> list[str]:
    """Config problems (one line each, naming the key) when vLLM cannot serve the model where the stack runs it."""
    if v["servingEngine"] != "vllm":
        return []
    name = shape_name(v["servingModelPrefix"], v.get("servingModelShape", ""))
    shape = MODEL_SHAPES.get(name)
    if shape is None:
        key = "servingModelShape" if v.get("servingModelShape") else "servingModelPrefix"
        return [
            f"{project}:{key} = {v[key]!r}: vLLM is sized from the model's shape and {name!r} is not a known one; "
            f"set {project}:servingModelShape to the architecture it shares: {', '.join(MODEL_SHAPES)}"
        ]
    problems = []
    for key, instance_type, gpus in serving_targets(v):
        try:
            size_vllm(shape, instance_type, gpus)
        except SizingError as exc:
            problems.append(f"{project}:{key} = {v[key]!r}: cannot serve {name} with vLLM: {exc}")
    return problems


def sizing_for(model_prefix: str, model_shape: str, instance_type: str, gpus: int) -> VllmSizing:
    """The sizing the infra components pass to vLLM (config loading has already proven it exists)."""
    return size_vllm(MODEL_SHAPES[shape_name(model_prefix, model_shape)], instance_type, gpus)
