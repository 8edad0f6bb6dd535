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
    if cfg.activation_checkpointing:
        # Non-reentrant checkpointing composes with FSDP2 and DDP (reentrant does not with FSDP2).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
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


def flops_per_token(model_config: Any, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the dense matmuls plus attention's 12 * layers * hidden * seq_len. N excludes
    the input embedding (a lookup; see num_embedding_params), as torchtitan's MFU does."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len
