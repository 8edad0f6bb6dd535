"""Weight quantization for the built-in engine (`--quantization`), and what the vLLM engine is passed instead.

Built-in engine, `int8`:
- CPU: `Int8Linear` below replaces every `nn.Linear`: int8 weights with one scale per output channel, activations
  quantized to int8 per token at run time, `torch._int_mm` (int8 x int8 -> int32, the kernel torchao's int8 dynamic
  recipe also calls), then both scales applied. Chosen by measurement on SmolLM2-135M (bench/quantize_step.py: one
  decode step through this engine's Decoder, median of 12, 1 thread, torch 2.13, torchao 0.18, 2 cores shared with
  other jobs (load ~6), so compare within the table; perplexity on a held-out text):

      fp32                                         step b1 175 ms  b16 248 ms   perplexity  39.10
      Int8Linear (per-token act, _int_mm)          step b1  75 ms  b16 132 ms   perplexity  40.42 (+3.4%)
      torch.ao quantize_dynamic (per-tensor act)   step b1  53 ms  b16 141 ms   perplexity 126.26 (+223%)
      torchao Int8WeightOnlyConfig                 step b1 343 ms  b16 561 ms   perplexity  39.34
      torchao Int8DynamicActivationInt8Weight      step b1 269 ms  b16 365 ms   perplexity  40.20

  `torch.ao` dynamic quantization is the fastest kernel (fbgemm) but quantizes a whole batch's activations with one
  scale (7-bit with x86's reduce_range): perplexity tripled, and a request's output would depend on which requests
  share its batch. SmoothQuant-style per-channel rescaling (arXiv 2211.10438) only brought it to +44% (on another
  held-out text); per-token scales alone brought it to +1.1% there, so the damage comes from a few tokens whose
  activations set the whole batch's scale. Per-token scales also make each row independent of the others, so
  batching does not change a request's tokens. torchao, the maintained path, has the same recipe, but in eager mode
  (its tensor subclasses dispatching per op) it was slower than fp32 here; torchao's own speedups are measured
  under `torch.compile`, not tried for a server whose batch shape changes every step.
- CUDA: the server refuses int8 (serving/config.py): torchao's `Int8WeightOnlyConfig` in eager mode dequantizes each
  weight to bf16 on every call (~5 bytes read per parameter against bf16's 2), so it saves memory, not time, on a
  decode bound by reading weights; vLLM's quantized checkpoints are the GPU path. `quantize_model(..., "cuda")` stays
  for bench/gpu_check.sh, which measures it against bf16 where torchao is installed. `torch._int_mm` on CUDA needs
  more than 16 rows, i.e. not decode.

vLLM engine: `--quantization` is passed to `vllm serve --quantization X` (awq, gptq, fp8, ...): AWQ/GPTQ need a
checkpoint quantized that way; `fp8` quantizes a bf16/fp16 checkpoint on load (Ada/Hopper GPUs)
(https://docs.vllm.ai/en/latest/features/quantization/).

The decode fast path (`serving.decode._LlamaStep`) calls each projection through `linear_fn`, which knows plain,
torchao and `Int8Linear` layers and otherwise calls the module itself, so a quantized model keeps the fast path.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from serving.config import check_quantization

log = logging.getLogger("serving.quantize")


def vllm_args(method: str) -> list[str]:
    """Arguments for `vllm serve` that select the quantization."""
    return [] if method == "none" else ["--quantization", method]


def quantize_model(model: nn.Module, method: str, device: str) -> str:
    """Quantize `model` in place (it must already be on `device`); returns what was done, for the log."""
    check_quantization(method, "builtin")
    if method == "none":
        return "none"
    if device.startswith("cuda"):
        return _torchao(model)
    _replace_linears(model)
    _release_checkpoint(model)
    return "int8 (per-channel int8 weights, per-token int8 activations, torch._int_mm)"


def _release_checkpoint(model: nn.Module) -> None:
    """Give the float32 weights' memory back once they are replaced.

    transformers loads safetensors through a memory map, and every tensor of the file keeps that map alive: while the
    embedding (not quantized) still points into it, all the pages the quantization read stay resident (SmolLM2:
    RSS 1.1 GB after quantizing, of which 0.6 GB file pages of weights no longer used). Copying the remaining
    parameters into their own memory releases the map (RSS 0.7 GB); `malloc_trim` then returns the quantization's
    freed temporaries to the OS (glibc keeps freed heap otherwise)."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the memory stays reusable by this process
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            _replace_linears(child)


def _torchao(model: nn.Module) -> str:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("quantization int8 on cuda needs the torchao package in this image") from exc
    quantize_(model, Int8WeightOnlyConfig())
    return "int8 weight-only (torchao Int8WeightOnlyConfig)"


def linear_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> module(x)` for a projection, without `nn.Module.__call__`'s overhead where the form is known.

    - `nn.Linear` (also with a torchao tensor-subclass weight, which `F.linear` dispatches): `F.linear(x, weight)`;
    - `Int8Linear`: its `forward`;
    - anything else: the module itself (correct, just slower).
    """
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if type(module) is Int8Linear:
        return module.forward
    return module


def fused_fn(modules: list[nn.Module]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """`x -> (m(x) for m in modules)` for projections that read the same input (q/k/v; gate/up).

    `Int8Linear` layers are fused into one: the activation is quantized once and one `torch._int_mm` computes every
    output. The result is bit-identical to calling each layer (one scale per token of the shared input, integer
    accumulation, one scale per output channel), and the layers keep their weights as views of the fused one, so no
    memory is added. Anything else is called one by one."""
    if len(modules) > 1 and all(type(m) is Int8Linear and m.bias is None for m in modules):
        fused = Int8Linear.fuse(modules)
        sizes = [m.out_features for m in modules]
        return lambda x: fused.forward(x).split(sizes, dim=-1)
    calls = [linear_fn(m) for m in modules]
    return lambda x: tuple(call(x) for call in calls)


class Int8Linear(nn.Module):
    """A bias-free or biased `nn.Linear` with int8 weights and per-token int8 activations (see the module docstring).

    y = (round(x / s_x) @ round(W / s_w)^T) * s_x * s_w, with s_x = max|x_row| / 127 per token and s_w = max|W_row|
    / 127 per output channel. The int8 product accumulates exactly in int32, so a row's result does not depend on the
    other rows of the batch.
    """

    def __init__(self, weight_t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight_t)  # [in, out] int8 (a transposed view, as _int_mm takes it)
        self.register_buffer("scale", scale)  # [out] float32
        self.bias = bias
        self.in_features, self.out_features = weight_t.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        scale = (w.abs().amax(dim=1).float() / 127).clamp(min=1e-12)
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        # in row chunks: whole-matrix temporaries of a large vocabulary projection (SmolLM2's lm_head: 113 MB in
        # float32, three of them) would raise the process's peak memory more than int8 saves
        for start in range(0, w.shape[0], 4096):
            rows = slice(start, start + 4096)
            q[rows] = torch.round(w[rows].float() / scale[rows, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.t(), scale, bias)

    @classmethod
    def fuse(cls, modules: list[Int8Linear]) -> Int8Linear:
        """One layer computing every module's outputs, concatenated; the modules' weights become views of it."""
        rows = torch.cat([m.weight_t.t() for m in modules])  # [sum(out), in] contiguous
        fused = cls(rows.t(), torch.cat([m.scale for m in modules]), None)
        start = 0
        for m in modules:
            end = start + m.out_features
            m.weight_t, m.scale = rows[start:end].t(), fused.scale[start:end]
            start = end
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        # symmetric per-token scale; an all-zero row keeps a tiny scale so it quantizes to zeros, not NaN
        sx = (x2.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
        xq = torch.round(x2 / sx).to(torch.int8)
        y = torch._int_mm(xq, self.weight_t).float() * sx * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token"
