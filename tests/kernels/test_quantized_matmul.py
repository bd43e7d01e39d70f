"""Weight-only quantized matmul: the Triton kernel against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kvpilot.kernels.quant_reference import quantize_fp8, quantize_int4, quantize_int8, quantized_matmul_ref
from kvpilot.kernels.quantized_matmul import (
    MAX_SPLIT_K,
    choose_split_k,
    int4_to_float,
    matmul_config,
    quantized_matmul,
)

QUANTIZERS = {
    "int8": lambda w, dtype: quantize_int8(w, dtype),
    "int4": lambda w, dtype: quantize_int4(w, 128, dtype),
    "fp8": lambda w, dtype: quantize_fp8(w),
}
# relative to max |y|: the kernel and the reference differ only in summation order and in where
# the product is rounded to the activation dtype
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(x: torch.Tensor, weight, expected: torch.Tensor, **kwargs) -> None:
    actual = quantized_matmul(x, weight, **kwargs)
    assert actual.dtype == x.dtype and actual.shape == expected.shape
    err = (actual.float() - expected.float()).abs().max() / expected.float().abs().max()
    assert err <= REL_TOL[x.dtype], f"relative error {err.item():.2e}"


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 40, 256), (5, 33, 300), (33, 20, 257)],
                         ids=["m1", "m5-partial-group", "m33-odd-k"])
def test_modes_dtypes_shapes(device, mode, dtype, m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    weight = QUANTIZERS[mode](torch.randn(n, k, generator=gen), dtype).to(device)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    check(x, weight, quantized_matmul_ref(x, weight), split_k=1)


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("split_k", [2, 3, None])
def test_split_k(device, mode, split_k):
    gen = torch.Generator().manual_seed(5)
    weight = QUANTIZERS[mode](torch.randn(24, 520, generator=gen), torch.float16).to(device)
    x = torch.randn(3, 520, generator=gen).half().to(device)
    check(x, weight, quantized_matmul_ref(x, weight), split_k=split_k)


@pytest.mark.parametrize("block_k", [32, 64, 128])
def test_int4_k_tiles_inside_one_group(device, block_k):
    gen = torch.Generator().manual_seed(6)
    weight = quantize_int4(torch.randn(20, 384, generator=gen), 128, torch.float16).to(device)
    x = torch.randn(2, 384, generator=gen).half().to(device)
    check(x, weight, quantized_matmul_ref(x, weight), split_k=2, block_k=block_k)


def test_batched_input_and_bias(device):
    gen = torch.Generator().manual_seed(8)
    weight = quantize_int8(torch.randn(24, 64, generator=gen), torch.float32).to(device)
    x = torch.randn(2, 3, 64, generator=gen).to(device)
    bias = torch.randn(24, generator=gen).to(device)
    out = quantized_matmul(x, weight, bias)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, quantized_matmul_ref(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_close_to_the_unquantized_matmul(device):
    """End to end, the quantized product stays near x @ W^T (the quantizers are not just self-consistent)."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(32, 256, generator=gen)
    x = torch.randn(4, 256, generator=gen)
    exact = x @ w.t()
    # RMS error over RMS output; round-to-nearest int4 on Gaussian weights lands near 0.1
    for mode, bound in (("int8", 0.01), ("fp8", 0.05), ("int4", 0.15)):
        out = quantized_matmul(x.to(device), QUANTIZERS[mode](w, torch.float32).to(device)).cpu()
        assert (out - exact).norm() / exact.norm() < bound, mode


def test_split_k_heuristic():
    decode = matmul_config(1, torch.device("cuda"))
    assert choose_split_k(1, 14336, 4096, decode, 132) == 2  # 224 output tiles: 448 programs cover 132 SMs twice
    assert choose_split_k(1, 4096, 14336, decode, 132) == 5  # 64 tiles: split the long K
    assert choose_split_k(1024, 14336, 4096, matmul_config(1024, torch.device("cuda")), 132) == 1
    assert choose_split_k(1, 64, 1 << 20, decode, 132) == MAX_SPLIT_K


@pytest.mark.parametrize("change,message", [
    ({"k": 100}, "x has 100 input features, the weight 256"),
    ({"block_k": 256}, "int4 K tile 256 must be >= 32 and divide the group size 128"),
    ({"split_k": MAX_SPLIT_K + 1}, f"split_k {MAX_SPLIT_K + 1} is not in 1..{MAX_SPLIT_K}"),
    ({"dtype": torch.float64}, "x dtype torch.float64 is not one of"),
])
def test_bad_inputs_name_the_limit(device, change, message):
    weight = quantize_int4(torch.randn(8, 256), 128, torch.float32).to(device)
    x = torch.zeros(2, change.get("k", 256), dtype=change.get("dtype", torch.float32), device=device)
    with pytest.raises(ValueError, match=message):
        quantized_matmul(x, weight, split_k=change.get("split_k"), block_k=change.get("block_k"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int4_bit_trick_conversion_is_exact(device, dtype):
    """int4_to_float gives every nibble exactly (fp16: OR into the mantissa of 1024, then subtract)."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("the interpreter converts integers to bf16 wrongly (and the kernel upcasts bf16 there)")
    @triton.jit  # decorated here, where the kernel tests' environment asks for the interpreter on the CPU
    def convert(q_ptr, out_ptr, DTYPE: tl.constexpr):
        offsets = tl.arange(0, 16)
        tl.store(out_ptr + offsets, int4_to_float(tl.load(q_ptr + offsets), DTYPE))

    q = torch.arange(16, dtype=torch.uint8, device=device)
    out = torch.empty(16, dtype=dtype, device=device)
    convert[(1,)](q, out, DTYPE={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                                 torch.float32: tl.float32}[dtype])
    assert out.cpu().tolist() == list(range(16)) and out.dtype == dtype


def test_split_k_epilogue_is_fused_and_deterministic(device):
    """Split-K with a bias: one launch writes y (the last split of a tile sums the partials in split
    order), and two runs give the same bits."""
    gen = torch.Generator().manual_seed(12)
    weight = quantize_int8(torch.randn(40, 512, generator=gen), torch.float16).to(device)
    x = torch.randn(2, 512, generator=gen).half().to(device)
    bias = torch.randn(40, generator=gen).half().to(device)
    first = quantized_matmul(x, weight, bias, split_k=4, block_k=32)
    expected = quantized_matmul_ref(x, weight, bias)
    assert (first.float() - expected.float()).abs().max() <= 2e-3 * expected.float().abs().max()
    assert torch.equal(first, quantized_matmul(x, weight, bias, split_k=4, block_k=32))
