"""Inductor's paged decode attention (kernels/inductor_decode.py, the compiled CPU decoder's) against
the torch reference: contexts of 1 to 73 tokens in shuffled blocks whose tables are padded with a
block that does not exist, GQA, sliding windows, soft-capping, fp32 and bf16; one graph for every
batch and context length."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, make_paged_kv

from kvpilot.kernels import inductor_decode
from kvpilot.kernels.reference import paged_attention_decode_ref

OPTIONS = [{}, {"window": 4}, {"window": 100}, {"softcap": 5.0}, {"window": 9, "softcap": 2.0}]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _check(contexts: list[int], dtype: torch.dtype, options: dict, heads: int = 8, kv_heads: int = 2) -> None:
    kv = make_paged_kv(contexts, kv_heads, 32, 16, dtype, torch.device("cpu"))
    query = torch.randn(len(contexts), heads, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    slots = inductor_decode.DecodeSlots(kv.block_tables, kv.context_lens, max(contexts), 16, options.get("window"))
    out = inductor_decode.paged_attention_decode(query, kv.k_cache, kv.v_cache, slots, 32**-0.5,
                                                 options.get("softcap"))
    expected = paged_attention_decode_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens,
                                          32**-0.5, **options)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_the_inductor_decode_equals_the_reference(options, dtype):
    _check([1, 7, 16, 40, 73], dtype, options)


def test_one_graph_serves_every_batch_and_context():
    _check([5, 9], torch.float32, {})  # built here (or already, by another test)
    graphs = _graphs()
    for contexts in ([1], [200], [3, 33, 64, 17, 1, 90, 12], [16] * 40):
        _check(contexts, torch.float32, {})
    _check([30, 2], torch.float32, {}, heads=16, kv_heads=4)  # other head counts, the same grouping: the same graph
    assert _graphs() == graphs


def test_without_grouped_query_attention():
    _check([1, 7, 16, 40, 73], torch.float32, {}, heads=4, kv_heads=4)
