"""GPU benchmark (one CUDA GPU, e.g. an H100): training tokens/s, MFU and peak memory for the llama-1b shape, before
and after the memory/speed changes, and the built-in engine's CUDA decode throughput at 1 and 16 sequences.

    python bench/gpu_train_mfu.py                      # everything, ~3-5 minutes on an H100
    python bench/gpu_train_mfu.py --part train --steps 12
    python bench/gpu_train_mfu.py --part decode

No download: the model is a randomly initialised Llama with Llama-3.2-1B's shape (LlamaConfig below), which costs the
same FLOPs and memory as the real weights. Training runs the trainer's own pieces (training.parallelize.parallelize,
training.loss.model_loss, training.parallelize.compile_layers) as a one-rank FSDP2 process group with the
bf16 mixed-precision policy and activation checkpointing, micro-batch 4 x 4096 tokens, AdamW, grad clipping. Variants:

  reference   full fp32 logits + F.cross_entropy (the loss before this change), eager
  chunked     fused chunked LM-head + cross-entropy (training/loss.py), eager
  compiled    chunked + torch.compile per decoder layer (model.compile=true)

Per variant: median step time after `--warmup` steps, tokens/s, MFU (6 x non-embedding params + attention, over the
GPU's dense bf16 peak: training.train.PEAK_BF16_FLOPS), peak allocated memory and the part of it above params +
optimizer state. Decode: training-free, bf16 weights, serving.decode.Decoder prefill + greedy steps.
Prints one JSON line per measurement and the device name; copy them into bench/RESULTS.md with the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}


def build_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_1B, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def train_variant(name: str, steps: int, warmup: int, batch: int, seq_len: int) -> dict:
    from training.config import OptimConfig, ParallelConfig
    from training.loss import install_chunked_loss, model_loss
    from training.model import flops_per_token, num_embedding_params, num_params
    from training.parallelize import Dist, compile_layers, parallelize
    from training.train import build_optimizer, clip_gradients, peak_flops

    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    dense = num_params(model) - num_embedding_params(model)
    fpt = flops_per_token(model.config, dense, seq_len)
    head = install_chunked_loss(model) if name != "reference" else None
    d = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    model = parallelize(model, ParallelConfig(strategy="fsdp", micro_batch_size=batch), d, bf16=True)
    if name == "compiled":
        compile_layers(model)
    optimizer = build_optimizer(model, OptimConfig())
    vocab = LLAMA_1B["vocab_size"]
    times: list[float] = []
    base_mem = 0
    for step in range(steps):
        inputs = torch.randint(0, vocab, (batch, seq_len), device="cuda")
        labels = torch.randint(0, vocab, (batch, seq_len), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model_loss(model, head, inputs, labels)
            loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == 0:
            # params + optimizer state now exist and gradients are freed: what every step starts from
            base_mem = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    step_s = statistics.median(times[warmup:])
    tokens_per_s = batch * seq_len / step_s
    peak = peak_flops(d.device)
    record = {
        "part": "train",
        "variant": name,
        "device": torch.cuda.get_device_name(0),
        "batch": batch,
        "seq_len": seq_len,
        "dense_params": dense,
        "step_s_median": round(step_s, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * fpt / peak, 4) if peak else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_above_params_optimizer_gib": round((torch.cuda.max_memory_allocated() - base_mem) / 2**30, 2),
        "first_step_s": round(times[0], 2),
        "final_loss": round(loss.item(), 4),
    }
    del model, optimizer
    torch.cuda.empty_cache()
    return record


def decode(rows: int, prompt_len: int, new_tokens: int) -> dict:
    from serving.decode import Decoder

    torch.manual_seed(0)
    model = build_model(torch.bfloat16).eval()
    model.config.use_cache = True
    decoder = Decoder(model, pad_token_id=0)
    prompts = [torch.randint(1, LLAMA_1B["vocab_size"], (prompt_len,)).tolist() for _ in range(rows)]
    for _ in range(2):  # warm-up (kernels, allocator)
        batch = decoder.prefill(prompts)
        for _ in range(8):
            decoder.step(batch, batch.logits.argmax(-1))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    batch = decoder.prefill(prompts)
    torch.cuda.synchronize()
    t_prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        decoder.step(batch, batch.logits.argmax(-1))
    torch.cuda.synchronize()
    t_decode = time.perf_counter() - t1
    record = {
        "part": "decode",
        "device": torch.cuda.get_device_name(0),
        "rows": rows,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_s": round(t_prefill, 4),
        "decode_tokens_per_s": round(rows * new_tokens / t_decode, 1),
        "ms_per_step": round(1000 * t_decode / new_tokens, 2),
    }
    del model, decoder, batch
    torch.cuda.empty_cache()
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "train", "decode"], default="all")
    p.add_argument("--variants", default="reference,chunked,compiled")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median (compile happens here)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.part in ("all", "train"):
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
        for name in args.variants.split(","):
            emit(train_variant(name, args.steps, args.warmup, args.batch, args.seq_len))
        dist.destroy_process_group()
    if args.part in ("all", "decode"):
        for rows in (1, 16):
            emit(decode(rows, prompt_len=128, new_tokens=128))
    return 0


if __name__ == "__main__":
    sys.exit(main())
