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
