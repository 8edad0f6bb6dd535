"""Model and tokenizer: any AutoModelForCausalLM directory (local or S3), or the debug Llama built from config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.config import DEBUG_MODEL, ModelConfig
from training.storage import fetch, fetch_dir_atomic, is_s3


def model_cache_path(path: str, cache_dir: Path) -> Path:
    return fetch(path, cache_dir / "model", download=False)


def download_model(path: str, cache_dir: Path) -> Path:
    """Local rank 0 of each node: the model directory on local disk (S3 downloaded atomically, once per node)."""
    local = model_cache_path(path, cache_dir)
    return fetch_dir_atomic(path, local) if is_s3(path) else local


class ModelError(ValueError):
    """The model directory is missing or is not a Hugging Face causal LM."""


def load_model_and_tokenizer(cfg: ModelConfig, cache_dir: Path, download: bool = True) -> tuple[torch.nn.Module, Any]:
    """Returns (model in fp32 on CPU, tokenizer). With `download=False` the model must already be on local disk
    (`download_model` by local rank 0, then a barrier).

    Parameters stay fp32 (master weights); bf16 is applied by autocast / FSDP2's mixed-precision policy on GPU,
    so the optimizer state and checkpoints keep full precision.
    """
    if cfg.path == DEBUG_MODEL:
        from training.debug_model import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        local = download_model(cfg.path, cache_dir) if download else model_cache_path(cfg.path, cache_dir)
        if not (local / "config.json").is_file():
            raise ModelError(f"model path {cfg.path} is not a Hugging Face model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(local)
        source_dtype = AutoConfig.from_pretrained(local).dtype
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
        # Loading as fp32 rewrites config.dtype; restore the checkpoint's dtype so that the export ships the
        # precision the model came in (bf16 for real checkpoints), not the fp32 of the master weights.
        model.config.dtype = source_dtype or torch.float32
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer of {cfg.path} has no EOS token: packing needs one to separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    return model, tokenizer


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: the unit FSDP2 shards and activation checkpointing wraps."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no .model.layers: only decoder-only HF models are supported")
    return list(layers)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def num_embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the input embedding, unless it is tied to the LM head (then its matmul is real compute)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if get_in else None
    if embedding is None:
        return 0
    head = get_out() if get_out else None
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        return 0
    return sum(p.numel() for p in embedding.parameters())


def flops_per_token(model_config: Any, n_params: int, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token, as torchtitan counts them for MFU (torchtitan/models/utils.py
    `get_dense_model_nparams_and_flops` @ b5bcd76): 6N for the dense matmuls plus attention's
    6 * layers * heads * (qk + v head dims) * seq_len = 12 * layers * heads * head_dim * seq_len. Attention counts
    the query heads times head_dim, which is not hidden_size when head_dim is set apart (Qwen3, Gemma) and never
    the key/value heads (GQA shares K and V, the score and value matmuls still run per query head). N excludes the
    input embedding (a lookup; see num_embedding_params).

    `recompute=True` adds what full activation checkpointing really computes on top: each decoder layer's forward
    once more in backward (2 x layer params + the attention forward, 4 * layers * heads * head_dim * seq_len). MFU
    by convention leaves recompute out (it is not useful work); the hardware FLOPs utilisation (HFU) counts it."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    heads = getattr(model_config, "num_attention_heads", 0)
    head_dim = getattr(model_config, "head_dim", None) or getattr(model_config, "hidden_size", 0) // max(heads, 1)
    # forward: QK^T and AV, each seq_len * head_dim multiply-adds per query head (2 FLOPs each); backward twice that
    attention_fwd = 4.0 * layers * heads * head_dim * seq_len
    flops = 6.0 * n_params + 3.0 * attention_fwd
    if recompute:
        flops += 2.0 * layer_params(model_config) + attention_fwd
    return flops


def layer_params(model_config: Any) -> int:
    """Matmul parameters of all decoder layers (attention + MLP projections) of a Llama-style config: what activation
    checkpointing's recompute runs through again (the LM head and embedding are outside the checkpointed layers)."""
    hidden = getattr(model_config, "hidden_size", 0)
    heads = getattr(model_config, "num_attention_heads", 0)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // max(heads, 1)
    inter = getattr(model_config, "intermediate_size", 0)
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter
    return getattr(model_config, "num_hidden_layers", 0) * (attn + mlp)
