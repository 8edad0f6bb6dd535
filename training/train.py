"""The training loop: one function, `train(cfg)`, run by every rank (torchrun) or by a single process.

`_train` reads as its steps: prepare (data, model, optimizer), find the checkpoint to resume from, then loop (one
optimizer step, a record every `log_every` steps, a checkpoint when due, a stop on SIGTERM), save the last step and
export. Its parts: `training.parallelize.parallelize` applies activation checkpointing -> compile -> FSDP/DDP in
that order; `checkpointed_state` lists what a checkpoint holds (a dict of Stateful objects: adding state is one entry
there); `training.checkpoint.Checkpointer` owns when to save and what a save is (the checkpoint, its event, its
metric); `training.metrics.Reporter` owns the JSON lines and the Prometheus series (and does nothing where they are
off); `_StepLog` times and builds the logged steps' records.

Order matters for the "bad input never overwrites a checkpoint" guarantee: every check that can fail on user input
(config, data, model) runs before the first checkpoint operation.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from training.checkpoint import Checkpointer, CheckpointManager, ModelState, OptimizerState
from training.config import ConfigError, OptimConfig, TrainConfig, effective_warmup
from training.data import PackedLoader, build_sequences, read_dataset
from training.distill import DistillLossHead, Teacher, distill_loss, load_teacher
from training.export import export_model
from training.loss import ChunkedLossHead, install_chunked_loss, model_loss
from training.metrics import Reporter
from training.model import download_model, flops_per_token, load_model_and_tokenizer, num_embedding_params, num_params
from training.parallelize import Dist, init_distributed, parallelize, shutdown
from training.shards import PreparedData, is_manifest
from training.storage import fetch

EXIT_PREEMPTED = 143
"""128 + SIGTERM: the conventional status of a process stopped by SIGTERM. Kubernetes counts it as a failure, so
the Job's restart policy brings the pod back and it resumes from the checkpoint just written."""

# Dense bf16 peak FLOP/s per GPU (no sparsity), from the vendors' data sheets; unknown devices report no MFU.
# First match wins: the H100 PCIe and NVL boards run lower clocks than the SXM part (756 and 835 TFLOP/s, as
# torchtitan/tools/utils.py `get_peak_flops` @ b5bcd76 has them; torch.cuda.get_device_name says "H100 PCIe" /
# "H100 NVL" / "H100 80GB HBM3" for SXM).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
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
    """The device's dense bf16 peak (PEAK_BF16_FLOPS); None off CUDA or for an unknown GPU (no MFU then)."""
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


def peak_flops_for(device_name: str) -> float | None:
    """PEAK_BF16_FLOPS of a CUDA device name (the first key it contains); None when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def local_scratch(cfg: TrainConfig) -> Path:
    """Per-node scratch for S3 downloads and checkpoint staging (an instance-store/NVMe mount in production)."""
    root = Path(os.environ.get("TRAINING_LOCAL_DIR", Path(tempfile.gettempdir()) / "llm-training"))
    return root / hashlib.sha1(cfg.output.encode()).hexdigest()[:12]


def build_optimizer(model: torch.nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """Fused AdamW; no weight decay on norms and biases (1-D tensors): decaying them only hurts."""
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


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to `max_norm` (0: no clipping); returns the norm before clipping, as a
    tensor on the device."""
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


class _StopFlag:
    """Set by SIGTERM (spot interruption, pod eviction, SageMaker stop); the loop checkpoints and exits."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        # Only set a flag: the step in progress finishes, then all ranks agree and save together.
        self.set = True


@dataclass
class _Run:
    """What `_prepare` builds: the wrapped model and what trains it, and the sizes the records report."""

    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    loss_head: ChunkedLossHead | None
    loader: PackedLoader
    sequences: int
    params: int
    flops_per_token: float
    hardware_flops_per_token: float
    """flops_per_token plus activation checkpointing's recompute (equal without it): the HFU numerator."""
    autocast: bool
    scratch: Path
    teacher: Teacher | None = None
    """distill.teacher, frozen and placed like the student (training/distill.py); None: plain training."""


class _StepLog:
    """The logged steps' records, every `log_every` steps and at the last: loss (mean over ranks), lr, grad norm,
    throughput and MFU timed over the whole interval since the previous record (the only host sync of the loop
    besides the stop check), checkpoint time excluded."""

    def __init__(self, cfg: TrainConfig, d: Dist, run: _Run, report: Reporter, step: int) -> None:
        self.d = d
        self.report = report
        self.every = cfg.log_every
        self.max_steps = cfg.max_steps
        self.accum = cfg.parallel.grad_accum_steps
        self.tokens_per_step = _tokens_per_step(cfg, d)
        self.flops_per_token = run.flops_per_token
        self.hardware_flops_per_token = run.hardware_flops_per_token
        self.peak = peak_flops(d.device)
        self.logged_step = step
        self.t_logged = time.perf_counter()

    def after_step(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """Report `step` if it is a logged one; `loss_sum`: the step's micro-batch losses, summed."""
        if step % self.every != 0 and step != self.max_steps:
            return
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt = (now - self.t_logged) / (step - self.logged_step)
        self.t_logged = now
        tokens_per_s = self.tokens_per_step / dt
        record: dict[str, Any] = {
            "step": step,
            "loss": round(self.d.mean(float(loss_sum) / self.accum), 6),
            "lr": lr,
            "grad_norm": round(float(grad_norm), 6),
            "tokens_per_s": round(tokens_per_s, 1),
            "step_time_s": round(dt, 4),
        }
        if self.peak is not None:
            record["mfu"] = round(tokens_per_s * self.flops_per_token / (self.peak * self.d.world_size), 4)
            if self.hardware_flops_per_token != self.flops_per_token:
                record["hfu"] = round(tokens_per_s * self.hardware_flops_per_token / (self.peak * self.d.world_size), 4)
        self.report.step_logged(record, tokens=self.tokens_per_step * (step - self.logged_step))
        self.logged_step = step

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (a checkpoint's) out of the throughput: it is the training's."""
        self.t_logged += seconds


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
    say = _progress(d, time.monotonic())
    run = _prepare(cfg, d, say)
    manager = CheckpointManager(cfg.output, run.scratch, d, keep_last=cfg.checkpoint.keep_last)
    latest = _resumable(manager, cfg)
    with Reporter.start(cfg.metrics_port, d.rank, d.local_rank, cfg.max_steps) as report:
        checkpointer = Checkpointer(
            manager, checkpointed_state(run), cfg.to_dict(), report, cfg.checkpoint.save_every, cfg.max_steps
        )
        step = checkpointer.resume(latest)
        report.event("start", step, **_start_fields(cfg, d, run))
        if step == 0:
            say("first step running (the first steps of a real model on CPU take tens of seconds)")
        report.at_step(step)
        log = _StepLog(cfg, d, run, report, step)
        run.model.train()
        while step < cfg.max_steps:
            if d.any_true(stop.set):
                checkpointer.save_on_stop(step)
                return EXIT_PREEMPTED
            lr = lr_at(step, cfg.max_steps, cfg.optim)
            loss_sum, grad_norm = _optimizer_step(run, cfg, d, lr)
            step += 1
            log.after_step(step, loss_sum, grad_norm, lr)
            log.exclude(checkpointer.save_if_due(step))
        checkpointer.save_final(step)
        # distill: the teacher, alpha and temperature travel with the export.
        info = run.teacher.record(cfg.distill) if run.teacher else None
        export_model(run.model, run.tokenizer, cfg.export_location, d, served_name=cfg.exported_name, info=info)
        report.event("exported", step, path=cfg.export_location)
    return 0


def checkpointed_state(run: _Run) -> dict[str, Stateful]:
    """What each checkpoint holds besides the step and the config, one Stateful entry per piece of state, saved and
    restored by name (training/checkpoint.py's docstring has the rules). New state that must survive a restart is
    one more entry here, e.g. `"teacher": TeacherState(...)`; the Checkpointer needs no change."""
    return {
        "model": ModelState(run.model),
        "optim": OptimizerState(run.model, run.optimizer),
        "loader": run.loader,
    }


def _prepare(cfg: TrainConfig, d: Dist, say: Callable[[str], None]) -> _Run:
    """Everything that can fail on user input, before any checkpoint operation: the config's warnings, the data
    (read and validated before the model is downloaded: a typo costs seconds, not a download), the model and its
    tokenizer (one download per node), then the parallel wrapping and the optimizer."""
    say(f"config: {cfg.summary()}")
    if cfg.warmup < cfg.optim.warmup_steps:
        say(
            f"warning: optim.warmup_steps={cfg.optim.warmup_steps} capped to {cfg.warmup} "
            f"(optim.warmup_ratio={cfg.optim.warmup_ratio:g} of max_steps={cfg.max_steps})"
        )
    scratch = local_scratch(cfg)
    # [prepared data] A manifest (python -m training.prepare) streams its shards; raw text/JSONL is read whole.
    prepared = None
    if is_manifest(cfg.data.path):
        prepared = PreparedData(cfg.data.path, cfg.data.seq_len, scratch, d.rank, cfg.data.cache_mb)
        say(f"data: {prepared.describe()}; loading model {cfg.model.path}")
    else:
        if d.local_rank == 0:
            fetch(cfg.data.path, scratch / "data")
        d.barrier()
        data_dir = fetch(cfg.data.path, scratch / "data", download=False)
        docs = read_dataset(data_dir, cfg.data.text_field)
        say(f"data: {len(docs)} documents from {cfg.data.path}; loading model {cfg.model.path}")
    # One download per node: local rank 0 fetches (atomically) while the other ranks wait here, then all load.
    if d.local_rank == 0:
        download_model(cfg.model.path, scratch)
    d.barrier()
    model, tokenizer = load_model_and_tokenizer(cfg.model, scratch, download=False)
    d.barrier()
    if prepared is not None:  # [prepared data] a tokenizer mismatch is an error here, before the first step
        sequences = prepared.for_tokenizer(tokenizer, cfg.model.path)
    else:
        sequences = build_sequences(data_dir, tokenizer, cfg.data.seq_len, cfg.data.text_field, docs)
    say(f"model loaded ({num_params(model) / 1e6:.1f}M parameters); {len(sequences)} packed sequences")
    loader = PackedLoader(sequences, cfg.parallel.micro_batch_size, d.rank, d.world_size, cfg.data.seed)

    n_params = num_params(model)
    # MFU counts the matmul FLOPs: the input embedding is a lookup, not a matmul (torchtitan excludes it too).
    dense = n_params - num_embedding_params(model)
    fpt = flops_per_token(model.config, dense, cfg.data.seq_len)
    hfpt = flops_per_token(model.config, dense, cfg.data.seq_len, recompute=cfg.model.activation_checkpointing)
    # Before parallelize: the fused head+loss must run inside the root FSDP unit's forward.
    loss_head = install_chunked_loss(model)
    # --- distill: the teacher (checked against the student before any checkpoint operation) reads its hidden
    # states into the student's fused head.
    teacher = None
    if cfg.distill.teacher:
        teacher = load_teacher(cfg.distill, cfg.parallel, d, scratch, model, tokenizer, cfg.model.bf16, say)
        loss_head = teacher.attach(loss_head, cfg.distill)
    # --- end distill
    model = parallelize(model, cfg.parallel, cfg.model, d)
    return _Run(
        model=model,
        tokenizer=tokenizer,
        optimizer=build_optimizer(model, cfg.optim),
        loss_head=loss_head,
        loader=loader,
        sequences=len(sequences),
        params=n_params,
        flops_per_token=fpt,
        hardware_flops_per_token=hfpt,
        autocast=cfg.model.bf16 and d.device.type == "cuda",
        scratch=scratch,
        teacher=teacher,
    )


def _resumable(manager: CheckpointManager, cfg: TrainConfig) -> int | None:
    """The latest complete checkpoint's step to resume from (None: start at 0). With checkpoints there and
    `checkpoint.resume=false`, a ConfigError: starting over would overwrite and rotate away that run's
    checkpoints, so the user chooses."""
    latest = manager.latest_step()
    if latest is not None and not cfg.checkpoint.resume:
        raise ConfigError(
            f"{manager.remote.uri} already has complete checkpoints (latest step {latest}) and checkpoint.resume=false:"
            " pass a new --output, or resume"
        )
    return latest


def _optimizer_step(run: _Run, cfg: TrainConfig, d: Dist, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at `lr` over `grad_accum_steps` micro-batches; the summed micro-batch losses and the
    gradients' norm, both still on the device."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # Summed on the device: no host sync per micro-batch (.item() only at log steps).
    loss_sum = torch.zeros((), device=d.device)
    accum = cfg.parallel.grad_accum_steps
    for micro in range(accum):
        last = micro == accum - 1
        inputs, labels = run.loader.next_batch()
        inputs, labels = inputs.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if run.autocast else nullcontext()
        # DDP skips the all-reduce until the last micro-batch (its gradients are already full-size). FSDP2
        # reduce-scatters after every micro-batch: skipping would keep every layer's unsharded fp32 gradient
        # alive across the accumulation (~30 GiB per GPU for an 8B model), the memory FSDP exists to save.
        with ctx, nullcontext() if last or not hasattr(run.model, "no_sync") else run.model.no_sync():
            if run.teacher is not None and isinstance(run.loss_head, DistillLossHead):  # distill
                loss = distill_loss(run.model, run.loss_head, run.teacher, inputs, labels)
            else:
                loss = model_loss(run.model, run.loss_head, inputs, labels)
            (loss / accum).backward()
        loss_sum += loss.detach()
    grad_norm = clip_gradients(run.model, cfg.optim.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def _tokens_per_step(cfg: TrainConfig, d: Dist) -> int:
    return cfg.parallel.micro_batch_size * cfg.parallel.grad_accum_steps * d.world_size * cfg.data.seq_len


def _start_fields(cfg: TrainConfig, d: Dist, run: _Run) -> dict[str, Any]:
    """The `start` event's fields after `step` (docs/training.md lists them)."""
    return {
        "max_steps": cfg.max_steps,
        "world_size": d.world_size,
        "strategy": cfg.parallel.strategy,
        "params": run.params,
        "sequences": run.sequences,
        "device": d.device.type,
        "preset": cfg.name,
        "lr": cfg.optim.lr,
        "warmup": cfg.warmup,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": _tokens_per_step(cfg, d),
    }


def _progress(d: Dist, started: float) -> Callable[[str], None]:
    """Human progress lines on stderr (rank 0): what the run is doing between start and the first step record."""

    def say(msg: str) -> None:
        if d.is_main:
            print(f"[train {time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say
