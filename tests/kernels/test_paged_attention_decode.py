"""Decode attention: the Triton kernel (interpreted on CPU, compiled on CUDA) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, assert_close, make_paged_kv

from kvpilot.kernels.paged_attention_decode import (
    MAX_BLOCK_H,
    MAX_GROUP,
    MAX_SPLITS,
    choose_splits,
    paged_attention_decode,
)
from kvpilot.kernels.reference import paged_attention_decode_ref

FP8 = torch.float8_e4m3fn


def ragged_lens(block_size: int) -> list[int]:
    """One token, a block minus one, a block, a block plus one, many blocks."""
    return [1, block_size - 1, block_size, block_size + 1, 4 * block_size + 3]


def run_case(paged_kv, close, device, *, heads: int, kv_heads: int, head_dim: int, block_size: int,
             dtype: torch.dtype, kv_dtype: torch.dtype | None = None, num_splits: int | None = None,
             lens: list[int] | None = None, seed: int = 0) -> None:
    lens = lens if lens is not None else ragged_lens(block_size)
    kv = paged_kv(lens, kv_heads, head_dim, block_size, dtype, kv_dtype=kv_dtype, seed=seed)
    query = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(seed + 1))
    query = query.to(dtype).to(device)
    scale = head_dim**-0.5
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, kv.k_scale, kv.v_scale)
    expected = paged_attention_decode_ref(*args)
    actual = paged_attention_decode(*args, num_splits=num_splits)
    assert actual.dtype == dtype and actual.shape == query.shape
    close(actual, expected, dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_gqa_ratios_and_block_sizes(paged_kv, close, device, heads, kv_heads, block_size):
    run_case(paged_kv, close, device, heads=heads, kv_heads=kv_heads, head_dim=64, block_size=block_size,
             dtype=torch.float32)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_head_dims_and_dtypes(paged_kv, close, device, head_dim, dtype):
    run_case(paged_kv, close, device, heads=4, kv_heads=2, head_dim=head_dim, block_size=16, dtype=dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_counts(paged_kv, close, device, num_splits, dtype):
    # 5 splits over these lengths leaves some splits of the short sequences empty
    run_case(paged_kv, close, device, heads=8, kv_heads=2, head_dim=80, block_size=8, dtype=dtype,
             num_splits=num_splits, lens=[1, 7, 60, 97])


@pytest.mark.parametrize("num_splits", [1, 2])
def test_group_wider_than_one_head_tile(paged_kv, close, device, num_splits):
    """80 query heads on one KV head: two head tiles of MAX_BLOCK_H rows, the second one partly masked."""
    assert MAX_BLOCK_H < 80
    run_case(paged_kv, close, device, heads=80, kv_heads=1, head_dim=64, block_size=16, dtype=torch.float16,
             num_splits=num_splits, lens=[5, 40])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_kv_cache(paged_kv, close, device, dtype, num_splits):
    run_case(paged_kv, close, device, heads=8, kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
             kv_dtype=FP8, num_splits=num_splits)


def test_empty_sequence_gives_zeros(paged_kv, device):
    kv = paged_kv([0, 5, 0], 2, 64, 8, torch.float32)
    query = torch.randn(3, 4, 64, device=device)
    out = paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125,
                                 num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert out[1].abs().sum() > 0


def test_strided_query_and_block_table_views(paged_kv, close, device):
    """A query sliced out of a fused qkv tensor and a block table that is a column slice of a wider one."""
    kv = paged_kv(ragged_lens(16), 2, 64, 16, torch.float16)
    qkv = torch.randn(5, 8 + 2 * 2, 64, device=device).half()
    query = qkv[:, :8]
    wide = torch.full((5, kv.block_tables.shape[1] + 7), 3, dtype=torch.int32, device=device)
    wide[:, : kv.block_tables.shape[1]] = kv.block_tables
    table = wide[:, : kv.block_tables.shape[1]]
    assert not query.is_contiguous() and not table.is_contiguous()
    expected = paged_attention_decode_ref(query.contiguous(), kv.k_cache, kv.v_cache, kv.block_tables,
                                          kv.context_lens, 0.125)
    close(paged_attention_decode(query, kv.k_cache, kv.v_cache, table, kv.context_lens, 0.125), expected,
          torch.float16)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_low_max_context_len_hint_loses_nothing(paged_kv, close, device, num_splits):
    """The last split runs to each sequence's end even when the hint undersizes the splits."""
    kv = paged_kv([1, 30, 97], 2, 64, 8, torch.float32)
    query = torch.randn(3, 4, 64, device=device)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125)
    close(paged_attention_decode(*args, max_context_len=20, num_splits=num_splits),
          paged_attention_decode_ref(*args), torch.float32)


def test_split_heuristic():
    # one long sequence on a 132-SM GPU is split; a full batch is not; short contexts are never split
    assert choose_splits(1, 8, 65536, 64, 132) == (32, 2048)  # 33 wanted, rounded to whole tiles
    assert choose_splits(256, 8, 65536, 64, 132) == (1, 65536)
    assert choose_splits(1, 8, 200, 64, 132)[0] == 1
    splits, per_split = choose_splits(2, 8, 1 << 20, 64, 132)
    assert splits <= MAX_SPLITS and splits * per_split >= 1 << 20 and per_split % 64 == 0


@pytest.mark.parametrize("change,message", [
    ({"head_dim": 512}, "head_dim 512 is not supported"),
    ({"heads": 6}, "6 query heads are not a multiple of 4 KV heads"),
    ({"heads": 4 * (MAX_GROUP + 1)}, f"{MAX_GROUP + 1} query heads per KV head exceeds {MAX_GROUP}"),
    ({"cache_dtype": torch.bfloat16}, "caches must both be"),
    ({"num_splits": MAX_SPLITS + 1}, f"not in 1..{MAX_SPLITS}"),
    ({"max_context_len": 10_000}, "exceeds block_tables capacity"),
    ({"lens_dtype": torch.int64}, "context_lens must be a 1-D tensor of torch.int32, got torch.int64"),
])
def test_unsupported_inputs_name_the_limit(device, change, message):
    head_dim = change.get("head_dim", 64)
    query = torch.zeros(2, change.get("heads", 8), head_dim, device=device)
    cache = torch.zeros(4, 8, 4, head_dim, device=device, dtype=change.get("cache_dtype", torch.float32))
    tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    lens = torch.ones(2, dtype=change.get("lens_dtype", torch.int32), device=device)
    with pytest.raises(ValueError, match=message):
        paged_attention_decode(query, cache, cache, tables, lens, 1.0, num_splits=change.get("num_splits"),
                               max_context_len=change.get("max_context_len"))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(lens=st.lists(st.integers(0, 70), min_size=1, max_size=4), block_size=st.sampled_from([8, 16, 32]),
       kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4, 8]),
       head_dim=st.sampled_from([16, 48, 64, 80, 112]), num_splits=st.sampled_from([None, 1, 2, 4]),
       kind=st.sampled_from(["fp32", "fp16", "bf16", "fp8"]))
def test_random_shapes(lens, block_size, kv_heads, group, head_dim, num_splits, kind):
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float16}[kind]
    device = torch.device(DEVICE)
    kv = make_paged_kv(lens, kv_heads, head_dim, block_size, dtype, device, seed=sum(lens),
                       kv_dtype=FP8 if kind == "fp8" else None)
    query = torch.randn(len(lens), kv_heads * group, head_dim).to(dtype).to(device)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, head_dim**-0.5, kv.k_scale, kv.v_scale)
    assert_close(paged_attention_decode(*args, num_splits=num_splits), paged_attention_decode_ref(*args), dtype)
