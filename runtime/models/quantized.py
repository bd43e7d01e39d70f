"""Weight-only quantized linear layers (int8, int4, fp8), made while the checkpoint loads.

The decoder layers' projections (fused q/k/v, o, fused gate/up, down) are quantized; embeddings,
lm_head, norms and biases stay in the compute dtype: the layout `kvpilot.runtime.memory.quantization`
counts, so the bytes the memory plan predicts are the bytes the model holds. The matmul is
`kvpilot.kernels.ops.quantized_matmul` (Triton on CUDA, the torch reference elsewhere).

A projection's full-precision weight exists only while its shards arrive: the loader leaves the
weights to be quantized on the meta device, materialises one when its first shard comes and
quantizes it as soon as its last one is in. Peak memory is the quantized model plus one fused
projection in the compute dtype, never the unquantized model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kvpilot.kernels import ops
from kvpilot.kernels.quant_reference import QuantizedWeight, quantize_fp8, quantize_int4, quantize_int8
from kvpilot.runtime.memory.quantization import WEIGHT_QUANT_MODES

QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class QuantizedLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = weight
        # Buffers, so that module.to(), state_dict() and the memory report see the quantized tensors.
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("zero", weight.zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def in_features(self) -> int:
        return self.weight.in_features

    @property
    def out_features(self) -> int:
        return self.weight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quantized_matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.mode}, in_features={self.in_features}, out_features={self.out_features}"


def quantizer(mode: str, compute_dtype: torch.dtype) -> Callable[[torch.Tensor], QuantizedWeight]:
    if mode == "int8":
        return lambda w: quantize_int8(w, compute_dtype)
    if mode == "int4":
        return lambda w: quantize_int4(w, compute_dtype=compute_dtype)
    if mode == "fp8":
        return quantize_fp8
    raise ValueError(f"weight quantization {mode!r} is not one of {', '.join(WEIGHT_QUANT_MODES)}")


def quantized_weight_names(model: nn.Module) -> set[str]:
    """The parameter names (`model.layers.N.self_attn.qkv_proj.weight`, ...) that get quantized."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_PROJECTIONS}


def replace_with_quantized(model: nn.Module, weight_name: str, weight: torch.Tensor,
                           quantize: Callable[[torch.Tensor], QuantizedWeight]) -> None:
    """Swap the nn.Linear owning `weight_name` for a QuantizedLinear of `weight` (its full-precision
    values; dropped afterwards)."""
    module_name = weight_name.removesuffix(".weight")
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child)
    if hasattr(quantize, "for_weight"):  # a pre-quantized checkpoint: runtime/loading/prequantized.py
        quantized = quantize.for_weight(weight_name, weight)
        if quantized is None:  # the checkpoint keeps this projection unquantized
            return
    else:
        quantized = quantize(weight)
    setattr(parent, child, QuantizedLinear(quantized, linear.bias))


def weight_quantization(model: nn.Module) -> str | None:
    """The mode of the model's quantized projections; None when they are in the compute dtype."""
    return next((m.weight.mode for m in model.modules() if isinstance(m, QuantizedLinear)), None)
