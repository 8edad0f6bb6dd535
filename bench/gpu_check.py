"""One measurement per process for bench/gpu_check.sh (run that; it calls this once per part and variant).

    python bench/gpu_check.py env
    python bench/gpu_check.py train --loss chunked --ac on --compile off
    python bench/gpu_check.py decode --rows 16 --quant int8
    python bench/gpu_check.py serve-kernels                 # the sampler and the masked GQA prefill

Each call prints one JSON line on stdout (a part that measures several sizes prints one per size); a failure is a
Python traceback on stderr and a non-zero exit, never hidden. One process per measurement because a freed FSDP
model and its optimizer state go back to the allocator only when the GC happens to run: in one process a later
variant's peak memory could include ~15 GiB of the previous one's, or run out of memory.

No download: the model is a randomly initialised Llama with Llama-3.2-1B's shape (LLAMA_1B, its config.json on the
Hub, llama3 RoPE scaling included), which costs the same FLOPs and memory as the real weights. Training runs the
trainer's own pieces (training.parallelize.parallelize: activation checkpointing -> compile -> FSDP2 in one rank's
process group, bf16 mixed precision; training.loss; training.train.build_optimizer / clip_gradients), micro-batch
4 x 4096 tokens. It reports tokens/s, MFU (training.model.flops_per_token, torchtitan's formula, over the GPU's dense
bf16 peak: training.train.PEAK_BF16_FLOPS), HFU where activation checkpointing recomputes (the FLOPs the GPU really
ran), peak allocated memory and the part of it above params + optimizer state. Decode is serving.decode.Decoder's
prefill + greedy steps in bf16, or int8 weight-only through serving.quantize (torchao on CUDA; the server refuses
int8 on GPU, this measures whether that decision holds).

GPU_CHECK_CPU_SMOKE=1 runs every part on CPU with a tiny model of the same architecture (2 layers, GQA, llama3 rope),
fp32 and a handful of steps, compile through aot_eager (inductor's C++ build takes minutes on CPU): it proves the
script and each code path run, and measures nothing worth reporting.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

SMOKE = os.environ.get("GPU_CHECK_CPU_SMOKE") == "1"

LLAMA_1B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    # meta-llama/Llama-3.2-1B config.json: every Llama-3.x checkpoint has this scaling block
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}  # fmt: skip
TINY = {**LLAMA_1B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048,
        "rope_parameters": {**LLAMA_1B["rope_parameters"], "original_max_position_embeddings": 256}}  # fmt: skip
SHAPE = TINY if SMOKE else LLAMA_1B


def device() -> torch.device:
    if SMOKE:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU (set GPU_CHECK_CPU_SMOKE=1 to run the CPU smoke test)")
    return torch.device("cuda", 0)


def device_name() -> str:
    return "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(0)


def build_model(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, attn_implementation="sdpa")
    with torch.device(device()):
        model = LlamaForCausalLM(config).to(dtype)
    return model


def sync() -> None:
    if not SMOKE:
        torch.cuda.synchronize()


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({"device": device_name(), "smoke": SMOKE, **record}), flush=True)


def part_env(_: argparse.Namespace) -> None:
    """Versions and what torch.compile needs at run time: a C compiler and Python.h (Triton builds its launcher)."""

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    from training.train import peak_flops_for

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    emit(
        {
            "part": "env",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": cuda,
            "gpu": name,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "peak_bf16_tflops_assumed": (peak_flops_for(name) or 0) / 1e12 if name else None,
            "transformers": version("transformers"),
            "triton": version("triton"),
            "torchao": version("torchao"),
            "c_compiler": shutil.which("cc") or shutil.which("gcc"),
            "python_headers": (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
            "nccl": _nccl_version() if cuda else None,
        }
    )


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()  # a tuple in recent releases, an int (e.g. 2708) in older ones
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def part_train(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from training.config import ModelConfig, OptimConfig, ParallelConfig
    from training.loss import install_chunked_loss, model_loss
    from training.model import flops_per_token, num_embedding_params, num_params
    from training.parallelize import Dist, parallelize
    from training.train import build_optimizer, clip_gradients, peak_flops

    dev = device()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not SMOKE:
        torch.cuda.set_device(dev)
    # one rank's process group, so that FSDP2 really wraps the model (the production code path on one GPU)
    dist.init_process_group("gloo" if SMOKE else "nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    model = build_model(torch.float32)  # fp32 master weights, as the trainer loads them
    model.config.use_cache = False
    model.train()
    dense = num_params(model) - num_embedding_params(model)
    ac, compiled = args.ac == "on", args.compile == "on"
    fpt = flops_per_token(model.config, dense, args.seq_len)
    hfpt = flops_per_token(model.config, dense, args.seq_len, recompute=ac)
    head = install_chunked_loss(model) if args.loss == "chunked" else None
    model_cfg = ModelConfig(activation_checkpointing=ac, compile=compiled, bf16=not SMOKE)
    d = Dist(rank=0, world_size=1, local_rank=0, device=dev)
    model = parallelize(
        model,
        ParallelConfig(strategy="fsdp", micro_batch_size=args.batch),
        model_cfg,
        d,
        compile_backend="aot_eager" if SMOKE else "inductor",
    )
    optimizer = build_optimizer(model, OptimConfig())
    vocab = SHAPE["vocab_size"]
    times: list[float] = []
    base_mem = 0
    loss = torch.zeros(())
    for step in range(args.steps):
        inputs = torch.randint(0, vocab, (args.batch, args.seq_len), device=dev)
        labels = torch.randint(0, vocab, (args.batch, args.seq_len), device=dev)
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not SMOKE):
            loss = model_loss(model, head, inputs, labels)
            loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        if step == 0 and not SMOKE:
            # params + optimizer state now exist and gradients are freed: what every step starts from
            base_mem = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
    step_s = statistics.median(times[args.warmup :])
    tokens_per_s = args.batch * args.seq_len / step_s
    peak = peak_flops(dev)
    peak_mem = None if SMOKE else torch.cuda.max_memory_allocated()
    emit(
        {
            "part": "train",
            "loss_impl": args.loss,
            "activation_checkpointing": ac,
            "compiled": compiled,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "dense_params": dense,
            "step_s_median": round(step_s, 4),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(tokens_per_s * fpt / peak, 4) if peak else None,
            "hfu": round(tokens_per_s * hfpt / peak, 4) if peak else None,
            "peak_gib": round(peak_mem / 2**30, 2) if peak_mem is not None else None,
            "peak_above_params_optimizer_gib": round((peak_mem - base_mem) / 2**30, 2) if peak_mem else None,
            "first_step_s": round(times[0], 2),
            "final_loss": round(loss.item(), 4),
        }
    )
    dist.destroy_process_group()


def part_decode(args: argparse.Namespace) -> None:
    from serving.decode import Decoder
    from serving.quantize import quantize_model

    torch.manual_seed(0)
    dtype = torch.float32 if SMOKE else torch.bfloat16
    model = build_model(dtype).eval()
    what = "none"
    if args.quant == "int8":
        if not SMOKE and importlib.util.find_spec("torchao") is None:
            emit({"part": "decode", "rows": args.rows, "quant": "int8", "skipped": "torchao is not installed"})
            return
        what = quantize_model(model, "int8", str(device()), None)
    decoder = Decoder(model, pad_token_id=0)
    fast = decoder._fast is not None  # llama3 rope must take the fast path (serving/decode.py _LlamaStep)
    prompts = [torch.randint(1, SHAPE["vocab_size"], (args.prompt_len,)).tolist() for _ in range(args.rows)]
    for _ in range(1 if SMOKE else 2):  # warm-up (kernels, allocator)
        batch = decoder.prefill(prompts)
        for _ in range(2 if SMOKE else 8):
            decoder.step(batch, batch.logits.argmax(-1))
    sync()
    t0 = time.perf_counter()
    batch = decoder.prefill(prompts)
    sync()
    t_prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.new_tokens):
        decoder.step(batch, batch.logits.argmax(-1))
    sync()
    t_decode = time.perf_counter() - t1
    emit(
        {
            "part": "decode",
            "rows": args.rows,
            "quant": args.quant,
            "quantization": what,
            "fast_path": fast,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_s": round(t_prefill, 4),
            "decode_tokens_per_s": round(args.rows * args.new_tokens / t_decode, 1),
            "ms_per_step": round(1000 * t_decode / args.new_tokens, 2),
        }
    )


def part_serve_kernels(args: argparse.Namespace) -> None:
    """The sampler over a full vocabulary (greedy vs temperature + top-p, 16 rows) and the masked GQA prefill of
    16 left-padded prompts (peak memory: it must grow with length, not length squared)."""
    from serving.decode import Decoder, SamplingParams, sample

    dev = device()
    vocab, rows = SHAPE["vocab_size"], 16
    logits = torch.randn(rows, vocab, device=dev)
    for label, params in (
        ("greedy", [SamplingParams(16, temperature=0.0)] * rows),
        ("top_p", [SamplingParams(16, temperature=0.7, top_p=0.9, seed=i) for i in range(rows)]),
    ):
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        sample(logits, params, gens)  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            sample(logits, params, gens)
        sync()
        emit({"part": "sampler", "mode": label, "rows": rows, "vocab": vocab,
              "ms_per_call": round(1000 * (time.perf_counter() - t0) / args.repeats, 3)})  # fmt: skip
    model = build_model(torch.float32 if SMOKE else torch.bfloat16).eval()
    decoder = Decoder(model, pad_token_id=0)
    for length in args.prefill_lens:
        # left padding: half the rows are a quarter shorter, so the mask is a real one
        prompts = [torch.randint(1, vocab, (length if i % 2 else length * 3 // 4,)).tolist() for i in range(rows)]
        decoder.prefill(prompts[:2])  # warm-up
        if not SMOKE:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        sync()
        t0 = time.perf_counter()
        decoder.prefill(prompts)
        sync()
        emit(
            {
                "part": "prefill",
                "rows": rows,
                "prompt_len": length,
                "prefill_s": round(time.perf_counter() - t0, 4),
                "peak_above_weights_gib": None
                if SMOKE
                else round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
            }
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    sub.add_parser("env").set_defaults(run=part_env)
    t = sub.add_parser("train")
    t.add_argument("--loss", choices=["chunked", "reference"], default="chunked")
    t.add_argument("--ac", choices=["on", "off"], default="on")
    t.add_argument("--compile", choices=["on", "off"], default="off")
    t.add_argument("--steps", type=int, default=2 if SMOKE else 12)
    t.add_argument("--warmup", type=int, default=1 if SMOKE else 4, help="steps left out of the median")
    t.add_argument("--batch", type=int, default=2 if SMOKE else 4)
    t.add_argument("--seq-len", type=int, default=64 if SMOKE else 4096)
    t.set_defaults(run=part_train)
    d = sub.add_parser("decode")
    d.add_argument("--rows", type=int, default=1)
    d.add_argument("--quant", choices=["none", "int8"], default="none")
    d.add_argument("--prompt-len", type=int, default=16 if SMOKE else 128)
    d.add_argument("--new-tokens", type=int, default=4 if SMOKE else 128)
    d.set_defaults(run=part_decode)
    k = sub.add_parser("serve-kernels")
    k.add_argument("--repeats", type=int, default=3 if SMOKE else 50)
    k.add_argument("--prefill-lens", type=int, nargs="+", default=[32] if SMOKE else [512, 2048])
    k.set_defaults(run=part_serve_kernels)
    args = p.parse_args()
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
