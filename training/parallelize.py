"""Process group and `parallelize()`: the model transforms that must happen in one order, in one function.

`parallelize` applies, as torchtitan's `parallelize_llama` does (torchtitan/models/llama3/parallelize.py @ b5bcd76:
"apply activation checkpointing, torch.compile, and data parallelism"; "turn on per-TransformerBlock compile after AC
wrapping and before FSDP"):
    1. activation checkpointing per decoder layer (model.activation_checkpointing)
    2. torch.compile per decoder layer (model.compile)
    3. data parallelism: FSDP2 (`fully_shard` per layer, then the root) or DDP; NCCL on GPU, gloo on CPU.
Why this order: compile must see the layer as it will run (with its checkpoint wrapper), and FSDP2's all-gather /
reduce-scatter hooks must stay outside the compiled graphs (FSDP wraps the already-compiled layers).

Everything reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...). Run as a plain
`python -m training` it is a world of one, without a process group, so the same code path serves both.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.config import ModelConfig, ParallelConfig
from training.model import decoder_layers


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (e.g. one node got SIGTERM)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64 if self.device.type == "cpu" else torch.float32)
        t = t.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size


def init_distributed() -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        # A generous timeout: rank 0 may spend minutes uploading a checkpoint while the others wait at a barrier.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def parallelize(
    model: torch.nn.Module,
    parallel: ParallelConfig,
    model_cfg: ModelConfig,
    d: Dist,
    compile_backend: str = "inductor",
) -> torch.nn.Module:
    """Move the model to its device, then activation checkpointing -> compile -> data parallelism (the module
    docstring says why in this order). Returns the module to call in training.

    A fused loss head (training/loss.py `install_chunked_loss`) must be installed before: it has to run inside the
    root FSDP unit's forward."""
    model.to(d.device)
    if model_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if model_cfg.compile:
        compile_layers(model, backend=compile_backend)
    return _data_parallel(model, parallel, d, bf16=model_cfg.bf16)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (HF's own per-layer wrapper).

    `gradient_checkpointing_enable` is the one name every transformers release has: `activation_checkpointing_enable`
    exists only from 5.23, where `gradient_checkpointing_enable` became its deprecated alias (transformers
    modeling_utils.py @ v5.23.0), so a GPU image on an older pin (a vendor image with 5.17) would stop with
    AttributeError on the new name. Non-reentrant: reentrant checkpointing does not compose with FSDP2."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation note of 5.23+, not ours to act on yet
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _data_parallel(model: torch.nn.Module, cfg: ParallelConfig, d: Dist, bf16: bool) -> torch.nn.Module:
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 params in compute, fp32 gradient reduction: the standard mixed-precision recipe. On CPU, fp32.
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16 and d.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        # One FSDP unit per decoder layer: parameters are all-gathered one layer at a time, so peak memory is
        # one layer's full weights plus the shards; the root wraps embeddings, final norm and LM head.
        # A plain `python -m training` has no process group: it trains the unwrapped model (nothing to shard).
        if d.distributed or dist.is_initialized():
            for layer in decoder_layers(model):
                fully_shard(layer, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        return model
    if d.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return model


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place. Per layer, not the whole model: every layer has the same code, so
    one compiled graph serves all of them, FSDP2's all-gather/reduce-scatter hooks stay outside the graphs, and the
    HF model's Python around the layers (masks, cache plumbing) is never traced. HF's checkpoint wrapper
    (GradientCheckpointingLayer.__call__) sits outside the compiled `_call_impl`, so the recompute replays the
    compiled layer. Called by `parallelize` before FSDP wraps the layers."""
    for layer in decoder_layers(unwrap(model)):
        layer.compile(backend=backend)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying HF module (DDP wraps it; FSDP2 modifies it in place)."""
    return getattr(model, "module", model)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
