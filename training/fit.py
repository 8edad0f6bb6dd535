"""Which GPUs a training preset fits: a stated memory model, checked by the launcher before anything paid starts.

Memory per GPU, for a model of P parameters trained on W GPUs (all nodes' GPUs together):

    model state    16 * P / W bytes     fp32 weights (4) + fp32 gradients (4) + two fp32 Adam moments (8) per
                                        parameter, sharded over every GPU by FSDP2 (`parallel.strategy=fsdp`,
                                        ZeRO-3); with `ddp` every GPU holds all 16 * P.
    gathered layer 2 * 2 * L_p bytes    FSDP2 all-gathers one decoder layer's bf16 weights (L_p parameters) for the
                                        layer that computes and prefetches the next one.
    activations    T * H * A bytes      T tokens per micro-batch per GPU (micro_batch_size * seq_len), H the hidden
                                        size, A = ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN with activation
                                        checkpointing, ACTIVATION_BYTES_NO_AC without.
    reserve        RESERVE_GIB          CUDA context, NCCL buffers and the caching allocator's fragmentation.

The activation constant is calibrated on the one GPU measurement this project has (bench/RESULTS.md, "GPU benchmark
results (issue 15)": llama-3.2-1B shape on one H100, FSDP2 + bf16 + activation checkpointing, 4 x 4096 tokens:
25 GiB above parameters and optimizer state without the fp32 copy of the logits, which training/loss.py removed):
25 GiB / (16384 tokens * 2048 hidden) = 800 bytes. The reserve and the no-checkpointing factor are assumptions,
not measurements. The model is deliberately simple: it answers "can this preset fit at all", not "how fast"; rerun
`bench/gpu_train_mfu.py` on a GPU to replace the constant with a better measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from facts.instance_types import gpu_memory_gib, instance_gpu
from training.config import ModelInfo, TrainConfig

GIB = 2**30
STATE_BYTES_PER_PARAM = 16
ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 800
"""With activation checkpointing; calibrated on the llama-1b H100 measurement (see the module docstring)."""
ACTIVATION_BYTES_NO_AC = 8 * ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN
"""Without activation checkpointing every layer keeps its intermediates (assumption: 8x, not measured)."""
RESERVE_GIB = 3.0


@dataclass(frozen=True)
class ModelShape:
    """The shapes the estimate needs, from a Hugging Face config.json."""

    name: str
    params: int
    hidden: int
    layers: int

    @classmethod
    def from_hf_config(cls, name: str, config: dict) -> ModelShape:
        info = ModelInfo.from_hf_config(name, config)
        return cls(name, info.params, int(config["hidden_size"]), int(config["num_hidden_layers"]))


def _llama3(name: str, hidden: int, layers: int, heads: int, inter: int, tied: bool) -> ModelShape:
    cfg = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "intermediate_size": inter,
        "vocab_size": 128256,
        "tie_word_embeddings": tied,
    }
    return ModelShape.from_hf_config(name, cfg)


PRESET_SHAPES: dict[str, ModelShape] = {
    # The Llama models each preset is named after (their config.json on the Hugging Face Hub).
    "llama-1b": _llama3("Llama-3.2-1B", hidden=2048, layers=16, heads=32, inter=8192, tied=True),
    "llama-3b": _llama3("Llama-3.2-3B", hidden=3072, layers=28, heads=24, inter=8192, tied=True),
    "llama-8b": _llama3("Llama-3.1-8B", hidden=4096, layers=32, heads=32, inter=14336, tied=False),
}
"""Presets sized for a model class. `finetune` is sized to the model it is given and `debug` fits anything."""


@dataclass(frozen=True)
class Estimate:
    model_state_gib: float
    gathered_gib: float
    activations_gib: float
    reserve_gib: float
    gpu_gib: float
    gpus: int

    @property
    def total_gib(self) -> float:
        return self.model_state_gib + self.gathered_gib + self.activations_gib + self.reserve_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_gib

    def describe(self) -> str:
        return (
            f"{self.total_gib:.1f} GiB per GPU of {self.gpu_gib:.1f} GiB over {self.gpus} GPUs "
            f"(model state {self.model_state_gib:.1f} + gathered layers {self.gathered_gib:.1f} + activations "
            f"{self.activations_gib:.1f} + reserve {self.reserve_gib:.1f})"
        )


def estimate(shape: ModelShape, cfg: TrainConfig, gpus: int, gpu_gib: float) -> Estimate:
    """Peak memory per GPU of `cfg` training `shape` on `gpus` GPUs of `gpu_gib` each (the module's model)."""
    shards = gpus if cfg.parallel.strategy == "fsdp" else 1
    per_layer = shape.params / max(shape.layers, 1)  # embeddings spread over the layers: an overestimate
    tokens = cfg.parallel.micro_batch_size * cfg.data.seq_len
    per_token = ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN if cfg.model.activation_checkpointing else ACTIVATION_BYTES_NO_AC
    return Estimate(
        model_state_gib=STATE_BYTES_PER_PARAM * shape.params / shards / GIB,
        gathered_gib=2 * 2 * per_layer / GIB if shards > 1 else 0.0,
        activations_gib=tokens * shape.hidden * per_token / GIB,
        reserve_gib=RESERVE_GIB,
        gpu_gib=gpu_gib,
        gpus=gpus,
    )


def check_fit(cfg: TrainConfig, instance_type: str, nodes: int) -> Estimate | None:
    """The estimate for a preset on `nodes` nodes of `instance_type` (EC2 or `ml.` SageMaker type); None when the
    preset has no fixed model class (debug, finetune) or the type is not a GPU type the platform knows."""
    shape = PRESET_SHAPES.get(cfg.name)
    hw = instance_gpu(instance_type)
    if shape is None or hw is None:
        return None
    return estimate(shape, cfg, gpus=hw.gpus * nodes, gpu_gib=gpu_memory_gib(instance_type))


def fewest_nodes(cfg: TrainConfig, instance_type: str, limit: int = 64) -> int | None:
    """The fewest nodes of `instance_type` the preset fits on (None: not within `limit`, or nothing to check)."""
    for n in range(1, limit + 1):
        e = check_fit(cfg, instance_type, n)
        if e is None:
            return None
        if e.fits:
            return n
    return None
