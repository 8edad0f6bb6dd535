"""Export: the trained model as a Hugging Face directory (safetensors + config + tokenizer) for the serving container.

Sharded (FSDP2) parameters are gathered into one full state dict on rank 0 (offloaded to CPU as they arrive, so
GPU memory never holds the whole model), loaded into a fresh model built on the meta device, and saved with
`save_pretrained`. The result loads with `AutoModelForCausalLM.from_pretrained` and nothing from this package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from training.parallelize import Dist, unwrap
from training.storage import is_s3, open_storage

EXPORT_INFO = "llm-platform.json"
"""Written next to config.json: `served_model_name`, the id `python -m serving` serves the export under, and how
the model was made when that is more than plain training ("distillation": teacher, alpha, temperature; "pruning":
training/prune.py's record)."""


def export_model(
    model: torch.nn.Module,
    tokenizer: Any,
    destination: str,
    d: Dist,
    served_name: str = "",
    info: dict[str, Any] | None = None,
) -> None:
    """Collective: every rank must call it. Rank 0 writes `destination` (local dir or s3:// prefix). `info`: more
    fields for EXPORT_INFO (e.g. the distillation's teacher, alpha and temperature)."""
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        from transformers import AutoModelForCausalLM

        hf_config = unwrap(model).config
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(hf_config)
        fresh.load_state_dict(full_sd, assign=True, strict=True)
        # Training keeps fp32 master weights; ship the dtype the model came in (bf16 for real checkpoints).
        dtype = getattr(hf_config, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype != torch.float32:
            fresh.to(dtype)
        fresh.config.use_cache = True  # training turned it off; generation wants it
        if hasattr(fresh, "tie_weights"):
            fresh.tie_weights()
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            staging = Path(tmp) / "model"
            fresh.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            record = {"served_model_name": served_name} if served_name else {}
            record.update(info or {})
            if record:
                (staging / EXPORT_INFO).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            publish(staging, destination)
    d.barrier()


def publish(staging: Path, destination: str) -> None:
    """Copy the model directory `staging` to `destination` (local dir, replaced as a whole, or s3:// prefix)."""
    if is_s3(destination):
        open_storage(destination).upload_dir(staging, "")
        return
    dest = Path(destination)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Replace as a whole: a server watching `dest` never sees new weights with an old config or tokenizer.
    tmp_dest = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp_dest, ignore_errors=True)
    shutil.copytree(staging, tmp_dest)
    if dest.exists():
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp_dest.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dest.rename(dest)
