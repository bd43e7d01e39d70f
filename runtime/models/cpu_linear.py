"""oneDNN-prepacked linear layers for the CPU engine, swapped in once the weights are loaded.

`F.linear` on the CPU hands oneDNN / MKL the weight in its row-major layout on every call; oneDNN
packs a weight once into its own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) and
then multiplies with it as it stands (`torch.ops.mkldnn._linear_pointwise`). Measured on a 2-core
AVX-512 / AMX Xeon, one thread, SmolLM2-135M's shapes at 32 rows (a decode step of 32 sequences):
15-30% less time per fp32 matmul (lm_head-sized 45 -> 30 ms), 10-20% per bf16 one; equal at 256
rows; at one row fp32 is up to 20% slower, a batch a busy server rarely runs.

Packed: the decoder's dense projections (q/k/v, o, gate/up, down) and an lm_head of its own, in
fp32, or bf16 where oneDNN has bf16 kernels, when both dimensions are multiples of `BLOCK`: the
blocked layout then holds the weight's own bytes, no padding (measured: the process grows by the
weight's bytes), so the bytes the memory plan counts are the bytes held. Left as they are: a tied
lm_head (it is the embedding: a packed copy would hold it twice), MoE experts (stacked for
`fused_moe`), quantized projections (`QuantizedLinear`), fp16, and any model not on the CPU.
A packed weight is an opaque tensor: it stays on the CPU and has no storage to share.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpilot.runtime.models.compiled import register_packed_weight

PACKED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
BLOCK = 64  # oneDNN's widest weight block on AVX-512 / AMX: dims that are multiples of it need no padding
BATCH_HINT = 32  # the rows oneDNN picks its blocked layout for: a decode step of a full batch


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, weight.dtype
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        # a buffer: the memory report's weight count and state_dict() see it (runtime/loading/loader.py)
        self.register_buffer("packed_weight", packed)
        self.bias = linear.bias
        self.handle = register_packed_weight(packed)  # how a compiled graph names it (models/compiled.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.kvpilot.packed_linear(x, self.handle, self.bias, self.out_features)
        if x.dtype != self.dtype:
            raise TypeError(f"PackedLinear holds {self.dtype} weights, the input is {x.dtype}")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def unpacked(self) -> nn.Linear:
        """The plain nn.Linear of the same weight (row-major again)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.dtype,
                           device="meta")
        linear.weight = nn.Parameter(self.packed_weight.to_dense(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, oneDNN-packed"


def packable(linear: nn.Module) -> bool:
    if type(linear) is not nn.Linear or linear.weight.device.type != "cpu":
        return False
    dtype = linear.weight.dtype
    supported = dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return (supported and torch.backends.mkldnn.is_available()
            and linear.in_features % BLOCK == 0 and linear.out_features % BLOCK == 0)


def pack_cpu_linears(model: nn.Module) -> int:
    """Swap every packable dense projection (and an own lm_head) of `model` for a PackedLinear;
    returns how many were swapped. A mixture of experts' routed experts are left alone."""
    targets = [name for name, module in model.named_modules()
               if (name.rsplit(".", 1)[-1] in PACKED_PROJECTIONS or name == "lm_head")
               and "experts" not in name.split(".") and packable(module)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(getattr(parent, child)))
    return len(targets)



def unpack_cpu_linears(module: nn.Module) -> None:
    """Swap `module`'s PackedLinears back for plain nn.Linear (a layer whose tensors must be strided: the
    weight streamer packs them into its host store byte for byte)."""
    for name, child in list(module.named_modules()):
        if isinstance(child, PackedLinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, child.unpacked())
