"""Prefill attention (packed, causal, over the paged cache): the Triton kernel against the torch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, assert_close, make_paged_kv

from kvpilot.kernels.paged_attention_prefill import paged_attention_prefill
from kvpilot.kernels.reference import paged_attention_prefill_ref

FP8 = torch.float8_e4m3fn


def plain_prefill(block_size: int) -> tuple[list[int], list[int]]:
    """(query lengths, context lengths): whole prompts of 1, block-1, block, block+1 and 2 blocks + 3 tokens."""
    lens = [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 3]
    return lens, lens


CHUNKED = ([5, 17, 1, 9], [40, 33, 21, 9])  # chunks after a cached prefix, a decode-like chunk, a plain one


def run_case(paged_kv, close, device, *, heads: int, kv_heads: int, head_dim: int, block_size: int,
             dtype: torch.dtype, q_lens: list[int], context_lens: list[int], kv_dtype: torch.dtype | None = None,
             block_m: int | None = None, block_n: int | None = None) -> None:
    kv = paged_kv(context_lens, kv_heads, head_dim, block_size, dtype, kv_dtype=kv_dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    query = torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(7))
    query = query.to(dtype).to(device)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, head_dim**-0.5,
            kv.k_scale, kv.v_scale)
    expected = paged_attention_prefill_ref(*args)
    actual = paged_attention_prefill(*args, block_m=block_m, block_n=block_n)
    assert actual.dtype == dtype and actual.shape == query.shape
    close(actual, expected, dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_plain_prefill_gqa_and_block_sizes(paged_kv, close, device, heads, kv_heads, block_size):
    q_lens, context_lens = plain_prefill(block_size)
    run_case(paged_kv, close, device, heads=heads, kv_heads=kv_heads, head_dim=64, block_size=block_size,
             dtype=torch.float32, q_lens=q_lens, context_lens=context_lens)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_chunked_prefill_head_dims_and_dtypes(paged_kv, close, device, head_dim, dtype):
    run_case(paged_kv, close, device, heads=4, kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype,
             q_lens=CHUNKED[0], context_lens=CHUNKED[1])


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32), (64, 32)])
def test_tile_sizes(paged_kv, close, device, block_m, block_n):
    run_case(paged_kv, close, device, heads=8, kv_heads=2, head_dim=96, block_size=8, dtype=torch.float16,
             q_lens=CHUNKED[0], context_lens=CHUNKED[1], block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp8_kv_cache(paged_kv, close, device, dtype):
    run_case(paged_kv, close, device, heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
             q_lens=CHUNKED[0], context_lens=CHUNKED[1], kv_dtype=FP8)


def test_gqa_wider_than_the_row_tile(paged_kv, close, device):
    """32 query heads on one KV head: the group alone fills more than a 16-row tile."""
    run_case(paged_kv, close, device, heads=32, kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32,
             q_lens=[3, 6], context_lens=[3, 20], block_m=16)


@pytest.mark.parametrize("block_m", [16, 32])
def test_gqa_5_rows_packed_without_padding(paged_kv, close, device, block_m):
    """GQA 5 (Qwen2.5-14B/32B): a 16-row tile holds 3 tokens x 5 heads, a 32-row one 6 x 5; tokens
    straddle tile edges in both."""
    run_case(paged_kv, close, device, heads=10, kv_heads=2, head_dim=64, block_size=8, dtype=torch.float16,
             q_lens=[7, 13], context_lens=[7, 20], block_m=block_m)


def test_empty_chunk_in_the_batch(paged_kv, close, device):
    run_case(paged_kv, close, device, heads=4, kv_heads=2, head_dim=64, block_size=8, dtype=torch.float32,
             q_lens=[4, 0, 3], context_lens=[4, 9, 12])


def test_strided_query_and_block_table_views(paged_kv, close, device):
    """A query sliced out of a fused qkv tensor and a block table that is a column slice of a wider one."""
    q_lens, context_lens = CHUNKED
    kv = paged_kv(context_lens, 2, 64, 16, torch.float16)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    qkv = torch.randn(sum(q_lens), 8 + 2 * 2, 64, device=device).half()
    query = qkv[:, :8]
    blocks = kv.block_tables.shape[1]
    wide = torch.full((len(q_lens), blocks + 5), 3, dtype=torch.int32, device=device)
    wide[:, :blocks] = kv.block_tables
    table = wide[:, :blocks]
    assert not query.is_contiguous() and not table.is_contiguous()
    expected = paged_attention_prefill_ref(query.contiguous(), kv.k_cache, kv.v_cache, kv.block_tables, cu,
                                           kv.context_lens, 0.125)
    close(paged_attention_prefill(query, kv.k_cache, kv.v_cache, table, cu, kv.context_lens, 0.125), expected,
          torch.float16)


def test_causality(paged_kv, device):
    """Changing the cache after a query's position does not change that query's output."""
    kv = paged_kv([24], 1, 64, 8, torch.float32)
    cu = torch.tensor([0, 24], dtype=torch.int32, device=device)
    query = torch.randn(24, 2, 64, device=device)
    before = paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, 0.125)
    last_block = kv.block_tables[0, 2].long()
    kv.k_cache[last_block] += 5.0  # positions 16..23
    kv.v_cache[last_block] -= 5.0
    after = paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, 0.125)
    assert torch.equal(before[:16], after[:16])
    assert not torch.allclose(before[16:], after[16:])


@pytest.mark.parametrize("change,message", [
    ({"head_dim": 300}, "head_dim 300 is not supported"),
    ({"heads": 6}, "6 query heads are not a multiple of 4 KV heads"),
    ({"cu_len": 2}, "need cu_seqlens_q of 3"),
    ({"block_m": 24}, "block_m 24 must be a power of two"),
    ({"context_len": 17}, "context length 17 exceeds block_tables capacity 2 blocks x 8"),
])
def test_unsupported_inputs_name_the_limit(device, change, message):
    head_dim = change.get("head_dim", 64)
    query = torch.zeros(3, change.get("heads", 8), head_dim, device=device)
    cache = torch.zeros(4, 8, 4, head_dim, device=device)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    cu = torch.tensor([0, 1, 3][: change.get("cu_len", 3)], dtype=torch.int32, device=device)
    lens = torch.tensor([2, change.get("context_len", 2)], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=message):
        paged_attention_prefill(query, cache, cache, tables, cu, lens, 1.0, block_m=change.get("block_m"))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(chunks=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), min_size=1, max_size=3),
       block_size=st.sampled_from([8, 16, 32]), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4, 8]),
       head_dim=st.sampled_from([16, 64, 80]), block_m=st.sampled_from([16, 32]),
       kind=st.sampled_from(["fp32", "fp16", "bf16", "fp8"]))
def test_random_shapes(chunks, block_size, kv_heads, group, head_dim, block_m, kind):
    """chunks: (query tokens, cached prefix before them) per sequence."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}[kind]
    device = torch.device(DEVICE)
    q_lens = [q for q, _ in chunks]
    kv = make_paged_kv([q + p for q, p in chunks], kv_heads, head_dim, block_size, dtype, device,
                       kv_dtype=FP8 if kind == "fp8" else None)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    query = torch.randn(sum(q_lens), kv_heads * group, head_dim).to(dtype).to(device)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, head_dim**-0.5, kv.k_scale,
            kv.v_scale)
    assert_close(paged_attention_prefill(*args, block_m=block_m), paged_attention_prefill_ref(*args), dtype)
