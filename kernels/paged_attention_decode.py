"""Paged attention for decode: one query token per sequence against its paged KV cache.

Shapes: query [num_seqs, H, D] -> out [num_seqs, H, D] (query's dtype); k_cache/v_cache
[num_blocks, block_size, KVH, D] (query's dtype, or float8_e4m3fn with per-tensor k_scale/v_scale);
block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32. Layout: `reference.py`.

One program per (sequence, KV head, split) -- per head tile too when a group is wider than
MAX_BLOCK_H. It holds the GROUP = H / KVH query heads that share the KV head as the rows of one tile
(padded to 16 for tl.dot), so each K/V tile is read from HBM once for the whole group (GQA/MQA).
The query is pre-scaled (softmax scale, k_scale, log2 e) so scores come out of the dot in log2
units. An fp8 cache is converted to fp16 for fp16 dots (packed conversions; see
_launch.attention_dot_dtype). Tokens are walked in tiles of BLOCK_N; each token's physical block
comes from the block table, so a tile may span several cache blocks (any block size works).
Flash decoding: long contexts are cut into `num_splits` ranges of `tokens_per_split` tokens, each
split keeps an online softmax and writes its normalised partial output and log-sum-exp (base 2);
`_merge_kernel` weighs the splits by exp2(lse - max lse). With one split the first kernel writes
the output directly.

Memory traffic: K and V read once, sum(context_lens) * KVH * D * 2 * cache element bytes, plus the
query and output (num_seqs * H * D each) and, with splits, num_seqs * H * splits * (D + 1) * 4 * 2
bytes of fp32 partials. Decode is bound by the K/V read; the bench reports it against a copy.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvpilot.kernels import _launch
from kvpilot.kernels.reference import paged_attention_decode_ref

__all__ = ["paged_attention_decode", "paged_attention_decode_ref"]

MAX_SPLITS = 64  # the merge kernel holds all splits of one head in one tile
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (query load, partial write) dominates
MAX_GROUP = 128  # query heads per KV head
MAX_BLOCK_H = 64  # query heads of one group held in one program's tile; wider groups take several tiles


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale_log2, v_scale, tokens_per_split, num_splits, num_heads,
    stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bts, stride_os, stride_oh, window, softcap_log2,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_TILES: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_TILES
    head_tile = tl.program_id(1) % HEAD_TILES
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context_len)
    if split == num_splits - 1:  # the last split takes whatever is left, so a low max_context_len loses nothing
        end = context_len
    if window > 0:  # sliding window: keys before context_len - window are never read
        start = tl.maximum(start, context_len - window)

    rows = head_tile * BLOCK_H + tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    head_mask = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)
    # scores in log2 units straight out of the dot: the scale goes into q once, not into every score tile
    q = (q.to(tl.float32) * qk_scale_log2).to(DOT)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bts
    k_head = k_cache_ptr + kv_head * stride_kh + dims[None, :]
    v_head = v_cache_ptr + kv_head * stride_vh + dims[None, :]
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
        s = tl.where(token_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(DOT), v.to(DOT), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # an empty range gives zeros (and lse -inf), not NaN
    out = acc / l_safe[:, None] * v_scale
    store_mask = head_mask[:, None] & dim_mask[None, :]
    if SPLIT:
        part_rows = (seq * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], out, mask=store_mask)
        tl.store(part_lse_ptr + part_rows, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=head_mask)
    else:
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row0 = (seq * tl.num_programs(1) + head) * num_splits
    splits = tl.arange(0, BLOCK_SPLITS)
    split_mask = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    lse = tl.load(part_lse_ptr + row0 + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))  # empty splits weigh 0
    parts = tl.load(part_out_ptr + (row0 + splits[:, None]) * HEAD_DIM + dims[None, :],
                    mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def decode_config(head_dim: int, query_dtype: torch.dtype, cache_dtype: torch.dtype,
                  device: torch.device) -> dict[str, int]:
    """Key tile and launch sizes, chosen from the compiled code (tests/kernels/compile_for_gpu.py: no
    spills) and meant to be re-picked by the sweep in bench/gpu_kernels.py. num_stages=5 is what gives
    two K/V buffers (the K/V loads depend on the block-table load of the same tile, so the pipeliner
    needs the deeper schedule): the next tile's load overlaps this tile's math. 8 warps halve the
    registers per thread (fp8 caches: 168 -> 126 at head_dim 128).
    Small tiles in the interpreter (tests cover tiles spanning blocks)."""
    if not _launch.is_gpu(device):
        return {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if query_dtype == torch.float32:  # correct but slow on a GPU: tiles small enough not to spill
        return {"BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
    # two bf16/fp16 K/V buffers of 64 tokens take 72 KB of shared memory: two programs per SM on
    # sm_80/sm_90, one on the ~100 KB of sm_86/sm_89, which get 32-token tiles instead
    small_shared = _launch.device_capability(device) in ((8, 6), (8, 7), (8, 9))
    wide = head_dim > 128 or (cache_dtype != _launch.FP8 and small_shared)
    return {"BLOCK_N": 32 if wide else 64, "num_warps": 8, "num_stages": 5}


def choose_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, block_n: int, sms: int,
                  num_splits: int | None = None) -> tuple[int, int]:
    """(num_splits, tokens_per_split): enough programs to cover the device twice, no split shorter than
    MIN_TOKENS_PER_SPLIT tokens; `num_splits` forces the count (tests)."""
    tiles = max(1, _launch.cdiv(max_context_len, block_n))
    if num_splits is None:
        wanted = _launch.cdiv(2 * sms, max(1, num_seqs * num_kv_heads))
        num_splits = max(1, min(wanted, MAX_SPLITS, _launch.cdiv(max_context_len, MIN_TOKENS_PER_SPLIT)))
        num_splits = _launch.cdiv(tiles, _launch.cdiv(tiles, num_splits))
    elif not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits {num_splits} is not in 1..{MAX_SPLITS}")
    return num_splits, _launch.cdiv(tiles, num_splits) * block_n


def paged_attention_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           k_scale: float = 1.0, v_scale: float = 1.0, *, max_context_len: int | None = None,
                           num_splits: int | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Decode attention through the Triton kernel. `max_context_len` (>= every context_len) spares a
    device sync; `num_splits`, `block_n`, `num_warps` and `num_stages` override the heuristics (tests,
    the benchmark's sweep); `window` and `softcap`: sliding-window attention and score capping, as in
    reference.py."""
    what = "paged_attention_decode"
    device = _launch.check_same_device(what, query=query, k_cache=k_cache, v_cache=v_cache,
                                       block_tables=block_tables, context_lens=context_lens)
    _launch.check_runnable(_decode_kernel, device, what)
    if query.dim() != 3:
        raise ValueError(f"{what}: query must be [num_seqs, num_heads, head_dim], got {tuple(query.shape)}")
    _launch.check_kv_cache(what, query, k_cache, v_cache)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if group > MAX_GROUP:
        raise ValueError(f"{what}: {group} query heads per KV head exceeds {MAX_GROUP}")
    _launch.check_index_tensor(what, "block_tables", block_tables, 2)
    _launch.check_index_tensor(what, "context_lens", context_lens, 1)
    if block_tables.shape[0] != num_seqs or context_lens.shape[0] != num_seqs:
        raise ValueError(f"{what}: {num_seqs} queries but block_tables {tuple(block_tables.shape)} and "
                         f"context_lens {tuple(context_lens.shape)}")
    _launch.check_last_dim_contiguous(what, query=query, k_cache=k_cache, v_cache=v_cache,
                                      block_tables=block_tables)
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if num_seqs else 0
    if max_context_len > block_tables.shape[1] * block_size:
        raise ValueError(f"{what}: context length {max_context_len} exceeds block_tables capacity "
                         f"{block_tables.shape[1]} blocks x {block_size}")

    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    config = decode_config(head_dim, query.dtype, k_cache.dtype, device)
    block_n = block_n or config["BLOCK_N"]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"{what}: block_n {block_n} must be a power of two >= 16 (tl.dot)")
    splits, tokens_per_split = choose_splits(num_seqs, num_kv_heads, max_context_len, block_n,
                                             _launch.num_sms(device), num_splits)
    block_d = max(16, _launch.next_pow2(head_dim))
    if splits > 1:
        part_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=device)
        part_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=device)
    else:
        part_out = part_lse = out  # unused
    dot = _launch.attention_dot_dtype(query.dtype, k_cache.dtype, device)
    block_h = min(max(16, _launch.next_pow2(group)), MAX_BLOCK_H)
    head_tiles = _launch.cdiv(group, block_h)
    _decode_kernel[(num_seqs, num_kv_heads * head_tiles, splits)](
        query, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * k_scale * math.log2(math.e), v_scale, tokens_per_split, splits, num_heads,
        query.stride(0), query.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1), window or 0, (softcap or 1.0) * math.log2(math.e),
        GROUP=group, BLOCK_H=block_h, HEAD_TILES=head_tiles, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, SPLIT=splits > 1,
        DOT=dot, PRECISION=_launch.dot_precision(dot), SOFTCAP=bool(softcap),
        num_warps=num_warps or config["num_warps"], num_stages=num_stages or config["num_stages"],
    )
    if splits > 1:
        _merge_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SPLITS=_launch.next_pow2(splits), num_warps=4,
        )
    return out
