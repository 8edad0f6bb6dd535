"""Training configuration: a tree of dataclasses, validated on construction, with named presets.

A run is fully described by one `TrainConfig`. Presets are plain functions that derive from `base()`; the CLI
applies `section.field=value` overrides on top; the resolved config is saved as JSON in every checkpoint so that a
checkpoint says exactly what produced it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEBUG_MODEL = "debug"
"""`model.path` value that builds the debug Llama in memory instead of loading a directory."""


class ConfigError(ValueError):
    """A config value, override or preset name is invalid. The CLI turns it into a clear message and exit 2."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    path: str = DEBUG_MODEL
    """A Hugging Face model directory (local path or s3:// prefix) loaded with AutoModelForCausalLM,
    or "debug" for the ~1M-parameter Llama built from config (training/debug_model.py). Required for real presets."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward: ~30% more compute for far less memory."""
    bf16: bool = True
    """bf16 autocast (and FSDP2 bf16 params) on GPU. Ignored on CPU, where bf16 matmuls are slow."""
    compile: bool = False
    """torch.compile each decoder layer (torchtitan's per-block compile, after activation checkpointing and before
    FSDP2 wraps the layer: training.parallelize.parallelize): fused kernels for the norms, rotary embeddings and
    activations. The first steps pay the compile time (minutes for a real model); needs a C compiler and Python
    headers at run time (Triton builds its launcher; the training image has both)."""


@dataclass
class DataConfig:
    path: str = ""
    """Text (.txt) or JSON lines (.jsonl) file, or a directory / s3:// prefix of them. A JSONL record is either
    `{"<text_field>": "..."}` (plain text, packed) or `{"messages": [{"role", "content"}, ...]}` (a chat, rendered
    with the tokenizer's chat template; the loss covers the assistant turns only). Or the manifest.json of data
    prepared by `python -m training.prepare` (local or s3://): streamed from its shards, for corpora too large to
    tokenize on every rank at start-up (docs/training.md, "Prepared data")."""
    seq_len: int = 128
    text_field: str = "text"
    seed: int = 0
    """Seeds the shuffle of packed sequences: the order is a pure function of (data, seed, epoch), whatever the
    world size."""
    cache_mb: int = 4096
    """Prepared data on S3 (`path` ending in manifest.json, written by `python -m training.prepare`): the most
    local disk each rank's cache of fetched shard blocks takes (scratch, TRAINING_LOCAL_DIR)."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 8, f"data.seq_len must be >= 8, got {self.seq_len}")
        _check(self.cache_mb >= 1, f"data.cache_mb must be >= 1, got {self.cache_mb}")
        _check(bool(self.text_field), "data.text_field must not be empty")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    warmup_ratio: float = 0.1
    """Warmup is capped at this fraction of max_steps, so a short run still reaches its peak lr (1: no cap)."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.warmup_ratio <= 1, f"optim.warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")


def effective_warmup(o: OptimConfig, max_steps: int) -> int:
    """`warmup_steps`, capped at `warmup_ratio * max_steps`: 200 warmup steps against a 40-step run would
    otherwise leave the learning rate near zero for the whole run."""
    return min(o.warmup_steps, int(o.warmup_ratio * max_steps))


@dataclass
class ParallelConfig:
    strategy: Literal["ddp", "fsdp"] = "fsdp"
    """ddp: replicate the model, all-reduce gradients. fsdp: FSDP2 `fully_shard` per decoder layer (ZeRO-3)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum_steps * world_size."""

    def __post_init__(self) -> None:
        _check(self.strategy in ("ddp", "fsdp"), f"parallel.strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        _check(self.micro_batch_size >= 1, f"parallel.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _check(self.grad_accum_steps >= 1, f"parallel.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclass
class CheckpointConfig:
    save_every: int = 100
    """Steps between checkpoints; 0 saves only at the end and on SIGTERM."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: bool = True
    """Resume from the latest complete checkpoint under the output location, if there is one."""

    def __post_init__(self) -> None:
        _check(self.save_every >= 0, f"checkpoint.save_every must be >= 0, got {self.save_every}")
        _check(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class DistillConfig:
    """Knowledge distillation (training/distill.py): loss = alpha * T^2 * KL(teacher || student) on logits / T,
    plus (1 - alpha) * cross-entropy, over the scored (non -100) tokens."""

    teacher: str = ""
    """The teacher: a Hugging Face model directory (local or s3://, like model.path) with the student's tokenizer.
    Empty: plain training. `--distill-from` on the command line."""
    alpha: float = 0.5
    """Weight of the distillation term; 0 is exactly the plain loss, 1 learns from the teacher alone."""
    temperature: float = 1.0
    """Softens both distributions (logits / T); the T^2 factor keeps the term's gradient scale."""

    def __post_init__(self) -> None:
        _check(0 <= self.alpha <= 1, f"distill.alpha must be in [0, 1], got {self.alpha}")
        _check(self.temperature > 0, f"distill.temperature must be > 0, got {self.temperature}")


@dataclass
class TrainConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    output: str = ""
    """Local directory or s3:// prefix: checkpoints go to `<output>/checkpoints`, the model to `export`."""
    export: str = ""
    """Where the final Hugging Face model goes (local dir or s3:// prefix); default `<output>/model`."""
    max_steps: int = 1000
    log_every: int = 1
    seed: int = 0
    metrics_port: int = 0
    """Serve Prometheus metrics (`llm_training_*`, training/metrics.py) on this port at `/metrics`; 0: off. The EKS
    job sets 9400 and annotates its pods for scraping."""

    served_model_name: str = ""
    """The id `python -m serving` serves the export under (recorded in the export); default: the run name."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _check(0 <= self.metrics_port <= 65535, f"metrics_port must be in [0, 65535], got {self.metrics_port}")

    def validate_for_run(self) -> None:
        """Checks that only make sense once the CLI has filled in paths."""
        _check(bool(self.data.path), "no training data: pass --data (a local path or s3:// URI)")
        _check(bool(self.output), "no output location: pass --output (a local directory or s3:// prefix)")
        _check(
            bool(self.model.path),
            f"preset {self.name!r} needs a model: pass --model (a Hugging Face model directory, local or s3://)",
        )

    @property
    def warmup(self) -> int:
        """Warmup steps actually used: `optim.warmup_steps`, capped at `optim.warmup_ratio` of max_steps."""
        return effective_warmup(self.optim, self.max_steps)

    def check_against_model(self, model: ModelInfo) -> None:
        """Contradictions between the config and the model, found before any weight is loaded."""
        _check(
            model.max_seq_len is None or self.data.seq_len <= model.max_seq_len,
            f"data.seq_len={self.data.seq_len} is longer than the model's context ({model.max_seq_len} tokens, "
            f"max_position_embeddings of {self.model.path}): lower data.seq_len",
        )

    def summary(self) -> str:
        """One line with what decides a run's outcome; printed at start (the full config is in every checkpoint)."""
        p, o = self.parallel, self.optim
        return (
            f"preset={self.name} model={self.model.path} lr={o.lr:g} (cosine to {o.lr * o.min_lr_ratio:g}) "
            f"warmup={self.warmup} weight_decay={o.weight_decay:g} seq_len={self.data.seq_len} "
            f"micro_batch={p.micro_batch_size} grad_accum={p.grad_accum_steps} max_steps={self.max_steps} "
            f"strategy={p.strategy} activation_checkpointing={self.model.activation_checkpointing}"
            + (
                f" distill_from={self.distill.teacher} alpha={self.distill.alpha:g} T={self.distill.temperature:g}"
                if self.distill.teacher
                else ""
            )
        )

    @property
    def exported_name(self) -> str:
        """`served_model_name`, else `<base model>-<run>` from the model path's and the output's last parts."""
        if self.served_model_name:
            return self.served_model_name
        base = self.model.path.rstrip("/").rsplit("/", 1)[-1] or "model"
        run = self.output.rstrip("/").rsplit("/", 1)[-1] or self.name
        return f"{base}-{run}"

    @property
    def export_location(self) -> str:
        return self.export or f"{self.output.rstrip('/')}/model"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        hint = hints[f.name]
        kwargs[f.name] = _from_dict(hint, d[f.name]) if dataclasses.is_dataclass(hint) else d[f.name]
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    _check(not unknown, f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Overrides: "optim.lr=1e-3", "parallel.strategy=ddp", "model.activation_checkpointing=true"


def _parse_value(raw: str, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        _check(raw in typing.get_args(hint), f"bad override {key}={raw!r}: expected one of {typing.get_args(hint)}")
        return raw
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        lowered = raw.lower()
        _check(lowered in ("true", "false", "1", "0", "yes", "no"), f"bad override {key}={raw!r}: expected a boolean")
        return lowered in ("true", "1", "yes")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ConfigError(f"bad override {key}={raw!r}: expected {hint.__name__}") from None
    if hint is str:
        return raw
    raise ConfigError(f"bad override {key}: field of type {hint} cannot be set from the command line")


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Return a new config with `dotted.key=value` overrides applied; every section is re-validated."""
    d = cfg.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(bool(sep) and bool(key), f"bad override {item!r}: expected section.field=value")
        parts = key.split(".")
        node: dict[str, Any] = d
        owner: type = TrainConfig
        for part in parts[:-1]:
            hints = typing.get_type_hints(owner)
            _check(
                part in hints and dataclasses.is_dataclass(hints[part]), f"bad override {item!r}: no section {part!r}"
            )
            owner = hints[part]
            node = node[part]
        hints = typing.get_type_hints(owner)
        leaf = parts[-1]
        _check(
            leaf in hints and not dataclasses.is_dataclass(hints[leaf]),
            f"bad override {item!r}: {owner.__name__} has no field {leaf!r}",
        )
        node[leaf] = _parse_value(raw, hints[leaf], key)
    return TrainConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------------------------
# Presets: functions that derive from base(). Real model presets take the model directory from `model.path`
# (a local directory or an s3:// prefix holding a Hugging Face checkpoint), typically set on the command line.


def base() -> TrainConfig:
    return TrainConfig()


def debug() -> TrainConfig:
    """~1M-parameter Llama built from config; seconds per run on CPU. Used by tests and the local demo."""
    cfg = base()
    cfg.name = "debug"
    cfg.model = ModelConfig(path=DEBUG_MODEL, activation_checkpointing=False)
    cfg.data = DataConfig(seq_len=64)
    cfg.optim = OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0)
    cfg.parallel = ParallelConfig(strategy="fsdp", micro_batch_size=8, grad_accum_steps=1)
    cfg.checkpoint = CheckpointConfig(save_every=10, keep_last=2)
    cfg.max_steps = 50
    return cfg


def _llm(name: str, micro_batch_size: int, grad_accum_steps: int, lr: float) -> TrainConfig:
    # No default model path: the weights are the user's (a directory in the stack's models bucket or on local
    # disk), and a guessed location would fail later and less clearly than "pass --model".
    cfg = base()
    cfg.name = name
    cfg.model = ModelConfig(path="", activation_checkpointing=True, bf16=True)
    cfg.data = DataConfig(seq_len=4096)
    cfg.optim = OptimConfig(lr=lr, warmup_steps=200, weight_decay=0.1, grad_clip=1.0)
    cfg.parallel = ParallelConfig(strategy="fsdp", micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps)
    # 12 bytes per parameter per checkpoint (fp32 weights + two Adam moments): keep two, not more.
    cfg.checkpoint = CheckpointConfig(save_every=250, keep_last=2)
    cfg.max_steps = 10_000
    return cfg


def llama_1b() -> TrainConfig:
    """Llama-3.2-1B-class continued pre-training/fine-tuning with FSDP2. Measured on one H100 before the fused loss
    (issue 15: 4 x 4096 tokens, bf16 policy, activation checkpointing): 37 GiB above params+optimizer, so not a
    24 GB GPU then; with training/loss.py the full fp32 logits are gone. Which GPUs it fits now: bench/RESULTS.md."""
    return _llm("llama-1b", micro_batch_size=4, grad_accum_steps=4, lr=1e-4)


def llama_3b() -> TrainConfig:
    """Llama-3.2-3B-class; FSDP2 over one g6e.12xlarge / p4d node or more."""
    return _llm("llama-3b", micro_batch_size=2, grad_accum_steps=8, lr=5e-5)


def llama_8b() -> TrainConfig:
    """Llama-3.1-8B-class; FSDP2 + activation checkpointing across 8+ GPUs (multi-node with EFA preferred)."""
    return _llm("llama-8b", micro_batch_size=1, grad_accum_steps=16, lr=3e-5)


@dataclass
class ModelInfo:
    """What a preset needs to know about a model, read from its config.json (no weights)."""

    name: str
    max_seq_len: int | None
    """max_position_embeddings, when the config has it."""
    params: int
    """Parameter count estimated from the shapes in the config."""

    @classmethod
    def from_hf_config(cls, name: str, c: dict[str, Any]) -> ModelInfo:
        h, layers = int(c.get("hidden_size", 0)), int(c.get("num_hidden_layers", 0))
        heads = int(c.get("num_attention_heads", 1) or 1)
        head_dim = int(c.get("head_dim") or h // heads)
        kv = int(c.get("num_key_value_heads") or heads)
        inter, vocab = int(c.get("intermediate_size", 4 * h)), int(c.get("vocab_size", 0))
        # q and o: h x h; k and v: h x kv*head_dim; gated MLP: 3 x h x intermediate; embeddings (x2 if untied).
        per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter
        emb = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
        ctx = c.get("max_position_embeddings")
        return cls(name=name, max_seq_len=int(ctx) if ctx else None, params=layers * per_layer + emb)


def finetune() -> TrainConfig:
    """Fine-tuning a real model: the default when `--model` is given without `--preset`.

    Fine-tuning learning rates (far below pre-training's: a real model's knowledge survives them), cosine decay to
    10%, warmup capped at 10% of the steps, no weight decay. `fit_to_model` then sizes sequence length, batch,
    activation checkpointing and checkpoint retention to the model (its config.json) and the machine.
    """
    cfg = base()
    cfg.name = "finetune"
    cfg.model = ModelConfig(path="", activation_checkpointing=False, bf16=True)
    cfg.data = DataConfig(seq_len=512)
    cfg.optim = OptimConfig(lr=5e-5, warmup_steps=100, warmup_ratio=0.1, weight_decay=0.0, grad_clip=1.0)
    cfg.parallel = ParallelConfig(strategy="fsdp", micro_batch_size=4, grad_accum_steps=1)
    cfg.checkpoint = CheckpointConfig(save_every=200, keep_last=2)
    cfg.max_steps = 1000
    return cfg


def fit_to_model(cfg: TrainConfig, model: ModelInfo, cuda: bool) -> TrainConfig:
    """The finetune preset sized for `model` on this machine (a GPU per rank, or CPU cores)."""
    cfg = dataclasses.replace(cfg)
    big = model.params >= 1_000_000_000
    ctx = model.max_seq_len or 2048
    if cuda:
        # Tokens per micro-batch per GPU that fit a 24-80 GB GPU with FSDP2 at these sizes; activation
        # checkpointing from 1B parameters on (the llama-* presets' measured-safe setting).
        seq = min(ctx, 4096 if big else 2048)
        budget = 4096 if model.params >= 4_000_000_000 else 8192 if big else 16384
        micro = max(1, budget // seq)
        cfg.parallel = dataclasses.replace(cfg.parallel, micro_batch_size=micro, grad_accum_steps=max(1, 4 // micro))
    else:
        # A laptop / CI CPU: 512 tokens per rank per step keep a step of a ~100M model to seconds (135M: 5-20 s).
        seq = min(ctx, 256)
        cfg.parallel = dataclasses.replace(cfg.parallel, micro_batch_size=2, grad_accum_steps=1)
    cfg.data = dataclasses.replace(cfg.data, seq_len=seq)
    cfg.model = dataclasses.replace(cfg.model, activation_checkpointing=big)
    # Larger models: lower fine-tuning lr. A checkpoint holds fp32 weights + two Adam moments (12 bytes per
    # parameter: 1.6 GB at 135M, 96 GB at 8B), so big models keep only the latest complete one.
    lr = 5e-5 if not big else 2e-5 if model.params < 4_000_000_000 else 1e-5
    cfg.optim = dataclasses.replace(cfg.optim, lr=lr)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, keep_last=1 if big else 2)
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "debug": debug,
    "finetune": finetune,
    "llama-1b": llama_1b,
    "llama-3b": llama_3b,
    "llama-8b": llama_8b,
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
