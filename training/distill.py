"""Knowledge distillation: the student learns the teacher's next-token distribution as well as the labels.

    loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)

per scored token (labels != -100: for chat data the assistant turns only), averaged over the scored tokens, where
p^T = softmax(logits / T). This is Hinton et al.'s soft-target loss ("Distilling the Knowledge in a Neural
Network", 2015: the T^2 keeps the soft term's gradient scale independent of T) with forward KL, as in torchtune's
knowledge-distillation recipes (torchtune/modules/loss/kd_losses.py, ForwardKLLoss) and Minitron's logit
distillation. alpha = 0 is exactly the plain loss (training/loss.py).

Like the fused cross-entropy, it never holds full-vocabulary logits: the student's head and the teacher's head are
applied `chunk_tokens` rows at a time to the two models' final hidden states, each chunk's loss and its gradient
with respect to the student's logits are computed and the chunk is freed before the next. The teacher's forward
returns its final hidden states (its head is replaced by the identity) under `no_grad`.

The teacher is frozen (no gradients, no optimizer state, eval mode), loaded from `distill.teacher` like `--model`
(a directory or s3:// prefix, downloaded once per node). Under FSDP its decoder layers are sharded like the
student's (one `fully_shard` unit per layer, same mixed precision); its embeddings, final norm and head stay
replicated, because the fused loss reads the head's weight in the student's forward, outside any teacher unit.
Under DDP and on one process it is replicated. Its tokenizer must be the student's: a ConfigError before any
checkpoint operation otherwise. Nothing of it is checkpointed: it is reloaded from the path the saved config names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.config import DEBUG_MODEL, ConfigError, DistillConfig, ModelConfig, ParallelConfig
from training.loss import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, ChunkedLossHead, linear_cross_entropy
from training.model import decoder_layers, download_model, load_model_and_tokenizer
from training.parallelize import Dist


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor,
        alpha: float,
        temperature: float,
        chunk_tokens: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        safe = torch.where(valid, labels, 0)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        t = temperature
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            h, y, m = hidden[start:end], safe[start:end], valid[start:end]
            logits = (h @ weight.t()).float()
            with torch.no_grad():
                t_logp = F.log_softmax((teacher_hidden[start:end] @ teacher_weight.t()).float() / t, dim=-1)
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse - logits.gather(1, y[:, None]).squeeze(1)
            s_logp = F.log_softmax(logits / t, dim=-1)
            t_p = t_logp.exp()
            kl = (t_p * (t_logp - s_logp)).sum(dim=-1)
            total += (((1.0 - alpha) * ce + (alpha * t * t) * kl) * m).sum()
            if not needs_grad:
                continue
            # d/dlogits: (1 - alpha) (softmax(z) - onehot(y)) + alpha T^2 (1/T) (softmax(z/T) - p_teacher^T).
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(end - start, device=grad.device), y] -= 1.0
            grad.mul_(1.0 - alpha).add_((s_logp.exp_() - t_p).mul_(alpha * t))
            grad *= m[:, None]
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        if needs_grad:
            ctx.save_for_backward(
                grad_hidden if grad_hidden is not None else torch.empty(0),
                grad_weight if grad_weight is not None else torch.empty(0),
                count,
            )
            ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_out / count
        gh = (grad_hidden * scale.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None


def linear_distillation(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """The distillation loss of student `hidden @ weight.T` against teacher `teacher_hidden @ teacher_weight.T`
    and `labels`, equal to `reference_distillation_loss` on the full logits, `chunk_tokens` rows at a time.
    Gradients flow to `hidden` and `weight` only."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if alpha == 0:  # exactly the plain loss: same function, same arithmetic
        return linear_cross_entropy(hidden, weight, labels, chunk_tokens)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    labels = labels.reshape(-1)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        teacher_hidden, teacher_weight = teacher_hidden.to(dtype), teacher_weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _LinearDistillation.apply(
                hidden, weight, teacher_hidden, teacher_weight, labels, alpha, temperature, chunk_tokens
            )
    hidden = hidden.to(weight.dtype)
    teacher_hidden = teacher_hidden.to(teacher_weight.dtype)
    return _LinearDistillation.apply(
        hidden, weight, teacher_hidden, teacher_weight, labels, alpha, temperature, chunk_tokens
    )


def reference_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """The same loss from full fp32 logits with `torch.nn.functional`'s KL and cross-entropy: what tests compare
    against."""
    vocab = student_logits.size(-1)
    s = student_logits.float().reshape(-1, vocab)
    t = teacher_logits.float().reshape(-1, vocab)
    labels = labels.reshape(-1)
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    ce = F.cross_entropy(s, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    s_logp, t_logp = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    kl_per_token = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(dim=-1)
    kl = (kl_per_token * valid).sum() / count
    return alpha * temperature**2 * kl + (1 - alpha) * ce


class DistillLossHead(ChunkedLossHead):
    """The student's fused head (training/loss.py), which inside `distilling(...)` returns the distillation loss.
    `teacher_weight` is the teacher's head weight, a plain attribute: not a parameter, not in the state dict."""

    teacher_weight: torch.Tensor
    alpha: float
    temperature: float
    _teacher_hidden: torch.Tensor | None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._labels is None or self._teacher_hidden is None:
            return super().forward(hidden)
        return linear_distillation(
            hidden,
            self.weight,
            self._teacher_hidden,
            self.teacher_weight,
            self._labels,
            self.alpha,
            self.temperature,
            self.chunk_tokens,
        )

    @contextmanager
    def distilling(self, teacher_hidden: torch.Tensor, labels: torch.Tensor) -> Iterator[None]:
        self._teacher_hidden = teacher_hidden
        try:
            with self.computing_loss(labels):
                yield
        finally:
            self._teacher_hidden = None


@dataclass
class Teacher:
    """The frozen teacher: its body (the head replaced by the identity, so its forward returns the final hidden
    states) and its head's weight."""

    model: nn.Module
    head_weight: torch.Tensor
    path: str

    @classmethod
    def from_model(cls, model: nn.Module, path: str) -> Teacher:
        """Freeze `model` (in place) and split it into body and head weight."""
        model.requires_grad_(False)
        model.eval()
        head_weight = model.get_output_embeddings().weight.detach()
        model.set_output_embeddings(nn.Identity())
        return cls(model=model, head_weight=head_weight, path=path)

    @torch.no_grad()
    def hidden_states(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs).logits

    def attach(self, head: ChunkedLossHead | None, cfg: DistillConfig) -> DistillLossHead:
        """Turn the student's fused head into a `DistillLossHead` reading this teacher (before FSDP wraps the
        student)."""
        if head is None:
            raise ConfigError(
                "distillation needs the student's LM head to be a plain bias-free Linear (training/loss.py); "
                "this model's is not"
            )
        head.__class__ = DistillLossHead
        assert isinstance(head, DistillLossHead)
        head.teacher_weight = self.head_weight
        head.alpha = cfg.alpha
        head.temperature = cfg.temperature
        head._teacher_hidden = None
        return head

    def record(self, cfg: DistillConfig) -> dict[str, Any]:
        """What the export records: the effective distillation config."""
        return {"distillation": {"teacher": self.path, "alpha": cfg.alpha, "temperature": cfg.temperature}}


def distill_loss(
    model: nn.Module, head: DistillLossHead, teacher: Teacher, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean distillation loss of one micro-batch (the student's forward returns it, as `model_loss` does)."""
    teacher_hidden = teacher.hidden_states(inputs)
    with head.distilling(teacher_hidden, labels):
        return model(input_ids=inputs).logits


def check_tokenizers(student: Any, teacher: Any, teacher_path: str) -> None:
    """Same vocabulary (token -> id) and the same end-of-text id, or a ConfigError naming what differs."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()))[:5]
        raise ConfigError(
            f"distill.teacher={teacher_path}: its tokenizer differs from the student's ({len(t_vocab)} vs "
            f"{len(s_vocab)} tokens; e.g. {differ}): distillation compares distributions over the same token ids"
        )
    if student.eos_token_id != teacher.eos_token_id:
        raise ConfigError(
            f"distill.teacher={teacher_path}: end-of-text id {teacher.eos_token_id} differs from the student's "
            f"{student.eos_token_id}"
        )


def load_teacher(
    cfg: DistillConfig,
    parallel: ParallelConfig,
    d: Dist,
    scratch: Path,
    student: nn.Module,
    student_tokenizer: Any,
    bf16: bool,
    say: Callable[[str], None],
) -> Teacher:
    """Download (local rank 0, once per node), load, check against the student, freeze and place the teacher."""
    cache = scratch / "teacher"
    if d.local_rank == 0 and cfg.teacher != DEBUG_MODEL:
        download_model(cfg.teacher, cache)
    d.barrier()
    model, tokenizer = load_model_and_tokenizer(ModelConfig(path=cfg.teacher), cache, download=False)
    check_tokenizers(student_tokenizer, tokenizer, cfg.teacher)
    head = model.get_output_embeddings()
    s_head = student.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or head.weight.shape[0] != s_head.weight.shape[0]:
        raise ConfigError(
            f"distill.teacher={cfg.teacher}: its LM head must be a bias-free Linear over the student's "
            f"{s_head.weight.shape[0]} logits"
        )
    # Frozen: no fp32 master copy needed; on GPU with bf16 the teacher is held in bf16 (half the memory).
    if bf16 and d.device.type == "cuda":
        model.to(torch.bfloat16)
    model.to(d.device)
    teacher = Teacher.from_model(model, cfg.teacher)
    if parallel.strategy == "fsdp" and (d.distributed or dist.is_initialized()):
        from torch.distributed.fsdp import fully_shard

        # Each layer is its own FSDP root here (the root module is not wrapped), and a root left to its default
        # keeps its parameters unsharded after forward, expecting backward (torch 2.13,
        # torch/distributed/fsdp/_fully_shard/_fsdp_state.py `_lazy_init`): the teacher has no backward, so say
        # explicitly that every layer reshards after its forward, or the whole teacher would stay gathered.
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=True)
    n = sum(p.numel() for p in model.parameters())
    n += 0 if _tied(model, teacher.head_weight) else teacher.head_weight.numel()
    say(f"teacher {cfg.teacher} loaded ({n / 1e6:.1f}M parameters, frozen); alpha={cfg.alpha} T={cfg.temperature}")
    return teacher


def _tied(model: nn.Module, weight: torch.Tensor) -> bool:
    emb = model.get_input_embeddings()
    return emb is not None and emb.weight.data_ptr() == weight.data_ptr()
