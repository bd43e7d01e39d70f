"""Plain-torch references of every attention/cache kernel: the CPU path and the ground truth the
Triton kernels are tested against.

Shapes (the paged KV layout shared by the runtime and every kernel):
- k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], one pair per layer;
  fp32/bf16/fp16, or float8_e4m3fn with a per-tensor float scale (stored = value / scale).
- slot_mapping: [num_tokens] int64, slot = block_id * block_size + offset; -1 skips a token
  (padding).
- block_tables: [num_seqs, max_blocks_per_seq] int32, unused entries arbitrary.
- context_lens: [num_seqs] int32, tokens in the cache for each sequence (new ones included).
  A sequence with context_len 0 (batch padding) gets an all-zero output.
- query head h reads KV head h // (num_heads // num_kv_heads) (GQA / MQA).
- window (optional, sliding-window attention): the query at position p sees keys at positions
  p - window + 1 .. p only (HF's `kv_idx > q_idx - sliding_window`); None: every earlier key.
- softcap (optional, Gemma 2): scores = softcap * tanh(scale * q.k / softcap) before the softmax.

`paged_attention_decode_ref` gathers every sequence's blocks at once and runs one masked SDPA in
fp32; `paged_attention_prefill_ref` walks the sequences, one causal SDPA each. Both are what the CPU
engine serves with, so they are built for speed: blocks are gathered with `index_select` (several
times faster than advanced indexing on CPU), SDPA gets 4-D inputs (its fused CPU kernel; 3-D ones
fall back to the unfused math path) and `enable_gqa` instead of repeated K/V. The `*_naive`
functions (per sequence, K/V repeated per query head, einsum and softmax, positions compared
explicitly) are the oracle tests hold them to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into their slots, in place."""
    slots = slot_mapping.long()
    if bool((slots < 0).any()):  # padding tokens: drop them (a boolean mask costs more than this check)
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    for cache, new, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        if cache.dtype == FP8:
            new = (new.float() / scale).clamp(-FP8_MAX, FP8_MAX)
        new = new.to(cache.dtype)
        if cache.stride(0) == cache.shape[1] * cache.stride(1):  # [blocks, offsets] is one axis of slots
            cache.view(-1, *cache.shape[2:]).index_put_((slots,), new)
        else:  # a strided view of a larger cache: index blocks and offsets apart
            cache[slots // cache.shape[1], slots % cache.shape[1]] = new


def gather_kv_padded(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, length: int,
                     scale: float = 1.0) -> torch.Tensor:
    """Every sequence's first `length` slots, [num_seqs, length, num_kv_heads, head_dim] in fp32.

    Slots past a sequence's own context length hold whatever block 0 holds; callers mask them.
    """
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    table = block_tables[:, :num_blocks].long()
    owned = torch.arange(num_blocks, device=table.device) * block_size < context_lens.long().unsqueeze(1)
    table = torch.where(owned, table, 0)  # unused table entries are arbitrary: never index with them
    out = cache.index_select(0, table.flatten()).view(*table.shape, -1, *cache.shape[2:])  # [S, nb, bs, KVH, D]
    out = out.flatten(1, 2)[:, :length].float()
    return out.mul_(scale) if cache.dtype == FP8 else out


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float, softcap: float | None = None) -> torch.Tensor:
    """q [S, n, H, D], k/v [S, L, KVH, D], mask [S, n, L] (True = attend) -> [S, n, H, D] fp32."""
    if softcap:
        out = _softcapped_attention(q.float().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    mask.unsqueeze(1), scale, softcap)
    else:
        out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True)
    out = out.transpose(1, 2)
    return torch.where(mask.any(-1)[..., None, None], out, 0.0)  # nothing to attend to: zeros, not NaN


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float, softcap: float) -> torch.Tensor:
    """SDPA with Gemma 2's score capping: q [B, H, n, D], k/v [B, KVH, L, D], mask [B, 1, n, L] or None."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1), nan=0.0) @ v


def paged_attention_decode_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               k_scale: float = 1.0, v_scale: float = 1.0, window: int | None = None,
                               softcap: float | None = None) -> torch.Tensor:
    """One query token per sequence, query [num_seqs, H, D] -> [num_seqs, H, D] in query's dtype."""
    max_len = int(context_lens.max()) if context_lens.numel() else 0
    if max_len == 0:
        return torch.zeros_like(query)
    k = gather_kv_padded(k_cache, block_tables, context_lens, max_len, k_scale)
    v = gather_kv_padded(v_cache, block_tables, context_lens, max_len, v_scale)
    positions = torch.arange(max_len, device=query.device)
    lens = context_lens.long().unsqueeze(1)
    mask = positions < lens
    if window is not None:  # the query sits at context_len - 1
        mask &= positions >= lens - window
    out = _masked_attention(query.unsqueeze(1), k, v, mask.unsqueeze(1), scale, softcap)
    return out.squeeze(1).to(query.dtype)


def paged_attention_prefill_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                context_lens: torch.Tensor, scale: float,
                                k_scale: float = 1.0, v_scale: float = 1.0, window: int | None = None,
                                softcap: float | None = None) -> torch.Tensor:
    """A chunk of query tokens per sequence, packed: query [total_q, H, D], cu_seqlens_q [num_seqs + 1].

    The chunk's own K/V are already in the cache; sequence i's queries are its last
    `cu_seqlens_q[i+1] - cu_seqlens_q[i]` tokens of `context_lens[i]`, attending causally.
    One sequence at a time: padding ragged chunks to a common length costs more than the loop.
    A whole-prompt chunk uses `is_causal`, with which SDPA's fused CPU kernel also skips the key
    blocks past each query block; a chunk after a cached prefix needs an explicit (offset) mask.
    """
    out = torch.zeros_like(query)
    starts = cu_seqlens_q.tolist()
    for i, length in enumerate(context_lens.tolist()):
        n = starts[i + 1] - starts[i]
        if n == 0 or length == 0:
            continue
        k = gather_kv_ref(k_cache, block_tables[i], length, k_scale).transpose(0, 1).unsqueeze(0)
        v = gather_kv_ref(v_cache, block_tables[i], length, v_scale).transpose(0, 1).unsqueeze(0)
        q = query[starts[i] : starts[i + 1]].float().transpose(0, 1).unsqueeze(0)
        # query j sits at position length - n + j and sees keys 0..that position; is_causal aligns top-left,
        # which is that only when the chunk is the whole context
        whole = n == length and window is None and not softcap
        mask = None
        if not whole:
            mask = torch.ones(n, length, dtype=torch.bool, device=query.device).tril(length - n)
            if window is not None:  # and nothing older than window - 1 tokens before the query
                mask = mask.triu(length - n - window + 1)
        if softcap:
            causal = mask[None, None] if mask is not None else None
            attended = _softcapped_attention(q, k, v, causal, scale, softcap)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=whole, scale=scale,
                                                      enable_gqa=True)
        out[starts[i] : starts[i + 1]] = attended[0].transpose(0, 1)
    return out


# --- one sequence at a time: the oracle the batched references are tested against -------------

def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: float = 1.0) -> torch.Tensor:
    """One sequence's first `length` cached tokens, [length, num_kv_heads, head_dim], in fp32."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    out = blocks.flatten(0, 1)[:length].float()
    return out.mul_(scale) if cache.dtype == FP8 else out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None,
            window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q [n, H, D], k/v [L, KVH, D] (fp32) -> [n, H, D]; query i sits at position causal_offset + i
    (None: one query at the last position)."""
    if k.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    offset = k.shape[0] - 1 if causal_offset is None else causal_offset
    pos_q = torch.arange(q.shape[0]).unsqueeze(1) + offset
    pos_k = torch.arange(k.shape[0]).unsqueeze(0)
    scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
    if window is not None:
        scores = scores.masked_fill(pos_k <= pos_q - window, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(dim=-1), v)


def paged_attention_decode_naive(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                 k_scale: float = 1.0, v_scale: float = 1.0, window: int | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    out = torch.empty_like(query)
    for i, length in enumerate(context_lens.tolist()):
        k = gather_kv_ref(k_cache, block_tables[i], length, k_scale)
        v = gather_kv_ref(v_cache, block_tables[i], length, v_scale)
        out[i] = _attend(query[i : i + 1], k, v, scale, None, window, softcap)[0].to(query.dtype)
    return out


def paged_attention_prefill_naive(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                  context_lens: torch.Tensor, scale: float,
                                  k_scale: float = 1.0, v_scale: float = 1.0, window: int | None = None,
                                  softcap: float | None = None) -> torch.Tensor:
    out = torch.empty_like(query)
    starts = cu_seqlens_q.tolist()
    for i, length in enumerate(context_lens.tolist()):
        q = query[starts[i] : starts[i + 1]]
        k = gather_kv_ref(k_cache, block_tables[i], length, k_scale)
        v = gather_kv_ref(v_cache, block_tables[i], length, v_scale)
        out[starts[i] : starts[i + 1]] = _attend(q, k, v, scale, length - q.shape[0], window,
                                                 softcap).to(query.dtype)
    return out
