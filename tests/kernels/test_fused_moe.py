"""The fused mixture-of-experts kernel (two grouped GEMMs over tokens sorted by expert) against the
torch reference and the token-by-token oracle, over irregular shapes, expert counts and top-k."""

from __future__ import annotations

import pytest
import torch

from kvpilot.kernels import ops
from kvpilot.kernels.fused_moe import fused_moe
from kvpilot.kernels.moe_reference import align_by_expert, dequantize_experts, fused_moe_naive, fused_moe_ref
from kvpilot.kernels.quant_reference import quantize_fp8, quantize_int8

REL_TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def routed(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, device, seed: int):
    """Random x and experts, and a softmax router's renormalised top-k (as Mixtral routes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5
    probs = torch.randn(tokens, experts, generator=gen).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 4, 1), (1, 8, 2), (5, 4, 2), (7, 8, 3), (37, 6, 2)],
                         ids=["decode-top1", "decode-top2", "t5-top2", "t7-top3", "t37-top2"])
@pytest.mark.parametrize(("hidden", "inter"), [(64, 96), (48, 40)], ids=["h64-i96", "h48-i40-partial-tiles"])
def test_kernel_matches_the_reference_and_the_oracle(device, tokens, experts, top_k, hidden, inter):
    x, w13, w2, weights, ids = routed(tokens, experts, top_k, hidden, inter, torch.float32, device, tokens + experts)
    actual = fused_moe(x, w13, w2, weights, ids)
    assert actual.shape == x.shape and actual.dtype == x.dtype
    assert relative_error(actual, fused_moe_ref(x, w13, w2, weights, ids)) <= REL_TOL[torch.float32]
    assert relative_error(actual, fused_moe_naive(x, w13, w2, weights, ids)) <= REL_TOL[torch.float32]


def test_fp16_and_a_skewed_router(device):
    """Every token to the same two experts (one block each, the others idle), in fp16."""
    x, w13, w2, weights, _ = routed(9, 5, 2, 64, 32, torch.float16, device, 3)
    ids = torch.tensor([[3, 1]] * 9, device=device)
    assert relative_error(fused_moe(x, w13, w2, weights, ids), fused_moe_naive(x, w13, w2, weights, ids)) \
        <= REL_TOL[torch.float16]


def quantized_experts(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] float experts -> stacked qweight and per-channel scales, each expert as quant_reference
    quantizes one linear."""
    quantize = {"int8": lambda m: quantize_int8(m, torch.float32), "fp8": quantize_fp8}[mode]
    experts = [quantize(e.float().cpu()) for e in w]
    return (torch.stack([e.qweight for e in experts]).to(w.device),
            torch.stack([e.scale for e in experts]).to(w.device))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize(("tokens", "top_k"), [(1, 2), (11, 3)])
def test_int8_and_fp8_experts(device, mode, tokens, top_k):
    """Quantized experts (one scale per output channel) through the same kernel: as the reference of the
    dequantized weights."""
    x, w13, w2, weights, ids = routed(tokens, 5, top_k, 64, 40, torch.float32, device, tokens + 7)
    (q13, s13), (q2, s2) = quantized_experts(w13, mode), quantized_experts(w2, mode)
    actual = fused_moe(x, q13, q2, weights, ids, s13, s2)
    expected = fused_moe_naive(x, dequantize_experts(q13, s13, x.dtype), dequantize_experts(q2, s2, x.dtype),
                               weights, ids)
    assert relative_error(actual, expected) <= REL_TOL[torch.float32]
    assert relative_error(ops.fused_moe(x, q13, q2, weights, ids, s13, s2), expected) <= REL_TOL[torch.float32]
    assert relative_error(actual, fused_moe_naive(x, w13, w2, weights, ids)) < 0.1  # and near the float experts


@pytest.mark.parametrize("block_m", [16, 32])
def test_blocks_larger_than_an_experts_tokens(device, block_m):
    x, w13, w2, weights, ids = routed(20, 4, 2, 32, 48, torch.float32, device, 11)
    expected = fused_moe_ref(x, w13, w2, weights, ids)
    assert relative_error(fused_moe(x, w13, w2, weights, ids, block_m=block_m), expected) <= REL_TOL[torch.float32]


def test_ops_dispatch_gives_the_kernel_or_the_reference(device):
    x, w13, w2, weights, ids = routed(6, 4, 2, 32, 32, torch.float32, device, 5)
    assert relative_error(ops.fused_moe(x, w13, w2, weights, ids), fused_moe_naive(x, w13, w2, weights, ids)) \
        <= REL_TOL[torch.float32]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "block_m"), [(1, 8, 2, 16), (13, 5, 3, 16), (40, 3, 2, 32)])
def test_align_groups_every_copy_once_in_blocks_of_one_expert(tokens, experts, top_k, block_m):
    ids = torch.randint(0, experts, (tokens, top_k), generator=torch.Generator().manual_seed(tokens))
    sorted_ids, expert_ids, num_padded = align_by_expert(ids, experts, block_m)
    copies = tokens * top_k
    used = sorted_ids[: int(num_padded)]
    real = used[used < copies].long()
    assert sorted(real.tolist()) == list(range(copies))  # every routed copy exactly once
    assert int(num_padded) % block_m == 0 and bool((sorted_ids[int(num_padded):] == copies).all())
    for block in range(int(num_padded) // block_m):
        rows = used[block * block_m : (block + 1) * block_m]
        rows = rows[rows < copies].long()
        assert len(rows) > 0 and bool((ids.reshape(-1)[rows] == expert_ids[block]).all())


@pytest.mark.parametrize(("change", "message"), [
    ({"w13": torch.zeros(4, 10, 32)}, "do not fit x's hidden size 32"),
    ({"ids": torch.zeros(6, 3, dtype=torch.int64)}, r"must both be \[6, top_k\]"),
    ({"block_m": 24}, "block_m 24 must be a power of two"),
    ({"w13": torch.zeros(4, 64, 32, dtype=torch.int8)}, "int8 experts need w2 of the same dtype and both scales"),
])
def test_bad_inputs_are_named(device, change, message):
    x, w13, w2, weights, ids = routed(6, 4, 2, 32, 32, torch.float32, device, 5)
    w13 = change.get("w13", w13).to(device)
    ids = change.get("ids", ids).to(device)
    with pytest.raises(ValueError, match=message):
        fused_moe(x, w13, w2, weights, ids, block_m=change.get("block_m"))
