"""Depth pruning: remove the decoder layers that change the hidden states least, and write a normal HF model.

    python -m training.prune --model DIR|s3://... --out DIR|s3://... --drop-layers 10 --calib data.jsonl
    python -m training.prune --model DIR --out DIR --keep-layers 20 --calib held-in.txt
    python -m training.prune --model DIR --out DIR --mlp-keep-ratio 0.75 --calib data.jsonl     # width only
    python -m training.prune --model DIR --out DIR --keep-layers 20 --intermediate-size 1152 --calib data.jsonl

Importance is ShortGPT's Block Influence (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect", eq. 1): BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)], the expected cosine similarity of layer
i's input and output hidden state of token t, measured on calibration data. A layer whose output points where its
input did adds little; the lowest-BI layers are removed. The calibration data goes through the trainer's own
pipeline (training/data.py: plain text or chat JSONL, a file, directory or s3:// prefix).

The result is an ordinary Hugging Face directory: the kept layers' weights re-indexed (`model.layers.0..k-1`),
each attention's `layer_idx` (its KV-cache slot) renumbered, `num_hidden_layers` (and per-layer lists such as
`layer_types`) updated, the tokenizer and generation config copied, and `llm-platform.json` recording what was
removed and why. Training (`--model`), serving (`python -m serving`), evaluation and int8 quantization load it
like any other model.

Width pruning (`--mlp-keep-ratio R` or `--intermediate-size N`) follows Minitron (Muralidharan et al., 2024,
"Compact Language Models via Pruning and Knowledge Distillation", sec. 2.2, activation-based importance): each MLP
neuron j's importance is the mean |a_j| over the calibration tokens, where a = act(gate_proj(x)) * up_proj(x) is
the input of down_proj; every layer keeps its N most important neurons (the rows of gate_proj and up_proj and the
columns of down_proj, in their original order), and `intermediate_size` becomes N. With depth pruning too, layers
go first and the neurons are scored on the shallower model. Attention heads are not pruned: the config has one
`num_attention_heads` and one `num_key_value_heads` for all layers, so a GQA model can only lose the same number of
query heads from every KV group of every layer (SmolLM2-135M: 3 groups of 3, so one head per group = a third of
attention at once), and Minitron reports head pruning as the most damaging of its width axes.

Scoring runs on the GPU when there is one and the fp32 weights fit it (the pruning job, ops/launch_training.py
`--job prune`), else on CPU.

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

from training.config import DEBUG_MODEL, ConfigError, ModelConfig
from training.data import DataError, build_sequences
from training.export import EXPORT_INFO, publish
from training.model import ModelError, decoder_layers, load_model_and_tokenizer, num_params
from training.storage import fetch, is_s3, open_storage

EXIT_BAD_INPUT = 2
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")
"""Config fields holding one entry per decoder layer (transformers' Qwen2/Gemma/SmolLM3 configs): pruned alike."""
GATED_MLP = ("gate_proj", "up_proj", "down_proj")


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
            cos_sum[i] += cos.double().sum().cpu()

        return record

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        model.eval()
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size].to(device)
            model(input_ids=batch)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    # BI = 1 - mean cosine lies in [0, 2]; a layer that passes its input through unchanged gives a cosine a rounding
    # step above 1, which printed as "-0.000000" (a fresh-clone run caught it): clamp to the definition's range
    return Ranking(scores=(1.0 - cos_sum / max(count, 1)).clamp(min=0.0).tolist(), tokens=count)


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
    if drop is None and keep is None:
        return 0
    n = drop if drop is not None else total - (keep or 0)
    flag = f"--drop-layers {drop}" if drop is not None else f"--keep-layers {keep}"
    if not 1 <= n <= total - 1:
        raise ConfigError(f"{flag}: the model has {total} decoder layers; at least one must go and one must stay")
    return n


@dataclass(frozen=True)
class PruneOptions:
    """What to remove: layers (one of drop/keep), MLP neurons (one of ratio/size), or both."""

    drop_layers: int | None = None
    keep_layers: int | None = None
    intermediate_size: int | None = None
    mlp_keep_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.drop_layers is not None and self.keep_layers is not None:
            raise ConfigError("--drop-layers and --keep-layers: pass one of them, not both")
        if self.intermediate_size is not None and self.mlp_keep_ratio is not None:
            raise ConfigError("--intermediate-size and --mlp-keep-ratio: pass one of them, not both")
        if not (self.depth or self.width):
            raise ConfigError("nothing to prune: pass --drop-layers/--keep-layers, --intermediate-size/"
                              "--mlp-keep-ratio, or both")  # fmt: skip
        for flag, value in (("--drop-layers", self.drop_layers), ("--keep-layers", self.keep_layers)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be >= 1")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(f"--intermediate-size {self.intermediate_size}: must be >= 1")
        if self.mlp_keep_ratio is not None and not 0 < self.mlp_keep_ratio <= 1:
            raise ConfigError(f"--mlp-keep-ratio {self.mlp_keep_ratio:g}: must be in (0, 1]")

    @property
    def depth(self) -> bool:
        return self.drop_layers is not None or self.keep_layers is not None

    @property
    def width(self) -> bool:
        return self.intermediate_size is not None or self.mlp_keep_ratio is not None

    def check_against(self, config: dict[str, Any]) -> None:
        """Refuse what the model's config.json (num_hidden_layers, intermediate_size) makes impossible."""
        if self.depth:
            _layers_to_drop(int(config.get("num_hidden_layers", 0)), self.drop_layers, self.keep_layers)
        if self.width:
            self.neurons_to_keep(config.get("intermediate_size"))

    def neurons_to_keep(self, current: Any) -> int:
        if not isinstance(current, int) or current < 1:
            raise ConfigError(f"width pruning needs a single integer intermediate_size in the config, got {current!r}")
        if self.intermediate_size is not None:
            if self.intermediate_size > current:
                raise ConfigError(
                    f"--intermediate-size {self.intermediate_size}: the model's intermediate_size is {current}"
                )
            return self.intermediate_size
        return max(1, round(current * (self.mlp_keep_ratio or 1.0)))


def gated_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's gated MLP (gate_proj, up_proj, down_proj: Llama, Mistral, Qwen2, SmolLM)."""
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    for i, mlp in enumerate(mlps):
        if mlp is None or not all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in GATED_MLP):
            raise ModelError(f"layer {i} has no gated MLP ({', '.join(GATED_MLP)}): width pruning cannot rewrite it")
    return mlps  # type: ignore[return-value]


@torch.inference_mode()
def mlp_importance(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Per layer, each MLP neuron's mean |activation| over the tokens of `inputs` (Minitron's neuron importance):
    the activation is down_proj's input, act(gate_proj(x)) * up_proj(x)."""
    mlps = gated_mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]
    count = 0

    def hook(i: int):
        def record(module: torch.nn.Module, args: tuple) -> None:
            a = args[0].detach().float().abs()
            sums[i] += a.reshape(-1, a.shape[-1]).sum(dim=0).double().cpu()

        return record

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    device = next(model.parameters()).device
    try:
        model.eval()
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start : start + batch_size].to(device)
            model(input_ids=batch)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def _sliced(linear: torch.nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.nn.Linear:
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new


def prune_mlp_neurons(model: torch.nn.Module, importance: list[torch.Tensor], keep: int) -> list[list[int]]:
    """Keep each layer's `keep` most important MLP neurons, in their original order; returns the kept indices."""
    kept = []
    for mlp, scores in zip(gated_mlps(model), importance, strict=True):
        # Ties broken by index, so equal scores (and keep == all) give a deterministic, order-preserving choice.
        order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
        idx = torch.tensor(sorted(order[:keep]), dtype=torch.long, device=mlp.down_proj.weight.device)
        mlp.gate_proj = _sliced(mlp.gate_proj, idx, None)
        mlp.up_proj = _sliced(mlp.up_proj, idx, None)
        mlp.down_proj = _sliced(mlp.down_proj, None, idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
        kept.append(idx.tolist())
    model.config.intermediate_size = keep
    return kept


def scoring_device(model: torch.nn.Module) -> torch.device:
    """The GPU when the fp32 weights fit in 80% of its free memory (the calibration batches need little more), else
    the CPU: a slow score beats an out-of-memory failure on a GPU smaller than the model."""
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        if sum(p.numel() * p.element_size() for p in model.parameters()) < 0.8 * free:
            return torch.device("cuda")
    return torch.device("cpu")


def read_model_config(path: str) -> dict[str, Any]:
    """The model's config.json (local directory or s3:// prefix; the debug model's shape for 'debug')."""
    if path == DEBUG_MODEL:
        from training.debug_model import DEBUG_MODEL_SHAPE

        return dict(DEBUG_MODEL_SHAPE)
    try:
        return json.loads(open_storage(path).read_text("config.json"))
    except Exception as e:  # missing file or bucket, no credentials: all mean "cannot be pruned from here"
        raise ModelError(f"--model {path}: no readable config.json ({e})") from None


def prune(
    model_path: str,
    out: str,
    calib: str,
    drop_layers: int | None = None,
    keep_layers: int | None = None,
    intermediate_size: int | None = None,
    mlp_keep_ratio: float | None = None,
    seq_len: int = 256,
    calib_windows: int = 32,
    text_field: str = "text",
    served_model_name: str = "",
    say: Any = print,
) -> dict[str, Any]:
    """Rank, prune and write the model; returns what `llm-platform.json` records under "pruning"."""
    options = PruneOptions(drop_layers, keep_layers, intermediate_size, mlp_keep_ratio)
    with tempfile.TemporaryDirectory(prefix="prune-") as tmp:
        scratch = Path(tmp)
        data = fetch(calib, scratch / "data")
        if not data.exists():
            raise DataError(f"--calib {calib}: no such file or prefix")
        model, tokenizer = load_model_and_tokenizer(ModelConfig(path=model_path), scratch)
        options.check_against(model.config.to_dict())
        total = len(decoder_layers(model))
        inputs = calibration_inputs(build_sequences(data, tokenizer, seq_len, text_field), calib_windows)
        before = num_params(model)
        record: dict[str, Any] = {"source": model_path, "calibration": calib, "params_before": before}
        model.to(scoring_device(model))
        keep = list(range(total))
        if options.depth:
            ranking = block_influence(model, inputs)
            drop = ranking.least_important(_layers_to_drop(total, drop_layers, keep_layers))
            say(f"Block Influence of {total} layers over {ranking.tokens} calibration tokens (lowest removed):")
            for i, score in sorted(enumerate(ranking.scores), key=lambda x: x[1]):
                say(f"  layer {i:3d}  BI {score:.6f}  {'REMOVED' if i in drop else 'kept'}")
            keep = remove_layers(model, drop)
            record.update(
                method="block_influence",
                calibration_tokens=ranking.tokens,
                removed_layers=drop,
                kept_layers=keep,
                block_influence=[round(s, 6) for s in ranking.scores],
            )
        if options.width:
            width_before = model.config.intermediate_size
            n_keep = options.neurons_to_keep(width_before)
            importance = mlp_importance(model, inputs)
            prune_mlp_neurons(model, importance, n_keep)
            say(f"MLP neurons by mean |activation| (Minitron): intermediate_size {width_before} -> {n_keep} per layer")
            record["width"] = {
                "method": "mlp_mean_abs_activation",
                "intermediate_size_before": width_before,
                "intermediate_size_after": n_keep,
            }
        model.cpu()
        after = num_params(model)
        record["params_after"] = after
        say(f"parameters: {before:,} -> {after:,} ({after / before:.1%}); layers: {total} -> {len(keep)}")
        suffix = (f"-{len(keep)}l" if options.depth else "") + (
            f"-i{model.config.intermediate_size}" if options.width else ""
        )
        name = served_model_name or f"{model_path.rstrip('/').rsplit('/', 1)[-1] or 'model'}{suffix}"
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.prune", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (local or s3://) or 'debug'")
    p.add_argument("--out", required=True, help="where the pruned model goes (local dir or s3:// prefix)")
    p.add_argument("--drop-layers", type=int, help="depth: remove this many decoder layers")
    p.add_argument("--keep-layers", type=int, help="depth: keep this many decoder layers")
    p.add_argument("--intermediate-size", type=int, help="width: MLP neurons each layer keeps")
    p.add_argument("--mlp-keep-ratio", type=float, help="width: share of MLP neurons each layer keeps, in (0, 1]")
    p.add_argument("--calib", required=True, help="calibration data in the training format (file, dir or s3://)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--calib-windows", type=int, default=32, help="windows scored at most (default 32)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--served-model-name", default="", help="id to serve it under (default <model>-<layers>l)")
    return p


def options_from_args(args: argparse.Namespace) -> PruneOptions:
    """The typed options; ConfigError (naming the flag) for what the pruner refuses without seeing the model."""
    if args.seq_len < 8:
        raise ConfigError(f"--seq-len {args.seq_len}: must be >= 8")
    if args.calib_windows < 1:
        raise ConfigError(f"--calib-windows {args.calib_windows}: must be >= 1")
    return PruneOptions(args.drop_layers, args.keep_layers, args.intermediate_size, args.mlp_keep_ratio)


def validate_argv(argv: list[str], read_model: bool) -> PruneOptions:
    """What `python -m training.prune argv` would refuse before pruning, for the launcher (ops/launch_training.py
    `--job prune`): the flags, and with `read_model` (or a model knowable offline: 'debug', a local directory) the
    model's config.json, e.g. --drop-layers >= its layers. Raises SystemExit (argparse) or ConfigError/ModelError."""
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    if read_model or args.model == DEBUG_MODEL or not is_s3(args.model):
        options.check_against(read_model_config(args.model))
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options_from_args(args)
        prune(
            args.model,
            args.out,
            args.calib,
            drop_layers=args.drop_layers,
            keep_layers=args.keep_layers,
            intermediate_size=args.intermediate_size,
            mlp_keep_ratio=args.mlp_keep_ratio,
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
