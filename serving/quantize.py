"""Weight quantization for the built-in engine (`--quantization`), and what the vLLM engine is passed instead.

Built-in engine, `int8`:
- CPU: `torch.ao` dynamic quantization of every `nn.Linear` (int8 weights, per output channel; activations quantized
  per batch at run time; fbgemm/x86 int8 GEMM). Chosen over torchao by measurement on SmolLM2-135M, 1 thread, one
  decode step (bench/quantize_step.py; torch 2.13, torchao 0.18, 2 shared cores):

      fp32                                   b1  57 ms   b16 134 ms
      torch.ao quantize_dynamic (int8)       b1  26 ms   b16  60 ms   <- 2.2x faster than fp32
      torchao Int8WeightOnlyConfig           b1 101 ms   b16 184 ms   (slower than fp32)
      torchao Int8DynamicActivationInt8Weight b1 120 ms  b16 118 ms

  torchao is the maintained path, but its CPU int8 kernels only pay off under `torch.compile` (its tensor subclasses
  dispatch to unfused dequantize + matmul in eager mode), and compiling a server's dynamic batch shapes is its own
  project. `torch.ao.quantization` warns that it is deprecated; it is still in torch 2.13 (the pin). When a later
  torch removes it, `int8` on CPU falls back to torchao's dynamic-activation recipe (slower, still int8 weights) and
  logs so, rather than failing to start.
- CUDA: torchao `Int8WeightOnlyConfig` (int8 weights, bf16/fp16 activations): single-request decode on a GPU is
  bound by reading weights, so halving the bytes read is what pays; activations stay in floating point, so quality
  is that of weight-only int8 (https://github.com/pytorch/ao, torchao/quantization/README.md). Needs torchao in the
  image.

vLLM engine: `--quantization` is passed to `vllm serve --quantization X` (awq, gptq, fp8, ...): AWQ/GPTQ need a
checkpoint quantized that way; `fp8` quantizes a bf16/fp16 checkpoint on load (Ada/Hopper GPUs)
(https://docs.vllm.ai/en/latest/features/quantization/).

The decode fast path (`serving.decode._LlamaStep`) calls each projection through `linear_fn`, which knows both
quantized forms and otherwise calls the module itself, so a quantized model keeps the fast path.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: serving.config validates choices in the torch-free gateway image
    import torch
    from torch import nn

log = logging.getLogger("serving.quantize")

BUILTIN_QUANTIZATIONS = ("none", "int8")
# vLLM 0.33 `--quantization` choices that make sense for a served checkpoint (vllm/model_executor/layers/quantization/
# __init__.py QUANTIZATION_METHODS); the rest of that list are model-specific formats.
VLLM_QUANTIZATIONS = ("none", "fp8", "awq", "awq_marlin", "gptq", "gptq_marlin", "compressed-tensors", "bitsandbytes")


def check_quantization(method: str, engine: str) -> None:
    """Raise ValueError naming the choices when `method` does not fit `engine` (builtin or vllm)."""
    choices = VLLM_QUANTIZATIONS if engine == "vllm" else BUILTIN_QUANTIZATIONS
    if method not in choices:
        raise ValueError(f"quantization {method!r} is not one of {', '.join(choices)} for the {engine} engine")


def vllm_args(method: str) -> list[str]:
    """Arguments for `vllm serve` that select the quantization."""
    return [] if method == "none" else ["--quantization", method]


def quantize_model(model: nn.Module, method: str, device: str) -> str:
    """Quantize `model` in place (it must already be on `device`); returns what was done, for the log."""
    import torch
    from torch import nn

    check_quantization(method, "builtin")
    if method == "none":
        return "none"
    if device.startswith("cuda"):
        return _torchao(model, "weight-only")
    try:
        dynamic = torch.ao.quantization.quantize_dynamic
    except AttributeError:  # removed from a later torch: see the module docstring
        log.warning("torch.ao.quantization is not available in torch %s; using torchao on CPU", torch.__version__)
        return _torchao(model, "dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        # per-channel weight scales: one scale per output row keeps rows with small weights accurate (a per-tensor
        # scale is set by the largest weight in the whole matrix)
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    return f"int8 dynamic (torch.ao, per-channel weights, {torch.backends.quantized.engine})"


def _torchao(model: nn.Module, recipe: str) -> str:
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as exc:
        raise RuntimeError(f"quantization int8 ({recipe}) needs the torchao package in this image") from exc
    config = Int8WeightOnlyConfig() if recipe == "weight-only" else Int8DynamicActivationInt8WeightConfig()
    quantize_(model, config)
    return f"int8 {recipe} (torchao {type(config).__name__})"


def linear_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x -> module(x)` for a projection without the module-call overhead where the form is known.

    - `nn.Linear` (also with a torchao tensor-subclass weight, which `F.linear` dispatches): `F.linear(x, weight)`;
    - a `torch.ao` dynamic-quantized Linear: the quantized op its `forward` calls, with the same arguments;
    - anything else: the module itself (correct, just slower).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    packed = getattr(getattr(module, "_packed_params", None), "_packed_params", None)
    if (
        packed is not None
        and type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")
        and module._packed_params.dtype == torch.qint8
    ):
        # the same call as torch/ao/nn/quantized/dynamic/modules/linear.py Linear.forward (version >= 4)
        reduce_range = not (module.version is None or module.version < 4)
        op = torch.ops.quantized.linear_dynamic
        return lambda x: op(x, packed, reduce_range=reduce_range)
    return module
