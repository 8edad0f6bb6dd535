"""Held-out perplexity of a Hugging Face model directory on a dataset, scored the way training scores it.

    python -m training.evaluate --model DIR --data held-out.jsonl [--seq-len 256]

The data goes through the trainer's own pipeline (training/data.py): chats are rendered with the model's chat
template and only assistant tokens count; plain text is packed with the model's document separator. Perplexity is
exp(mean token cross-entropy) over every scored token of every packed window (the tail shorter than a window is
dropped, as in training). One process, CPU or the first GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from training.data import IGNORE_INDEX, DataError, build_sequences


def perplexity(model_dir: str | Path, data: str | Path, seq_len: int = 256, text_field: str = "text") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seqs = build_sequences(Path(data), tokenizer, seq_len, text_field)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model_perplexity(model, seqs)


def model_perplexity(model: torch.nn.Module, seqs: torch.Tensor) -> dict:
    """Perplexity of an in-memory model on packed windows from `build_sequences` (bench/compress.py uses it
    between training steps)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in seqs:
            if window.dim() == 2:  # chat windows: (tokens, label mask)
                tokens, mask = window[0], window[1]
                labels = tokens[1:].masked_fill(mask[1:] == 0, IGNORE_INDEX)
            else:
                tokens, labels = window, window[1:]
            logits = model(input_ids=tokens[:-1].unsqueeze(0)).logits[0]
            total += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return {"perplexity": math.exp(total / count), "tokens": count, "windows": len(seqs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--data", required=True, help="text / JSONL file or directory (local)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--text-field", default="text")
    args = p.parse_args(argv)
    try:
        result = perplexity(args.model, args.data, args.seq_len, args.text_field)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
