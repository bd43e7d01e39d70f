"""Sliding-window attention and Gemma 2's score capping, in both attention kernels: the batched torch
references against the per-sequence oracle, and the Triton kernels (interpreter on CPU, CUDA on a
GPU) against the references. Windows shorter than, equal to and longer than the contexts; chunks
after a cached prefix; decode splits."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, make_paged_kv

from kvpilot.kernels.paged_attention_decode import paged_attention_decode
from kvpilot.kernels.paged_attention_prefill import paged_attention_prefill
from kvpilot.kernels.reference import (
    paged_attention_decode_naive,
    paged_attention_decode_ref,
    paged_attention_prefill_naive,
    paged_attention_prefill_ref,
)

CONTEXTS = [1, 7, 16, 40, 73]
Q_LENS = [1, 7, 5, 40, 20]  # whole prompts, and chunks after a cached prefix
OPTIONS = [{"window": 4}, {"window": 16}, {"window": 100}, {"softcap": 5.0}, {"window": 9, "softcap": 2.0}]


def _prefill_args(device, dtype=torch.float32):
    kv = make_paged_kv(CONTEXTS, 2, 32, 16, dtype, device)
    cu = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    query = torch.randn(sum(Q_LENS), 8, 32, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
    return query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, 32**-0.5


def _decode_args(device, dtype=torch.float32):
    kv = make_paged_kv(CONTEXTS, 2, 32, 16, dtype, device)
    query = torch.randn(len(CONTEXTS), 8, 32, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    return query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 32**-0.5


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_references_equal_the_oracle(options):
    cpu = torch.device("cpu")
    args = _prefill_args(cpu)
    torch.testing.assert_close(paged_attention_prefill_ref(*args, **options),
                               paged_attention_prefill_naive(*args, **options), atol=1e-5, rtol=1e-5)
    args = _decode_args(cpu)
    torch.testing.assert_close(paged_attention_decode_ref(*args, **options),
                               paged_attention_decode_naive(*args, **options), atol=1e-5, rtol=1e-5)


def test_a_window_changes_the_result_only_past_it():
    args = _decode_args(torch.device("cpu"))
    plain = paged_attention_decode_ref(*args)
    windowed = paged_attention_decode_ref(*args, window=16)
    short = args[4] <= 16  # contexts within the window see everything either way
    torch.testing.assert_close(windowed[short], plain[short])
    assert not torch.allclose(windowed[~short], plain[~short])


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_triton_prefill(device, options):
    args = _prefill_args(device)
    assert_close(paged_attention_prefill(*args, **options), paged_attention_prefill_ref(*args, **options),
                 torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_triton_decode(device, options, num_splits):
    args = _decode_args(device)
    assert_close(paged_attention_decode(*args, num_splits=num_splits, **options),
                 paged_attention_decode_ref(*args, **options), torch.float32)


def _with_freed_blocks(args: tuple, first_queries: list[int], window: int, poison: float) -> tuple:
    """`args` as the engine's windowed layers see them: every table entry wholly before the window of a
    sequence's first query points at one extra block (the engine's FREED_BLOCK) holding `poison`."""
    query, k_cache, v_cache, tables, *rest = args
    block_size, freed = k_cache.shape[1], k_cache.shape[0]
    k_cache = torch.cat((k_cache, torch.full_like(k_cache[:1], poison)))
    v_cache = torch.cat((v_cache, torch.full_like(v_cache[:1], poison)))
    tables = tables.clone()
    for i, first in enumerate(first_queries):
        outside = max(0, first - window + 1) // block_size
        tables[i, :outside] = freed
    return (query, k_cache, v_cache, tables, *rest)


@pytest.mark.parametrize("window", [4, 9, 16])
def test_blocks_behind_the_window_are_never_read(device, window):
    """The block manager frees a windowed layer's blocks wholly behind the window of its next query.
    The Triton kernels never load them (NaN there changes nothing); the references gather them and
    mask them out (any finite value there changes nothing: the engine's pool is zeroed, then written
    with K/V only)."""
    cpu = torch.device("cpu")
    prefill, decode = _prefill_args(cpu), _decode_args(cpu)
    firsts = [n - q for n, q in zip(CONTEXTS, Q_LENS, strict=True)]
    want_prefill = paged_attention_prefill_ref(*prefill, window=window)
    want_decode = paged_attention_decode_ref(*decode, window=window)
    assert any(max(0, f - window + 1) >= 16 for f in firsts)  # some chunk has a block behind its window

    finite_prefill = _with_freed_blocks(prefill, firsts, window, 1e4)
    finite_decode = _with_freed_blocks(decode, [n - 1 for n in CONTEXTS], window, 1e4)
    torch.testing.assert_close(paged_attention_prefill_ref(*finite_prefill, window=window), want_prefill)
    torch.testing.assert_close(paged_attention_decode_ref(*finite_decode, window=window), want_decode)

    nan_prefill = [t.to(device) if isinstance(t, torch.Tensor) else t
                   for t in _with_freed_blocks(prefill, firsts, window, float("nan"))]
    nan_decode = [t.to(device) if isinstance(t, torch.Tensor) else t
                  for t in _with_freed_blocks(decode, [n - 1 for n in CONTEXTS], window, float("nan"))]
    assert_close(paged_attention_prefill(*nan_prefill, window=window), want_prefill.to(device), torch.float32)
    for num_splits in (1, 3):
        assert_close(paged_attention_decode(*nan_decode, num_splits=num_splits, window=window),
                     want_decode.to(device), torch.float32)
