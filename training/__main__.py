"""`python -m training` (or `torchrun ... -m training`): train from a preset plus command-line overrides.

    python -m training --preset debug --data corpus.txt --output /tmp/run --max-steps 50 --save-every 10
    python -m training --model ~/models/SmolLM2-135M-Instruct --data chats.jsonl --output /tmp/ft --max-steps 40
    python -m training --model /tmp/pruned --distill-from /tmp/ft/model --data chats.jsonl --output /tmp/kd \
        --set distill.alpha=0.5 --set distill.temperature=1
        (a real model without --preset: the `finetune` preset, sized to the model and this machine)
    torchrun --nproc_per_node=2 -m training --preset debug --data s3://datasets/c4 --output s3://ckpts/run1 \\
        --set parallel.strategy=ddp --set optim.lr=1e-3

Exit status: 0 done, 2 bad input (nothing written), 143 stopped by SIGTERM after checkpointing.
"""

from __future__ import annotations

import argparse
import os
import sys

from training.config import (
    DEBUG_MODEL,
    PRESETS,
    ConfigError,
    ModelInfo,
    TrainConfig,
    apply_overrides,
    fit_to_model,
    preset,
)
from training.data import DataError
from training.model import ModelError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description="Train a causal LM (torchrun-native).")
    p.add_argument(
        "--preset",
        help=f"named config: {', '.join(sorted(PRESETS))}; default: finetune with a real --model, else debug",
    )
    p.add_argument("--data", help="training text/JSONL: a file, directory or s3:// URI")
    p.add_argument("--output", help="run location (local dir or s3:// prefix): checkpoints/ and model/ go here")
    p.add_argument("--export", help="where the final HF model goes (default: <output>/model)")
    p.add_argument("--model", help="model directory (local or s3://) or 'debug'; overrides the preset")
    p.add_argument(
        "--distill-from",
        help="teacher model directory (local or s3://) to distil from; set distill.alpha / distill.temperature",
    )
    p.add_argument("--max-steps", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--strategy", choices=["ddp", "fsdp"])
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set optim.lr=1e-3 --set data.seq_len=256 (repeatable)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def resolve_config(args: argparse.Namespace, read_model: bool = True) -> TrainConfig:
    """Preset, then the named flags, then --set overrides: the last word is the most specific.

    A real model (its config.json, read without the weights) sizes the `finetune` preset and is checked against
    the result, so a contradiction is an error before anything is downloaded or loaded. `read_model=False` (the
    launchers' dry runs, which have no access to the model's bucket) stops before that read.
    """
    named = []
    for flag, key in (
        ("data", "data.path"),
        ("output", "output"),
        ("export", "export"),
        ("model", "model.path"),
        ("distill_from", "distill.teacher"),
        ("max_steps", "max_steps"),
        ("save_every", "checkpoint.save_every"),
        ("strategy", "parallel.strategy"),
    ):
        value = getattr(args, flag)
        if value is not None:
            named.append(f"{key}={value}")
    overrides = [*named, *args.overrides]
    name = args.preset
    if name is None:  # a real model (--model, or model.path as the launchers pass it) gets `finetune`
        probe = apply_overrides(preset("debug"), overrides)
        name = "finetune" if probe.model.path not in ("", DEBUG_MODEL) else "debug"
    cfg = apply_overrides(preset(name), overrides)
    if cfg.model.path in ("", DEBUG_MODEL) or not read_model:
        return cfg
    info = read_model_info(cfg.model.path)
    if name == "finetune":
        import torch

        cfg = apply_overrides(fit_to_model(preset(name), info, cuda=torch.cuda.is_available()), overrides)
    cfg.check_against_model(info)
    return cfg


def read_model_info(path: str) -> ModelInfo:
    """The model's config.json (local directory or s3:// prefix); the weights stay where they are."""
    import json

    from training.storage import open_storage

    store = open_storage(path)
    try:
        text = store.read_text("config.json")
    except Exception as e:  # missing file, missing bucket, no credentials: all mean "not a model"
        raise ModelError(
            f"model path {path} is not a Hugging Face model directory (no readable config.json: {e})"
        ) from None
    try:
        return ModelInfo.from_hf_config(path.rstrip("/").rsplit("/", 1)[-1], json.loads(text))
    except (ValueError, TypeError) as e:
        raise ModelError(f"{path}/config.json is not a valid model config: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = resolve_config(args)
        if args.print_config:
            print(cfg.to_json())
            return 0
        from training.train import train

        return train(cfg)
    except (ConfigError, DataError, ModelError) as e:
        # Every rank hits the same error on the same input; one message is enough.
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
