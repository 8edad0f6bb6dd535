"""Next-token cross-entropy that never holds the full logits: the LM head and the loss, fused and chunked.

`F.cross_entropy(logits.float(), ...)` over a micro-batch materializes [tokens, vocab] logits in bf16, their fp32
copy, and the fp32 gradient of that copy: for 4 x 4096 tokens and Llama 3's 128,256-token vocabulary that is
~4 + 8 + 8 GiB, the largest single allocation of a step (the issue's H100 measurement: 37 GiB peak above
params+optimizer with it, 25 GiB without the fp32 copy). Here the head's matmul, the log-softmax and the gradient
with respect to the logits are done `chunk_tokens` rows at a time, inside the forward pass: each chunk's logits are
freed before the next is computed, the gradients for the hidden states and the head's weight are accumulated as
they go, and backward only scales them. There is no recompute (the logits are computed once, as before); the cost
is an fp32 [vocab, hidden] buffer for the weight's gradient (1 GiB for Llama-3.2-1B) held from forward to backward.
The same technique as Liger-Kernel's fused linear cross-entropy, in plain PyTorch.

It runs inside the model's forward (the LM head module is swapped for `ChunkedLossHead`), so FSDP2's root unit has
the head's weight unsharded exactly when it is used, and the state-dict keys do not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 2048
"""Rows of logits alive at once: 2048 x 128,256 x 4 bytes = 1 GiB in fp32 for Llama 3, plus its bf16 gradient."""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        # A tensor, not .item(): the mean's denominator stays on the device (no host sync).
        count = valid.sum().clamp(min=1).to(torch.float32)
        safe = torch.where(valid, labels, 0)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            h, y, m = hidden[start:end], safe[start:end], valid[start:end]
            logits = (h @ weight.t()).float()  # [c, vocab], fp32 as F.cross_entropy(logits.float()) computes it
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y[:, None]).squeeze(1)
            total += ((lse - target) * m).sum()
            if not needs_grad:
                continue
            # d(loss_i)/d(logits_i) = softmax(logits_i) - onehot(y_i), zero for ignored rows; in place on the chunk.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(end - start, device=grad.device), y] -= 1.0
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
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_out / count
        gh = (grad_hidden * scale.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` (IGNORE_INDEX rows excluded), equal to
    `F.cross_entropy((hidden @ weight.T).float(), labels)`, without ever holding more than `chunk_tokens` rows of
    logits. Under CUDA autocast the matmuls run in the autocast dtype, as `nn.Linear` would."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens)


class ChunkedLossHead(nn.Linear):
    """The model's LM head (same weight, same state-dict key). Inside `computing_loss(labels)` its forward returns
    the mean loss instead of logits, so `model(input_ids=x).logits` *is* the loss; outside it is a plain Linear."""

    chunk_tokens: int
    _labels: torch.Tensor | None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, self._labels, self.chunk_tokens)

    @contextmanager
    def computing_loss(self, labels: torch.Tensor) -> Iterator[None]:
        self._labels = labels
        try:
            yield
        finally:
            self._labels = None


def install_chunked_loss(model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> ChunkedLossHead | None:
    """Turn the model's LM head into a `ChunkedLossHead` in place (before FSDP wraps the model). None when the
    model's head is not a bias-free Linear applied as is (e.g. logit soft-capping): the caller keeps the reference
    loss."""
    head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head.__class__ = ChunkedLossHead
    head.chunk_tokens = chunk_tokens
    head._labels = None
    return head


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The unfused loss (full fp32 logits): the fallback, and what tests compare against."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def model_loss(
    model: nn.Module, head: ChunkedLossHead | None, inputs: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean next-token loss of one micro-batch. With the fused `head` (from `install_chunked_loss`) the model's
    forward returns the loss itself and no [tokens, vocab] logits exist; with None, the reference loss over full
    fp32 logits."""
    if head is None:
        return reference_loss(model(input_ids=inputs).logits, labels)
    with head.computing_loss(labels):
        return model(input_ids=inputs).logits
