"""oneDNN-packed CPU linears (runtime/models/cpu_linear.py): the same products as nn.Linear, swapped in
at load for the dense projections the blocked layout holds without padding, and counted as the
memory plan counts them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvpilot.runtime.loading.loader import LoadedModel, weight_bytes_held
from kvpilot.runtime.memory.quantization import weight_bytes
from kvpilot.runtime.models.cpu_linear import PackedLinear, pack_cpu_linears

BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                                             reason="oneDNN has no bf16 kernels on this CPU"))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_gives_the_linear_s_products(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(128, 192, bias=bias, dtype=dtype)
    packed = PackedLinear(linear)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # fp32: the accumulation order differs
    with torch.inference_mode():
        for shape in ((1, 128), (7, 128), (32, 128), (2, 5, 128)):
            x = torch.randn(shape, dtype=dtype)
            torch.testing.assert_close(packed(x), linear(x), atol=tolerance, rtol=tolerance)
        with pytest.raises(TypeError, match=r"the input is torch\.float16"):
            packed(torch.randn(3, 128, dtype=torch.float16))


def test_only_unpadded_dense_projections_are_packed():
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.qkv_proj = nn.Linear(128, 192)  # both multiples of 64: packed
    model.attn.o_proj = nn.Linear(96, 128)  # 96: oneDNN would pad it
    model.experts = nn.ModuleList([nn.Module()])
    model.experts[0].gate_up_proj = nn.Linear(128, 256)  # a routed expert: stacked for fused_moe instead
    model.lm_head = nn.Linear(64, 512, dtype=torch.float16)  # fp16: not packed
    assert pack_cpu_linears(model) == 1
    assert isinstance(model.attn.qkv_proj, PackedLinear)
    assert type(model.attn.o_proj) is type(model.experts[0].gate_up_proj) is type(model.lm_head) is nn.Linear


def test_the_loaded_model_runs_packed_and_holds_the_planned_bytes(loaded_model: LoadedModel):
    """The embedded SmolLM2 on the CPU: every decoder projection packed, its tied lm_head left as the
    embedding, and the bytes held (packed ones included) are the plan's."""
    names = {name.rsplit(".", 1)[-1] for name, module in loaded_model.model.named_modules()
             if isinstance(module, PackedLinear)}
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    packed = sum(isinstance(m, PackedLinear) for m in loaded_model.model.modules())
    assert packed == 4 * loaded_model.facts.num_layers
    assert weight_bytes_held(loaded_model.model) == weight_bytes(loaded_model.facts, "fp32", "fp32")
