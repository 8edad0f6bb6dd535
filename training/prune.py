"""Depth pruning: remove the decoder layers that change the hidden states least, and write a normal HF model.

    python -m training.prune --model DIR|s3://... --out DIR|s3://... --drop-layers 10 --calib data.jsonl
    python -m training.prune --model DIR --out DIR --keep-layers 20 --calib held-in.txt

Importance is ShortGPT's Block Influence (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect", eq. 1): BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)], the expected cosine similarity of layer
i's input and output hidden state of token t, measured on calibration data. A layer whose output points where its
input did adds little; the lowest-BI layers are removed. The calibration data goes through the trainer's own
pipeline (training/data.py: plain text or chat JSONL, a file, directory or s3:// prefix).

The result is an ordinary Hugging Face directory: the kept layers' weights re-indexed (`model.layers.0..k-1`),
each attention's `layer_idx` (its KV-cache slot) renumbered, `num_hidden_layers` (and per-layer lists such as
`layer_types`) updated, the tokenizer and generation config copied, and `llm-platform.json` recording what was
removed and why. Training (`--model`), serving (`python -m serving`), evaluation and int8 quantization load it
like any other model. Width pruning (MLP intermediate size, attention heads: Minitron) is not done.

Exit status: 0 written, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.config import ConfigError, ModelConfig
from training.data import DataError, build_sequences
from training.export import EXPORT_INFO, publish
from training.model import ModelError, decoder_layers, load_model_and_tokenizer, num_params
from training.storage import fetch

EXIT_BAD_INPUT = 2
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")
"""Config fields holding one entry per decoder layer (transformers' Qwen2/Gemma/SmolLM3 configs): pruned alike."""


@dataclass
class Ranking:
    scores: list[float]
    """Block Influence of each layer of the source model, by layer index."""
    tokens: int
    """Calibration tokens the scores average over."""

    def least_important(self, n: int) -> list[int]:
        """The `n` layers with the lowest influence, in layer order."""
        order = sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))
        return sorted(order[:n])


def calibration_inputs(windows: torch.Tensor, max_windows: int) -> torch.Tensor:
    """Input ids [n, seq_len] from packed windows (plain [n, seq_len + 1] or chat [n, 2, seq_len + 1])."""
    tokens = windows[:, 0] if windows.dim() == 3 else windows
    return tokens[:max_windows, :-1]


@torch.inference_mode()
def block_influence(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 4) -> Ranking:
    """Each decoder layer's Block Influence on `inputs` ([n, seq]); hooks read every layer's input and output."""
    layers = decoder_layers(model)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    handles = []

    def hook(i: int):
        def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            cos_sum[i] += cos.double().sum()

        return record

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        model.eval()
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size]
            model(input_ids=batch)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return Ranking(scores=(1.0 - cos_sum / max(count, 1)).tolist(), tokens=count)


def remove_layers(model: torch.nn.Module, drop: list[int]) -> list[int]:
    """Remove decoder layers `drop` in place; returns the kept layers' original indices. The kept layers keep
    their weights exactly; their attention's `layer_idx` is renumbered so the KV cache has no holes."""
    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, name, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return keep


def _layers_to_drop(total: int, drop: int | None, keep: int | None) -> int:
    n = drop if drop is not None else total - (keep or 0)
    flag = f"--drop-layers {drop}" if drop is not None else f"--keep-layers {keep}"
    if not 1 <= n <= total - 1:
        raise ConfigError(f"{flag}: the model has {total} decoder layers; at least one must go and one must stay")
    return n


def prune(
    model_path: str,
    out: str,
    calib: str,
    drop_layers: int | None = None,
    keep_layers: int | None = None,
    seq_len: int = 256,
    calib_windows: int = 32,
    text_field: str = "text",
    served_model_name: str = "",
    say: Any = print,
) -> dict[str, Any]:
    """Rank, prune and write the model; returns what `llm-platform.json` records under "pruning"."""
    with tempfile.TemporaryDirectory(prefix="prune-") as tmp:
        scratch = Path(tmp)
        data = fetch(calib, scratch / "data")
        if not data.exists():
            raise DataError(f"--calib {calib}: no such file or prefix")
        model, tokenizer = load_model_and_tokenizer(ModelConfig(path=model_path), scratch)
        total = len(decoder_layers(model))
        n_drop = _layers_to_drop(total, drop_layers, keep_layers)
        inputs = calibration_inputs(build_sequences(data, tokenizer, seq_len, text_field), calib_windows)
        ranking = block_influence(model, inputs)
        drop = ranking.least_important(n_drop)
        before = num_params(model)
        say(f"Block Influence of {total} layers over {ranking.tokens} calibration tokens (lowest removed):")
        for i, score in sorted(enumerate(ranking.scores), key=lambda x: x[1]):
            say(f"  layer {i:3d}  BI {score:.6f}  {'REMOVED' if i in drop else 'kept'}")
        keep = remove_layers(model, drop)
        after = num_params(model)
        say(f"parameters: {before:,} -> {after:,} ({after / before:.1%}); layers: {total} -> {len(keep)}")
        record = {
            "method": "block_influence",
            "source": model_path,
            "calibration": calib,
            "calibration_tokens": ranking.tokens,
            "removed_layers": drop,
            "kept_layers": keep,
            "block_influence": [round(s, 6) for s in ranking.scores],
            "params_before": before,
            "params_after": after,
        }
        name = served_model_name or f"{model_path.rstrip('/').rsplit('/', 1)[-1] or 'model'}-{len(keep)}l"
        staging = scratch / "out"
        _save(model, tokenizer, staging, {"served_model_name": name, "pruning": record})
        publish(staging, out)
    say(f"wrote {out} (served as {name!r})")
    return record


def _save(model: torch.nn.Module, tokenizer: Any, staging: Path, info: dict[str, Any]) -> None:
    # The loader keeps fp32 master weights and records the checkpoint's dtype in config.dtype: ship that dtype
    # (bf16 -> fp32 -> bf16 is exact), as the trainer's export does.
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        model.to(dtype)
    model.config.use_cache = True  # the loader turned it off for training; generation wants it
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.prune", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (local or s3://) or 'debug'")
    p.add_argument("--out", required=True, help="where the pruned model goes (local dir or s3:// prefix)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop-layers", type=int, help="remove this many decoder layers")
    how.add_argument("--keep-layers", type=int, help="keep this many decoder layers")
    p.add_argument("--calib", required=True, help="calibration data in the training format (file, dir or s3://)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-windows", type=int, default=32, help="windows scored at most (default 32)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--served-model-name", default="", help="id to serve it under (default <model>-<layers>l)")
    args = p.parse_args(argv)
    if args.seq_len < 8 or args.calib_windows < 1:
        print("error: --seq-len must be >= 8 and --calib-windows >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        prune(
            args.model,
            args.out,
            args.calib,
            drop_layers=args.drop_layers,
            keep_layers=args.keep_layers,
            seq_len=args.seq_len,
            calib_windows=args.calib_windows,
            text_field=args.text_field,
            served_model_name=args.served_model_name,
        )
    except (ConfigError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
