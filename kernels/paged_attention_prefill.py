"""Paged attention for prefill: packed variable-length query chunks, causal, over the paged cache.

Shapes: query [total_q, H, D] (the chunks of all sequences, packed) -> out [total_q, H, D];
cu_seqlens_q [num_seqs + 1] int32 (chunk i is query[cu[i]:cu[i+1]]); context_lens [num_seqs] int32;
k_cache/v_cache [num_blocks, block_size, KVH, D] (query's dtype, or float8_e4m3fn with per-tensor
scales); block_tables [num_seqs, max_blocks] int32. The chunk's own K/V are already in the cache,
so chunk i is the last q_len tokens of its context_lens[i]: the query at chunk offset t sits at
position context_len - q_len + t and attends to cache positions 0..that position. This one kernel
serves a plain prefill (prefix 0), chunked prefill and prefix-cache hits.

One program per (sequence, tile of BLOCK_Q query tokens, KV head). The tile's rows are its tokens
times the GROUP query heads of that KV head, packed (BLOCK_Q = BLOCK_M // GROUP tokens, so GQA 5
fills 125 of 128 rows rather than padding each group to 8 heads and wasting 37.5%), so each K/V tile
is read once per group. The query is pre-scaled so scores come out of the dot in log2 units; an fp8
cache is converted to fp16 for fp16 dots (_launch.attention_dot_dtype). It walks the keys in tiles
of BLOCK_N up to the tile's last query position (causal pruning) with an online softmax (base 2),
looking each key's block up in the block table.

Memory traffic: per query tile, the K/V of its causal range: about
sum_i ceil(q_len_i / BLOCK_Q) * context_len_i * KVH * D * 2 * cache element bytes, plus query and
output once each. FLOPs: 4 * D * H * sum over queries of the keys each attends to.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvpilot.kernels import _launch
from kvpilot.kernels.reference import paged_attention_prefill_ref

__all__ = ["paged_attention_prefill", "paged_attention_prefill_ref"]


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr, out_ptr,
    qk_scale_log2, v_scale,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bts, stride_ot, stride_oh, window, softcap_log2,
    GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix = context_len - q_len

    # rows: BLOCK_Q tokens x GROUP heads, packed without padding the group to a power of two
    rows = tl.arange(0, BLOCK_ROWS)
    tokens_q = q_tile * BLOCK_Q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (tokens_q < q_len) & (rows < BLOCK_Q * GROUP)
    positions = prefix + tokens_q
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_offsets = (q_start + tokens_q).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    q = (q.to(tl.float32) * qk_scale_log2).to(DOT)  # scores in log2 units straight out of the dot

    m_i = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_ROWS], tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bts
    k_head = k_cache_ptr + kv_head * stride_kh + dims[None, :]
    v_head = v_cache_ptr + kv_head * stride_vh + dims[None, :]
    end = tl.minimum(context_len, prefix + (q_tile + 1) * BLOCK_Q)  # the tile's last position + 1
    start = 0
    if window > 0:  # sliding window: keys older than the tile's first query's window are never read
        start = tl.maximum(prefix + q_tile * BLOCK_Q - window + 1, 0)
    for tile in range(start, end, BLOCK_N):
        tokens = tile + offs_n
        token_mask = tokens < end
        blocks = tl.load(table + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
        slots = tokens % BLOCK_SIZE
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_head + blocks[:, None] * stride_kb + slots[:, None] * stride_kt, mask=kv_mask, other=0.0)
        v = tl.load(v_head + blocks[:, None] * stride_vb + slots[:, None] * stride_vt, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION)
        if SOFTCAP:  # cap * tanh(score / cap), in base-2 units: tanh(y) = 2 sigmoid(2y) - 1
            s = softcap_log2 * (2.0 * tl.sigmoid(2.0 * s / softcap_log2) - 1.0)
        visible = token_mask[None, :] & (tokens[None, :] <= positions[:, None])
        if window > 0:
            visible = visible & (tokens[None, :] > positions[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees nothing yet stays at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DOT), v.to(DOT), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * v_scale
    o_offsets = (q_start + tokens_q).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_config(head_dim: int, query_dtype: torch.dtype, cache_dtype: torch.dtype,
                   device: torch.device) -> dict[str, int]:
    """Rows per program (query tokens x group heads), key tile and launch sizes, chosen from the compiled
    code (tests/kernels/compile_for_gpu.py: no spills on sm_80/sm_89/sm_90)."""
    if not _launch.is_gpu(device):
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if query_dtype == torch.float32:  # correct but slow on a GPU: tiles small enough not to spill
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if head_dim > 128:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    if _launch.device_capability(device) < (9, 0):  # mma.sync keeps more in registers than Hopper's wgmma
        return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def paged_attention_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float,
                            k_scale: float = 1.0, v_scale: float = 1.0, *,
                            max_query_len: int | None = None, max_context_len: int | None = None,
                            block_m: int | None = None, block_n: int | None = None,
                            window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Prefill attention through the Triton kernel. `max_query_len` (>= every chunk length) and
    `max_context_len` (>= every context length, checked against the block table's capacity) each spare
    a device sync; `block_m` / `block_n` override the tile sizes (tests, benchmarks); `window` and
    `softcap`: sliding-window attention and score capping, as in reference.py."""
    what = "paged_attention_prefill"
    device = _launch.check_same_device(what, query=query, k_cache=k_cache, v_cache=v_cache,
                                       block_tables=block_tables, cu_seqlens_q=cu_seqlens_q,
                                       context_lens=context_lens)
    _launch.check_runnable(_prefill_kernel, device, what)
    if query.dim() != 3:
        raise ValueError(f"{what}: query must be [total_q, num_heads, head_dim], got {tuple(query.shape)}")
    _launch.check_kv_cache(what, query, k_cache, v_cache)
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    _launch.check_index_tensor(what, "block_tables", block_tables, 2)
    _launch.check_index_tensor(what, "cu_seqlens_q", cu_seqlens_q, 1)
    _launch.check_index_tensor(what, "context_lens", context_lens, 1)
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"{what}: {num_seqs} context_lens need cu_seqlens_q of {num_seqs + 1} and "
                         f"{num_seqs} block_tables rows, got {tuple(cu_seqlens_q.shape)} and "
                         f"{tuple(block_tables.shape)}")
    _launch.check_last_dim_contiguous(what, query=query, k_cache=k_cache, v_cache=v_cache,
                                      block_tables=block_tables)
    out = torch.empty_like(query)
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    if max_context_len > block_tables.shape[1] * block_size:  # the kernel would read past the block table
        raise ValueError(f"{what}: context length {max_context_len} exceeds block_tables capacity "
                         f"{block_tables.shape[1]} blocks x {block_size}")

    config = prefill_config(head_dim, query.dtype, k_cache.dtype, device)
    block_m = block_m or config["BLOCK_M"]
    block_n = block_n or config["BLOCK_N"]
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{what}: {name} {size} must be a power of two >= 16 (tl.dot)")
    block_q = max(1, block_m // group)
    block_rows = max(16, _launch.next_pow2(block_q * group))  # = block_m unless the group is wider
    dot = _launch.attention_dot_dtype(query.dtype, k_cache.dtype, device)
    grid = (num_seqs, _launch.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * k_scale * math.log2(math.e), v_scale,
        query.stride(0), query.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), window or 0, (softcap or 1.0) * math.log2(math.e),
        GROUP=group, BLOCK_ROWS=block_rows, HEAD_DIM=head_dim, BLOCK_D=max(16, _launch.next_pow2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=block_n, DOT=dot, PRECISION=_launch.dot_precision(dot),
        SOFTCAP=bool(softcap),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out
