"""Plain-torch references of every kernel: the CPU path and the ground truth the Triton kernels
are tested against.

Shapes (the paged KV layout shared by the runtime and every kernel):
- k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], one pair per layer;
  fp32/bf16/fp16, or float8_e4m3fn with a per-tensor float scale (stored = value / scale).
- slot_mapping: [num_tokens] int64, slot = block_id * block_size + offset; -1 skips a token
  (padding).
- block_tables: [num_seqs, max_blocks_per_seq] int32, unused entries arbitrary.
- context_lens: [num_seqs] int32, tokens in the cache for each sequence (new ones included).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into their slots, in place."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    for cache, new, scale in ((k_cache, key[keep], k_scale), (v_cache, value[keep], v_scale)):
        if cache.dtype == FP8:
            new = (new.float() / scale).clamp(-448.0, 448.0)
        cache[blocks, offsets] = new.to(cache.dtype)


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: float = 1.0) -> torch.Tensor:
    """One sequence's first `length` cached tokens, [length, num_kv_heads, head_dim], in fp32."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    out = blocks.reshape(-1, *cache.shape[2:])[:length].float()
    return out * scale if cache.dtype == FP8 else out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None) -> torch.Tensor:
    """q [n, H, D], k/v [L, KVH, D] (fp32) -> [n, H, D]; query i sits at position causal_offset + i."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale
    if causal_offset is not None:
        pos_q = torch.arange(q.shape[0]).unsqueeze(1) + causal_offset
        pos_k = torch.arange(k.shape[0]).unsqueeze(0)
        scores = scores.masked_fill(pos_k > pos_q, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(dim=-1), v)


def paged_attention_decode_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """One query token per sequence, query [num_seqs, H, D] -> [num_seqs, H, D] in query's dtype."""
    out = torch.empty_like(query)
    for i, length in enumerate(context_lens.tolist()):
        k = gather_kv_ref(k_cache, block_tables[i], length, k_scale)
        v = gather_kv_ref(v_cache, block_tables[i], length, v_scale)
        out[i] = _attend(query[i : i + 1], k, v, scale, None)[0].to(query.dtype)
    return out


def paged_attention_prefill_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                context_lens: torch.Tensor, scale: float,
                                k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """A chunk of query tokens per sequence, packed: query [total_q, H, D], cu_seqlens_q [num_seqs + 1].

    The chunk's own K/V are already in the cache; sequence i's queries are its last
    `cu_seqlens_q[i+1] - cu_seqlens_q[i]` tokens of `context_lens[i]`, attending causally.
    """
    out = torch.empty_like(query)
    starts = cu_seqlens_q.tolist()
    for i, length in enumerate(context_lens.tolist()):
        q = query[starts[i] : starts[i + 1]]
        k = gather_kv_ref(k_cache, block_tables[i], length, k_scale)
        v = gather_kv_ref(v_cache, block_tables[i], length, v_scale)
        out[starts[i] : starts[i + 1]] = _attend(q, k, v, scale, length - q.shape[0]).to(query.dtype)
    return out
