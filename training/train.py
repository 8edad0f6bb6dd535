"""The training loop: one function, `train(cfg)`, run by every rank (torchrun) or by a single process.

Order matters for the "bad input never overwrites a checkpoint" guarantee: every check that can fail on user input
(config, data, model) runs before the first checkpoint operation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import CheckpointManager
from training.config import ConfigError, OptimConfig, TrainConfig, effective_warmup
from training.data import PackedLoader, build_sequences, read_dataset
from training.export import export_model
from training.loss import install_chunked_loss, reference_loss
from training.model import download_model, flops_per_token, load_model_and_tokenizer, num_embedding_params, num_params
from training.parallelize import Dist, compile_layers, init_distributed, parallelize, shutdown
from training.storage import fetch

EXIT_PREEMPTED = 143
"""128 + SIGTERM: the conventional status of a process stopped by SIGTERM. Kubernetes counts it as a failure, so
the Job's restart policy brings the pod back and it resumes from the checkpoint just written."""

# Dense bf16 peak FLOP/s per GPU (no sparsity), from the vendors' data sheets; unknown devices report no MFU.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,
}


def lr_at(step: int, max_steps: int, o: OptimConfig) -> float:
    """Linear warmup to `lr` (capped: config.effective_warmup), then cosine decay to `lr * min_lr_ratio`."""
    warmup = effective_warmup(o, max_steps)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * cosine)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class _StopFlag:
    """Set by SIGTERM (spot interruption, pod eviction, SageMaker stop); the loop checkpoints and exits."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # Only set a flag: the step in progress finishes, then all ranks agree and save together.
        self.set = True


def local_scratch(cfg: TrainConfig) -> Path:
    """Per-node scratch for S3 downloads and checkpoint staging (an instance-store/NVMe mount in production)."""
    root = Path(os.environ.get("TRAINING_LOCAL_DIR", Path(tempfile.gettempdir()) / "llm-training"))
    return root / hashlib.sha1(cfg.output.encode()).hexdigest()[:12]


def _optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (1-D tensors): decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    # fused: one kernel per parameter group instead of ~10 elementwise passes per tensor; on CPU the unfused
    # default is a per-tensor loop (SmolLM2-135M: 1.6 s vs 0.55 s per step, 1 thread). HF Trainer's default too.
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=True,
    )


class _Metrics:
    """JSON lines on stdout (rank 0); a tqdm bar on stderr when a person is watching a terminal."""

    def __init__(self, d: Dist, start: int, total: int) -> None:
        self.enabled = d.is_main
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def emit(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
            if "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                self.bar.update(record["step"] - self.bar.n)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig) -> int:
    """Run (or resume) the configured training; returns the process exit status."""
    cfg.validate_for_run()
    stop = _StopFlag()
    d = init_distributed()
    try:
        return _train(cfg, d, stop)
    finally:
        shutdown()


def _train(cfg: TrainConfig, d: Dist, stop: _StopFlag) -> int:
    torch.manual_seed(cfg.seed)
    started = time.monotonic()
    say = _progress(d, started)
    say(f"config: {cfg.summary()}")
    if cfg.warmup < cfg.optim.warmup_steps:
        say(
            f"warning: optim.warmup_steps={cfg.optim.warmup_steps} capped to {cfg.warmup} "
            f"(optim.warmup_ratio={cfg.optim.warmup_ratio:g} of max_steps={cfg.max_steps})"
        )
    scratch = local_scratch(cfg)
    if d.local_rank == 0:
        fetch(cfg.data.path, scratch / "data")
    d.barrier()
    # Data is read and validated before the model is downloaded or loaded: a typo costs seconds, not a download.
    data_dir = fetch(cfg.data.path, scratch / "data", download=False)
    docs = read_dataset(data_dir, cfg.data.text_field)
    say(f"data: {len(docs)} documents from {cfg.data.path}; loading model {cfg.model.path}")
    # One download per node: local rank 0 fetches (atomically) while the other ranks wait here, then all load.
    if d.local_rank == 0:
        download_model(cfg.model.path, scratch)
    d.barrier()
    model, tokenizer = load_model_and_tokenizer(cfg.model, scratch, download=False)
    d.barrier()
    sequences = build_sequences(data_dir, tokenizer, cfg.data.seq_len, cfg.data.text_field, docs)
    say(f"model loaded ({num_params(model) / 1e6:.1f}M parameters); {len(sequences)} packed sequences")
    loader = PackedLoader(sequences, cfg.parallel.micro_batch_size, d.rank, d.world_size, cfg.data.seed)

    n_params = num_params(model)
    hf_config = model.config
    # MFU counts the matmul FLOPs: the input embedding is a lookup, not a matmul (torchtitan excludes it too).
    n_dense_params = n_params - num_embedding_params(model)
    use_autocast = cfg.model.bf16 and d.device.type == "cuda"
    # Before FSDP wraps the model: the fused head+loss must run inside the root unit's forward.
    loss_head = install_chunked_loss(model)
    model = parallelize(model, cfg.parallel, d, bf16=cfg.model.bf16)
    if cfg.model.compile:
        compile_layers(model)
    optimizer = _optimizer(model, cfg.optim)

    ckpt = CheckpointManager(cfg.output, scratch, d, keep_last=cfg.checkpoint.keep_last)
    step = 0
    latest = ckpt.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        # Starting over would overwrite and rotate away that run's checkpoints: make the user choose.
        raise ConfigError(
            f"{ckpt.remote.uri} already has complete checkpoints (latest step {latest}) and checkpoint.resume=false:"
            " pass a new --output, or resume"
        )
    metrics = _Metrics(d, start=0, total=cfg.max_steps)
    prom = _prometheus(cfg, d)
    if latest is not None:
        resumed = ckpt.load(latest, model, optimizer)
        loader.load_state_dict(resumed.loader_state)
        step = resumed.step
        metrics.emit({"event": "resumed", "step": step, "checkpoint": f"{ckpt.remote.uri}/step_{step:08d}"})
    metrics.emit(
        {
            "event": "start",
            "step": step,
            "max_steps": cfg.max_steps,
            "world_size": d.world_size,
            "strategy": cfg.parallel.strategy,
            "params": n_params,
            "sequences": len(sequences),
            "device": d.device.type,
            "preset": cfg.name,
            "lr": cfg.optim.lr,
            "warmup": cfg.warmup,
            "seq_len": cfg.data.seq_len,
            "tokens_per_step": cfg.parallel.micro_batch_size
            * cfg.parallel.grad_accum_steps
            * d.world_size
            * cfg.data.seq_len,
        }
    )
    if step == 0:
        say("first step running (the first steps of a real model on CPU take tens of seconds)")
    if metrics.bar is not None:
        metrics.bar.update(step)
    if prom is not None:
        prom.set_step(step)

    tokens_per_step = cfg.parallel.micro_batch_size * cfg.parallel.grad_accum_steps * d.world_size * cfg.data.seq_len
    fpt = flops_per_token(hf_config, n_dense_params, cfg.data.seq_len)
    peak = peak_flops(d.device)
    saved_step = step
    logged_step = step
    t_logged = time.perf_counter()
    config_dict = cfg.to_dict()
    model.train()

    while step < cfg.max_steps:
        if d.any_true(stop.set):
            save_s = 0.0
            if step != saved_step:
                save_s = ckpt.save(step, model, optimizer, loader.state_dict(), config_dict)
                if prom is not None:
                    prom.checkpoint_saved(step)
            metrics.emit({"event": "preempted", "step": step, "checkpoint_step": step, "save_s": save_s})
            metrics.close()
            if prom is not None:
                prom.close()
            return EXIT_PREEMPTED
        lr = lr_at(step, cfg.max_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Summed on the device: no host sync per micro-batch (.item() only at log steps).
        loss_sum = torch.zeros((), device=d.device)
        accum = cfg.parallel.grad_accum_steps
        for micro in range(accum):
            last = micro == accum - 1
            inputs, labels = loader.next_batch()
            inputs, labels = inputs.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else nullcontext()
            # DDP skips the all-reduce until the last micro-batch (its gradients are already full-size). FSDP2
            # reduce-scatters after every micro-batch: skipping would keep every layer's unsharded fp32 gradient
            # alive across the accumulation (~30 GiB per GPU for an 8B model), the memory FSDP exists to save.
            with ctx, nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
                loss = _loss(model, loss_head, inputs, labels)
                (loss / accum).backward()
            loss_sum += loss.detach()
        grad_norm = _clip(model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # Timed over the whole log interval: the only host sync of the loop (besides the stop check) is here.
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            dt = (now - t_logged) / (step - logged_step)
            t_logged = now
            tokens_per_s = tokens_per_step / dt
            record: dict[str, Any] = {
                "step": step,
                "loss": round(d.mean(float(loss_sum) / accum), 6),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 6),
                "tokens_per_s": round(tokens_per_s, 1),
                "step_time_s": round(dt, 4),
            }
            if peak is not None:
                record["mfu"] = round(tokens_per_s * fpt / (peak * d.world_size), 4)
            metrics.emit(record)
            if prom is not None:
                prom.record_step(record, tokens=tokens_per_step * (step - logged_step))
            logged_step = step
        if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step < cfg.max_steps:
            save_s = ckpt.save(step, model, optimizer, loader.state_dict(), config_dict)
            t_logged += save_s  # throughput is the training's, not the checkpoint's
            saved_step = step
            metrics.emit({"event": "checkpoint", "step": step, "save_s": save_s})
            if prom is not None:
                prom.checkpoint_saved(step)

    if step != saved_step:
        save_s = ckpt.save(step, model, optimizer, loader.state_dict(), config_dict)
        metrics.emit({"event": "checkpoint", "step": step, "save_s": save_s})
        if prom is not None:
            prom.checkpoint_saved(step)
    export_model(model, tokenizer, cfg.export_location, d, served_name=cfg.exported_name)
    metrics.emit({"event": "exported", "step": step, "path": cfg.export_location})
    metrics.close()
    if prom is not None:
        prom.close()
    return 0


def _progress(d: Dist, started: float) -> Any:
    """Human progress lines on stderr (rank 0): what the run is doing between start and the first step record."""

    def say(msg: str) -> None:
        if d.is_main:
            print(f"[train {time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def _prometheus(cfg: TrainConfig, d: Dist) -> Any:
    """The Prometheus endpoint when `metrics_port` is set (imported only then: the JSON lines need nothing)."""
    if not cfg.metrics_port:
        return None
    from training.metrics import start_training_metrics

    return start_training_metrics(cfg.metrics_port, d.rank, d.local_rank)


def _loss(model: torch.nn.Module, head: Any, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss. With the fused head (training/loss.py) the model's forward returns the loss itself and
    no [tokens, vocab] logits exist; otherwise the reference loss over full fp32 logits."""
    if head is None:
        return reference_loss(model(input_ids=inputs).logits, labels)
    with head.computing_loss(labels):
        return model(input_ids=inputs).logits


def _clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # Under FSDP2 the norm is a DTensor over the shards; full_tensor() reduces it to the global value. A tensor:
    # converting it to a float here would wait for the GPU every step.
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm
