"""The torch references: batched attention against the one-sequence-at-a-time oracle, and the quantized
weight layouts against what kvpilot.runtime.memory.quantization counts. No Triton here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import assert_close, make_paged_kv

from kvpilot.kernels import quant_reference as qr
from kvpilot.kernels import reference as ref
from kvpilot.runtime.memory import quantization

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float16, torch.float8_e4m3fn)], ids=["fp32", "bf16", "fp8kv"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_batched_decode_matches_oracle(dtype, kv_dtype, heads, kv_heads):
    lens = [0, 1, 7, 8, 9, 40]
    kv = make_paged_kv(lens, kv_heads, 32, 8, dtype, CPU, kv_dtype=kv_dtype)
    query = torch.randn(len(lens), heads, 32).to(dtype)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.2, kv.k_scale, kv.v_scale)
    # bf16 / fp16 caches: SDPA runs in their dtype (as HF's does), the oracle in fp32
    assert_close(ref.paged_attention_decode_ref(*args), ref.paged_attention_decode_naive(*args), dtype)


@pytest.mark.parametrize("q_lens,context_lens", [([3, 9, 1], [3, 9, 1]), ([2, 5, 1, 4], [30, 5, 17, 12]),
                                                 ([0, 4], [6, 4]), ([40], [40])],
                         ids=["prefill", "chunked", "empty-chunk", "many-blocks"])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float16, torch.float8_e4m3fn)], ids=["fp32", "bf16", "fp8kv"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_batched_prefill_matches_oracle(q_lens, context_lens, dtype, kv_dtype, heads, kv_heads):
    kv = make_paged_kv(context_lens, kv_heads, 32, 8, dtype, CPU, kv_dtype=kv_dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(q_lens), heads, 32).to(dtype)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, 0.2, kv.k_scale, kv.v_scale)
    # bf16 / fp16 caches: SDPA runs in their dtype (as HF's does), the oracle in fp32
    assert_close(ref.paged_attention_prefill_ref(*args), ref.paged_attention_prefill_naive(*args), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "k-and-v-interleaved-per-block"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_write_kv_cache_matches_a_per_token_loop(layout, cache_dtype):
    """The flat-slot scatter, padding skipped, fp8 scaled and saturated; also into caches that are strided
    views of a larger pool (blocks and offsets not one axis)."""
    gen = torch.Generator().manual_seed(4)
    num_blocks, block_size, kv_heads, head_dim, tokens = 5, 8, 2, 16, 9
    key = torch.randn(tokens, kv_heads, head_dim, generator=gen) * 100  # past fp8's +-448 once scaled
    value = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[1, 6]] = -1
    if layout == "contiguous":
        k_cache, v_cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=cache_dtype).unbind(0)
    else:
        k_cache, v_cache = torch.zeros(num_blocks, 2, block_size, kv_heads, head_dim, dtype=cache_dtype).unbind(1)
    expected_k, expected_v = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim).unbind(0)
    k_scale, v_scale = (0.1, 0.01) if cache_dtype == torch.float8_e4m3fn else (1.0, 1.0)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            for expected, new, scale in ((expected_k, key, k_scale), (expected_v, value, v_scale)):
                stored = (new[token] / scale).clamp(-448, 448) if cache_dtype == torch.float8_e4m3fn else new[token]
                expected[slot // block_size, slot % block_size] = stored.to(cache_dtype).float()
    ref.write_kv_cache_ref(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    assert torch.equal(k_cache.float(), expected_k) and torch.equal(v_cache.float(), expected_v)


def test_int4_nibble_order_and_layout():
    w = torch.tensor([[0.0, 15.0] * 64 + [15.0, 0.0] * 64])  # one row, two groups of 128
    q = qr.quantize_int4(w, 128, torch.bfloat16)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (1, 128)
    assert q.scale.shape == q.zero.shape == (1, 2) and q.scale.dtype == q.zero.dtype == torch.bfloat16
    assert q.qweight[0, 0].item() == 0xF0 and q.qweight[0, 64].item() == 0x0F  # even k in the low nibble
    torch.testing.assert_close(qr.dequantize(q), w)


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("compute", ["bf16", "fp16"])
@pytest.mark.parametrize("n,k", [(48, 256), (7, 300), (5, 129)])
def test_bytes_match_the_memory_model(mode, compute, n, k):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[compute]
    weight = torch.randn(n, k)
    q = {"int8": lambda: qr.quantize_int8(weight, dtype), "int4": lambda: qr.quantize_int4(weight, 128, dtype),
         "fp8": lambda: qr.quantize_fp8(weight)}[mode]()
    expected = quantization.linear_bytes(n, k, quantization.QUANT_MODES[mode], quantization.DTYPE_BYTES[compute])
    assert q.nbytes == expected
    assert qr.INT4_GROUP_SIZE == quantization.INT4_GROUP_SIZE


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), k=st.integers(1, 300), mode=st.sampled_from(["int8", "int4", "fp8"]),
       seed=st.integers(0, 2**16))
def test_dequantized_error_is_bounded(n, k, mode, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    if mode == "int8":
        q = qr.quantize_int8(w, torch.float32)
        bound = q.scale.unsqueeze(1) * 0.5001
    elif mode == "int4":
        q = qr.quantize_int4(w, 128, torch.float32)
        bound = q.scale.repeat_interleave(128, dim=1)[:, :k] * 0.5001
    else:
        q = qr.quantize_fp8(w)
        bound = w.abs() * 2.0**-4 + q.scale.unsqueeze(1) * 2.0**-9  # half an e4m3 step, subnormals included
    assert ((qr.dequantize(q) - w).abs() <= bound + 1e-6).all()


@pytest.mark.parametrize("bad,message", [
    (lambda w: qr.QuantizedWeight("int2", w.qweight, w.scale, 64), "mode 'int2' is not one of"),
    (lambda w: qr.QuantizedWeight("int8", w.qweight, w.scale, 65), "needs 65"),
    (lambda w: qr.QuantizedWeight("int8", w.qweight, w.scale[:3], 64), r"scale must be \[4\]"),
    (lambda w: qr.QuantizedWeight("fp8", w.qweight, w.scale, 64), "fp8 qweight must be a 2-D"),
])
def test_quantized_weight_validates(bad, message):
    w = qr.quantize_int8(torch.randn(4, 64))
    with pytest.raises(ValueError, match=message):
        bad(w)


def test_per_step_memo_keeps_each_window_groups_layout():
    """A hybrid-window model's layers alternate two groups' metadata tensors: each is derived once per
    step, not once per layer; a tensor edited in place is derived anew."""
    memo, builds = ref._PerStep(), []
    full, windowed = torch.tensor([[0, 1]]), torch.tensor([[2, 3]])

    def layer(table: torch.Tensor, window: int | None) -> int:
        return memo.get((table,), (window,), lambda: builds.append(window) or len(builds))

    firsts = [layer(full, None), layer(windowed, 8)]
    for _ in range(5):  # the other layers of the step
        assert [layer(full, None), layer(windowed, 8)] == firsts
    assert builds == [None, 8]
    full[0, 0] = 5  # in place: the version counter moves
    layer(full, None)
    assert builds == [None, 8, None]


@pytest.mark.parametrize("query,cache,softcap,expected", [
    (torch.bfloat16, torch.bfloat16, None, torch.bfloat16),  # SDPA in bf16, as HF's: no fp32 copy of K/V
    (torch.float16, torch.float16, None, torch.float16),
    (torch.float32, torch.float32, None, torch.float32),
    (torch.bfloat16, torch.float8_e4m3fn, None, torch.float32),  # fp8 is scaled back up in fp32
    (torch.bfloat16, torch.bfloat16, 50.0, torch.float32),  # soft-capping's scores come from a plain matmul
], ids=["bf16", "fp16", "fp32", "fp8kv", "softcap"])
def test_attention_runs_in_the_cache_dtype_where_the_query_shares_it(query, cache, softcap, expected):
    q, k_cache = torch.zeros(1, 1, 8, dtype=query), torch.zeros(1, 16, 1, 8, dtype=cache)
    assert ref.compute_dtype(q, k_cache, softcap) == expected
