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

  That table was measured on a host with AVX512-VNNI. On an AMD EPYC with AVX2 only (2026-12-07), `torch._int_mm`
  has no fast kernel: 34 ms for one 16-row 576x1536 projection against fp32's 2.7 ms, a whole decode step ~15x
  slower than fp32. So on x86 `Int8Linear` now runs on fbgemm (`int8_kernel`), with per-token scales kept by row
  normalization, a guard row and two 7-bit levels (the class docstring has the construction and its numbers:
  +1.4% perplexity, a 16-row step 1.05x faster than fp32 there); `_int_mm` stays for other CPUs.
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
import warnings
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

    `Int8Linear` layers are fused into one: the activation is quantized once and one int8 GEMM computes every
    output. The result is bit-identical to calling each layer (one scale per token of the shared input, integer
    accumulation, one scale per output channel); the layers then compute through the fused one (a slice of its
    output), so the weights are not kept twice. Anything else is called one by one."""
    if len(modules) > 1 and all(type(m) is Int8Linear and m.bias is None for m in modules):
        fused = Int8Linear.fuse(modules)
        sizes = [m.out_features for m in modules]
        return lambda x: fused.forward(x).split(sizes, dim=-1)
    calls = [linear_fn(m) for m in modules]
    return lambda x: tuple(call(x) for call in calls)


def int8_kernel() -> str:
    """Which int8 GEMM `Int8Linear` uses on this CPU: "fbgemm" where torch's quantized engine is x86/fbgemm (every
    x86-64 build), else "int_mm" (`torch._int_mm`).

    Measured on an AMD EPYC with AVX2 and no VNNI (torch 2.13.0, 1 thread, a 576x1536 projection as in SmolLM2):
    `torch._int_mm` took 2.4 ms at 1 row and 34 ms at 16 rows, against fp32's 0.35 / 2.7 ms: 13x slower than not
    quantizing at all, because its CPU kernel has no fast path without AVX512-VNNI. fbgemm's dynamic int8 linear
    (vpmaddubsw on AVX2, VNNI where present) took 0.31 / 1.1 ms, 2.3x faster than fp32 at 16 rows; on the VNNI host
    of the original measurement the two were within 10% (module docstring)."""
    return "fbgemm" if torch.backends.quantized.engine in ("x86", "fbgemm") else "int_mm"


class Int8Linear(nn.Module):
    """A bias-free or biased `nn.Linear` with int8 weights and per-token int8 activations (see the module docstring).

    y = (q(x) @ round(W / s_w)^T) * s_x * s_w, with one activation scale s_x per token and s_w = max|W_row| / 127 per
    output channel. The integer product accumulates exactly, so a row's result does not depend on the other rows of
    the batch. Two kernels (`int8_kernel`):

    - "int_mm": symmetric int8 activations, s_x = max|x_row| / 127, `torch._int_mm` (int8 x int8 -> int32).
    - "fbgemm": `quantized::linear_dynamic` with per-channel packed weights. It picks one activation scale for the
      whole input from its min/max, and on x86 quantizes to 7 bits (reduce_range: AVX2's 16-bit pairwise sums
      saturate with 8-bit activations; measured, relative error 0.155 against 0.089 with 7 bits). So each row is
      divided by its own max|x_row| (every row then spans at most [-1, 1]) and a guard row [1, -1, 0, ...] is
      appended: the input's range is then exactly [-1, 1] whatever the batch, fbgemm's scale (2/127) and zero point
      (64) are always the same, and each row is quantized on its own fixed grid. 7 bits alone cost SmolLM2-135M
      +15.1% perplexity (bench/quantize_step.HELD_OUT), so the rows are sent twice in one GEMM, as two base-127
      digits: `hi`, already on fbgemm's grid (quantized exactly), and `lo`, the half step `hi` missed scaled to
      [-1, 1] (fbgemm quantizes it on the same fixed grid), with x / max|x| = hi + lo / 127: ~14 bits per token,
      +0.6% perplexity (`_int_mm`'s 8-bit activations: +3.4%). The guard row's output is dropped.
      Measured on the AVX2 host (1 thread, one SmolLM2 decode step at 16 rows, loaded machine, one run): fp32 317 ms,
      this 301 ms, 7 bits alone 201 ms, `_int_mm` ~4600 ms.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.kernel = int8_kernel()
        self._fused: tuple[Int8Linear, int, int] | None = None  # computed through a fused layer (fuse())
        self.register_buffer("scale", scale)  # [out] float32
        if self.kernel == "fbgemm":
            with warnings.catch_warnings():
                # torch 2.13 marks quantized-tensor constructors deprecated (pytorch/pytorch#184982); the pinned torch
                # has them, and tests/serving/test_serving_quantize.py fails on a torch without them
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(
                    weight, scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qweight, None)
            guard = torch.zeros(1, self.in_features)
            guard[0, 0], guard[0, 1 % self.in_features] = 1.0, -1.0
            self.register_buffer("_guard", guard, persistent=False)
        else:
            self.register_buffer("weight_t", weight.t())  # [in, out] int8 (a transposed view, as _int_mm takes it)

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
        return cls(q, scale, bias)

    def int8_weight(self) -> torch.Tensor:
        """[out, in] int8."""
        if self._fused is not None:
            fused, start, end = self._fused
            return fused.int8_weight()[start:end]
        if self.kernel == "fbgemm":
            return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()
        return self.weight_t.t()

    @classmethod
    def fuse(cls, modules: list[Int8Linear]) -> Int8Linear:
        """One bias-free layer computing every module's outputs, concatenated; the modules then compute through it
        (their own weights are released)."""
        fused = cls(torch.cat([m.int8_weight() for m in modules]), torch.cat([m.scale for m in modules]), None)
        start = 0
        for m in modules:
            end = start + m.out_features
            m._fused = (fused, start, end)
            m._packed = None
            if "weight_t" in m._buffers:
                del m._buffers["weight_t"]
            start = end
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            fused, start, end = self._fused
            y = fused.forward(x)[..., start:end]
            return y if self.bias is None else y + self.bias
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.kernel == "fbgemm":
            # Per-token scale as the max itself (see the class docstring); an all-zero row stays zeros. One input
            # buffer holds the hi rows, the lo rows and the guard row, written in place: this layer runs 121 times a
            # SmolLM2 step, so every elementwise op and allocation here costs ~1% of a decode step.
            rows = x2.shape[0]
            buf = x2.new_empty((2 * rows + 1, self.in_features))
            buf[2 * rows :] = self._guard
            sx = x2.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # (linalg.vector_norm(inf): 5x slower)
            t = torch.mul(x2, 63.5 / sx, out=buf[rows : 2 * rows])  # x / max|x| in units of fbgemm's step, |t| <= 63.5
            hi = torch.round(t, out=buf[:rows]).clamp_(-63, 63)  # the 7-bit digit (clamped: 64 is off fbgemm's grid)
            # lo: what the digit missed, |t - hi| <= 0.5, scaled to [-1, 1] (the second digit; the clamp keeps a
            # rounding error of x * (63.5 / max) from pushing it past the guard row's range)
            t.sub_(hi).mul_(2.0).clamp_(-1.0, 1.0)
            hi.div_(63.5)  # on fbgemm's grid (k * 2/127), inside [-1, 1] so the guard row alone sets the range
            out = torch.ops.quantized.linear_dynamic(buf, self._packed, True)
            # x / max|x| = hi + lo / 127: the two digits' outputs, recombined, times the row's scale
            y = torch.add(out[:rows], out[rows : 2 * rows], alpha=1.0 / 127).mul_(sx)
        else:
            # symmetric per-token scale; an all-zero row keeps a tiny scale so it quantizes to zeros, not NaN
            sx = (x2.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
            xq = torch.round(x2 / sx).to(torch.int8)
            y = torch._int_mm(xq, self.weight_t).float() * sx * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token, {self.kernel}"
