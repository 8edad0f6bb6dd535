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

  Two digits double the GEMM's rows. Since 2026-12-08 a Llama-shaped model is first smoothed (`smooth`: SmoothQuant's
  per-channel scales, calibrated at load on CALIBRATION and folded into the norms and producing projections, exact in
  float), which takes the outlier channels out of the activations; one 7-bit digit then suffices for every projection
  but down_proj (ONE_DIGIT has the measurements: perplexity +1.4%, a 16-row step ~1.3x faster than two digits
  everywhere). Other architectures keep two digits everywhere.
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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from serving.config import check_quantization

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("serving.quantize")


def vllm_args(method: str) -> list[str]:
    """Arguments for `vllm serve` that select the quantization."""
    return [] if method == "none" else ["--quantization", method]


def prepare_weights(model: nn.Module, method: str, device: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The built-in engine's weights as it serves them, in place; returns what was done, for the log: `--quantization
    int8` quantizes (`quantize_model`), float32 on CPU is packed for oneDNN (`pack_linears`), anything else stays."""
    if method == "none" and device == "cpu":
        return f"quantization none; {pack_linears(model)}"
    return f"quantization {quantize_model(model, method, device, tokenizer)}"


def quantize_model(model: nn.Module, method: str, device: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """Quantize `model` in place (it must already be on `device`); returns what was done, for the log.

    On CPU, a Llama-shaped model (`smoothable`) with a tokenizer is first smoothed (`smooth`, calibrated on
    CALIBRATION), and its q/k/v, o, gate/up and lm_head projections then take one-digit activations (`Int8Linear`);
    anything else keeps two digits everywhere."""
    check_quantization(method, "builtin")
    if method == "none":
        return "none"
    if device.startswith("cuda"):
        return _torchao(model)
    one_digit: set[str] = set()
    if tokenizer is not None and smoothable(model):
        smooth(model, calibration_ids(tokenizer).to(device))
        one_digit = set(ONE_DIGIT)
    _replace(model, lambda name, lin: Int8Linear.from_linear(lin, digits=1 if name in one_digit else 2))
    _release_checkpoint(model)
    kernel = int8_kernel()
    what = "fbgemm quantized::linear_dynamic" if kernel == "fbgemm" else "torch._int_mm"
    if kernel == "fbgemm":
        digits = f"one 7-bit digit for {', '.join(sorted(one_digit))}, two elsewhere" if one_digit else "two digits"
        what += f", per-token activations in {digits}"
    return f"int8 (per-channel int8 weights, {what}{', smoothed' if one_digit else ''})"


ONE_DIGIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "lm_head")
"""The projections of a smoothed model whose activations take one 7-bit digit (`Int8Linear`); down_proj keeps two.
Chosen by measurement (SmolLM2-135M-Instruct, the quality gate's metrics; perplexity on bench/quantize_step.HELD_OUT
and on a second held-out text of code and prose; `matched` = mean greedy prefix equal to fp32's over 16 chat prompts;
step = one 16-row decode step, 1 thread, configurations alternating; bench/RESULTS.md):

    recipe                                                 perplexity   2nd text   matched   16-row step
    two digits everywhere, not smoothed (until 2026-12-08) +0.6%        +1.2%      0.80      60.1 ms
    one digit everywhere, not smoothed                     +20.0%       +23.5%     0.23
    smoothed, two digits everywhere                        +0.3%        +0.6%      0.70
    smoothed, one digit everywhere                         +0.1%        +7.9%      0.45
    smoothed, one digit but down_proj (shipped)            +1.4%        +1.3%      0.54
    smoothed, one digit for q/k/v, o, gate/up              +1.9%        +2.0%      0.60      48.2 ms

down_proj's input (silu(gate) * up) has the largest outliers: with it on one digit, stronger smoothing there
(alpha 0.6 or 0.7) was worse (+5.3% to +11.6%), and keeping its 8 to 32 largest input channels in float32 (LLM.int8's
decomposition) gave +3.8% to +6.7%."""

SMOOTH_ALPHA = 0.5
"""SmoothQuant's migration strength (arXiv 2211.10438, its default): per input channel j, s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha). Measured with one digit everywhere on SmolLM2 (perplexity on HELD_OUT): alpha 0.4 +6.9%,
0.5 +0.1%, 0.65 +5.3%, 0.8 +8.8%."""

CALIBRATION = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made it possible "
    "to produce books quickly and cheaply. Within fifty years presses were operating in more than two hundred cities. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "Question: What is 17 times 23? Answer: 17 times 23 is 391. "
    "Les enfants jouaient dans le parc pendant que leurs parents discutaient sur un banc. "
    "In 2023, the company reported revenue of $4.2 billion, up 12% from the previous year, driven by cloud services. "
    "<|im_start|>user\nHow do I reverse a list in Python?<|im_end|>\n<|im_start|>assistant\n"
    "Use list.reverse() or slicing."
)
"""Text whose activations set the smoothing scales (`smooth`): prose, code, arithmetic, French, figures and a chat
turn (~180 tokens). Not the text the quality gate measures perplexity on (bench/quantize_step.HELD_OUT)."""


def calibration_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """CALIBRATION as a [1, tokens] batch of `tokenizer`'s ids."""
    return torch.tensor([tokenizer.encode(CALIBRATION)], dtype=torch.long)


def smoothable(model: nn.Module) -> bool:
    """Whether `smooth` knows where this model's scales fold: a bias-free `LlamaForCausalLM` (RMSNorm weights before
    q/k/v and gate/up, v_proj before o_proj, the final norm before lm_head)."""
    cfg = getattr(model, "config", None)
    return (
        type(model).__name__ == "LlamaForCausalLM"
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
        and getattr(model, "lm_head", None) is not None
        and model.lm_head.bias is None
    )


@torch.no_grad()
def smooth(model: nn.Module, ids: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> None:
    """SmoothQuant-style rescaling (arXiv 2211.10438), folded into the weights: exact in float, so the model computes
    the same function (to rounding), while the inputs of the projections lose their outlier channels.

    Per projection group and input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), with max|X_j| over a
    forward pass on `ids` and max|W_j| over the group's weights. The input is divided by s (folded into what produces
    it) and the weight's column j multiplied by s_j:
    - q/k/v: input_layernorm's weight; gate/up: post_attention_layernorm's weight;
    - o_proj: v_proj's output rows (attention mixes v linearly within each head; with grouped query attention one
      scale per kv head and channel, shared by the query heads that read it);
    - down_proj: up_proj's output rows (its input is silu(gate) * up, elementwise);
    - lm_head: the final norm's weight. A tied lm_head first gets its own weight (the embedding is not scaled)."""
    cfg = model.config
    inner = model.model
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(inner.layers[0].self_attn.head_dim)
    watch = {"q_proj", "o_proj", "gate_proj", "down_proj", "lm_head"}
    amax: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(0).float()
        amax[module] = torch.maximum(amax[module], x) if module in amax else x

    hooks = [m.register_forward_pre_hook(record) for n, m in model.named_modules() if n.split(".")[-1] in watch]
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()

    def scales(x_max: torch.Tensor, w_max: torch.Tensor) -> torch.Tensor:
        return (x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    def fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
        w_max = torch.stack([lin.weight.abs().amax(0).float() for lin in linears]).amax(0)
        s = scales(amax[linears[0]], w_max)
        norm.weight.div_(s.to(norm.weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))

    rep = heads // kv_heads
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        # o_proj's input channel (h, d) is v's channel (h // rep, d)
        x_max = amax[attn.o_proj].view(kv_heads, rep, head_dim).amax(1)
        w_max = attn.o_proj.weight.abs().amax(0).float().view(kv_heads, rep, head_dim).amax(1)
        s = scales(x_max, w_max)  # [kv_heads, head_dim]
        attn.v_proj.weight.div_(s.reshape(-1, 1).to(attn.v_proj.weight.dtype))
        attn.o_proj.weight.mul_(
            s[:, None, :].expand(kv_heads, rep, head_dim).reshape(1, -1).to(attn.o_proj.weight.dtype)
        )
        # down_proj's input is silu(gate) * up: elementwise in up's output rows
        s = scales(amax[mlp.down_proj], mlp.down_proj.weight.abs().amax(0).float())
        mlp.up_proj.weight.div_(s[:, None].to(mlp.up_proj.weight.dtype))
        mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype))
    if model.lm_head.weight is inner.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    fold(inner.norm, [model.lm_head])


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


def _torchao(model: nn.Module) -> str:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise RuntimeError("quantization int8 on cuda needs the torchao package in this image") from exc
    quantize_(model, Int8WeightOnlyConfig())
    return "int8 weight-only (torchao Int8WeightOnlyConfig)"


PACK_ROWS = 16
"""The batch-size hint oneDNN's weight reorder takes (`PackedLinear`): the layout it picks for 16 rows. Measured (1
thread, 576x3072): hint 1 gave a 16-row call 0.70 ms, hints 16 and 64 0.52 ms; 1-row calls 0.11 ms with any."""


class PackedLinear(nn.Module):
    """A float32 `nn.Linear` on CPU with its weight reordered once into oneDNN's blocked layout
    (`torch.ops.mkldnn._reorder_linear_weight`) and computed by `torch.ops.mkldnn._linear_pointwise`: the pair torch's
    own compiler emits for float32 linears on CPU (torch/_inductor/fx_passes/mkldnn_fusion.py, torch 2.13). Same
    float32 arithmetic, in a different order (max difference ~1e-6 relative to `F.linear`).

    Why: `F.linear` reads the plain [out, in] weight through MKL's sgemm on every call. Measured on the 2-core AVX2
    EPYC (torch 2.13.0, 1 thread, 16 rows, median of 5x10 calls), F.linear vs this:

        576 -> 960 (q/k/v)   0.238 -> 0.179 ms      1536 -> 576 (down)   0.390 -> 0.297 ms
        576 -> 3072 (g/u)    0.792 -> 0.556 ms      576 -> 49152 (lm)    24.9  -> 11.5  ms

    A SmolLM2 16-row step's matmuls: ~72 -> ~46 ms. At 1 row the small projections are ~10% slower and lm_head 1.3x
    faster. With a hint of PACK_ROWS a row's result did not depend on the rows beside it (compared bit for bit; MKL's
    F.linear's did). The dense weight is released: a tied lm_head keeps the embedding's dense copy and adds its own
    packed one (SmolLM2: +113 MB)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed float32"


def packable(model: nn.Module) -> bool:
    """Whether `pack_linears` applies: float32 weights on CPU and a torch built with oneDNN (x86-64, aarch64)."""
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module) -> str:
    """Replace every float32 `nn.Linear` of a CPU model with `PackedLinear`; returns what was done, for the log. A
    model `packable` refuses is left as it is."""
    if not packable(model):
        return "not packed (needs float32 weights on CPU and oneDNN)"
    count = _replace(model, lambda _, linear: PackedLinear(linear))
    _release_checkpoint(model)
    return f"{count} linear layers in oneDNN's packed float32 layout"


def _replace(module: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> int:
    """Replace every plain `nn.Linear` under `module` with `make(its attribute name, it)`; how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, make(name, child))
            count += 1
        else:
            count += _replace(child, make)
    return count


def linear_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> module(x)` for a projection, without `nn.Module.__call__`'s overhead where the form is known.

    - `nn.Linear` (also with a torchao tensor-subclass weight, which `F.linear` dispatches): `F.linear(x, weight)`;
    - `Int8Linear`, `PackedLinear`: its `forward`;
    - anything else: the module itself (correct, just slower).
    """
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if type(module) in (Int8Linear, PackedLinear):
        return module.forward
    return module


def fused_fn(modules: list[nn.Module]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """`x -> (m(x) for m in modules)` for projections that read the same input (q/k/v; gate/up).

    `Int8Linear` layers are fused into one: the activation is quantized once and one int8 GEMM computes every
    output. The result is bit-identical to calling each layer (one scale per token of the shared input, integer
    accumulation, one scale per output channel); the layers then compute through the fused one (a slice of its
    output), so the weights are not kept twice. Anything else is called one by one."""
    if (
        len(modules) > 1
        and all(type(m) is Int8Linear and m.bias is None for m in modules)
        and len({m.digits for m in modules}) == 1  # type: ignore[union-attr]
    ):
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
    - fbgemm, `digits=1`: the rows once, x / max|x| on the same fixed grid (one 7-bit digit, half the GEMM rows). On
      its own that cost SmolLM2 +20% perplexity; after `smooth` it is what every projection but down_proj uses
      (ONE_DIGIT). Fused layers (`fuse`) need the same digits.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, digits: int = 2) -> None:
        super().__init__()
        if digits not in (1, 2):
            raise ValueError(f"digits must be 1 or 2, got {digits}")
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.kernel = int8_kernel()
        self.digits = digits  # fbgemm only: 7-bit activation digits per token (the int_mm kernel's are 8-bit, one)
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
    def from_linear(cls, linear: nn.Linear, digits: int = 2) -> Int8Linear:
        w = linear.weight.detach()
        scale = (w.abs().amax(dim=1).float() / 127).clamp(min=1e-12)
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        # in row chunks: whole-matrix temporaries of a large vocabulary projection (SmolLM2's lm_head: 113 MB in
        # float32, three of them) would raise the process's peak memory more than int8 saves
        for start in range(0, w.shape[0], 4096):
            rows = slice(start, start + 4096)
            q[rows] = torch.round(w[rows].float() / scale[rows, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias, digits)

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
        """One bias-free layer computing every module's outputs, concatenated; the modules (all with the same
        `digits`) then compute through it (their own weights are released)."""
        if len({m.digits for m in modules}) != 1:
            raise ValueError("fused layers need the same activation digits")
        weight, scale = torch.cat([m.int8_weight() for m in modules]), torch.cat([m.scale for m in modules])
        fused = cls(weight, scale, None, modules[0].digits)
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
        if self.kernel == "fbgemm" and self.digits == 1:
            # one digit: x / max|x| in [-1, 1], which fbgemm quantizes on the guard row's fixed grid itself
            rows = x2.shape[0]
            buf = x2.new_empty((rows + 1, self.in_features))
            buf[rows:] = self._guard
            sx = x2.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
            torch.div(x2, sx, out=buf[:rows])
            y = torch.ops.quantized.linear_dynamic(buf, self._packed, True)[:rows].mul_(sx)
        elif self.kernel == "fbgemm":
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
        digits = f", {self.digits} digit(s)" if self.kernel == "fbgemm" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token, {self.kernel}{digits}"
        )
