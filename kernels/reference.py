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

`paged_attention_decode_ref` gathers every sequence's blocks at once and runs one masked SDPA;
`paged_attention_prefill_ref` walks the sequences, one causal SDPA each. SDPA runs in the cache's
dtype where the query has it too (bf16, fp16: SDPA's CPU kernel accumulates in fp32 anyway, and an
fp32 copy of the gathered K/V cost 3x the attention itself), in fp32 otherwise (fp8 caches,
soft-capping, whose scores a plain matmul computes). Both are what the CPU
engine serves with, so they are built for speed: blocks are gathered with `index_select` (several
times faster than advanced indexing on CPU), SDPA gets 4-D inputs (its fused CPU kernel; 3-D ones
fall back to the unfused math path) and `enable_gqa` instead of repeated K/V. The `*_naive`
functions (per sequence, K/V repeated per query head, einsum and softmax, positions compared
explicitly) are the oracle tests hold them to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class _PerStep:
    """What a step's metadata tensors imply (int64 indices, masks), derived once: every layer of a
    forward passes the same tensors, so the first layer builds it and the others reuse it. Keyed on
    the tensors themselves (held, so their ids stay theirs) and their in-place version counters, so
    a new step's tensors, or an old tensor edited in place, rebuild it. Inference-mode tensors keep
    no version counter: the engine makes its metadata tensors anew each step and never edits them.
    Models whose layers differ in sliding window pass one set of tensors per window group, layer
    after layer: `SLOTS` entries (more than any model's groups) keep each group's."""

    SLOTS = 4

    def __init__(self) -> None:
        self._entries: tuple[tuple[tuple, Any], ...] = ()

    def get(self, tensors: tuple[torch.Tensor, ...], extra: tuple, build: Callable[[], T]) -> T:
        entries = self._entries  # one read: a racing caller at worst rebuilds
        for key, value in entries:
            if key[1] == extra and len(key[0]) == len(tensors) and all(
                    held is t and version == _version(t) for (held, version), t in zip(key[0], tensors, strict=True)):
                return value
        value = build()
        self._entries = (((tuple((t, _version(t)) for t in tensors), extra), value), *entries[: self.SLOTS - 1])
        return value


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


_write_slots, _decode_layout, _prefill_layout = _PerStep(), _PerStep(), _PerStep()


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into their slots, in place."""
    slots, keep = _write_slots.get((slot_mapping,), (), lambda: _slots(slot_mapping))
    if keep is not None:  # padding tokens: drop them
        key, value = key[keep], value[keep]
    for cache, new, scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        if cache.dtype == FP8:
            new = (new.float() / scale).clamp(-FP8_MAX, FP8_MAX)
        new = new.to(cache.dtype)
        if cache.stride(0) == cache.shape[1] * cache.stride(1):  # [blocks, offsets] is one axis of slots
            cache.view(-1, *cache.shape[2:]).index_put_((slots,), new)
        else:  # a strided view of a larger cache: index blocks and offsets apart
            cache[slots // cache.shape[1], slots % cache.shape[1]] = new


def _slots(slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The int64 slots to write and, where some are -1 (padding), the mask of the kept tokens."""
    slots = slot_mapping.long()
    if not bool((slots < 0).any()):  # the usual case: a boolean mask costs more than this check
        return slots, None
    keep = slots >= 0
    return slots[keep], keep


def compute_dtype(query: torch.Tensor, cache: torch.Tensor, softcap: float | None) -> torch.dtype:
    """The dtype attention runs in: the cache's when the query shares it and SDPA runs, else fp32."""
    return cache.dtype if cache.dtype == query.dtype and not softcap else torch.float32


def _masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float, softcap: float | None = None, some_empty: bool = True) -> torch.Tensor:
    """q [S, n, H, D], k/v [S, L, KVH, D], mask [S, n, L] (True = attend) -> [S, n, H, D] in k's dtype.
    `some_empty` False promises every query attends to something (no all-False mask row)."""
    if softcap:
        out = _softcapped_attention(q.to(k.dtype).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    mask.unsqueeze(1), scale, softcap)
    else:
        out = F.scaled_dot_product_attention(q.to(k.dtype).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=True)
    out = out.transpose(1, 2)
    if not some_empty:
        return out
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
    layout = _decode_layout.get((block_tables, context_lens), (window, k_cache.shape[1]),
                                lambda: _DecodeLayout(block_tables, context_lens, window, k_cache.shape[1]))
    if layout.length == 0:
        return torch.zeros_like(query)
    dtype = compute_dtype(query, k_cache, softcap)
    k, v = layout.gather(k_cache, k_scale, dtype), layout.gather(v_cache, v_scale, dtype)
    out = _masked_attention(query.unsqueeze(1), k, v, layout.mask, scale, softcap, layout.some_empty)
    return out.squeeze(1).to(query.dtype)


class _DecodeLayout:
    """A decode batch's gather indices and attention mask, shared by every layer of a step."""

    def __init__(self, block_tables: torch.Tensor, context_lens: torch.Tensor, window: int | None,
                 block_size: int) -> None:
        self.length = int(context_lens.max()) if context_lens.numel() else 0
        if self.length == 0:
            return
        num_blocks = -(-self.length // block_size)
        table = block_tables[:, :num_blocks].long()
        lens = context_lens.long().unsqueeze(1)
        owned = torch.arange(num_blocks, device=table.device) * block_size < lens
        self.table = torch.where(owned, table, 0)  # unused table entries are arbitrary: never index with them
        positions = torch.arange(self.length, device=table.device)
        mask = positions < lens
        if window is not None:  # the query sits at context_len - 1
            mask &= positions >= lens - window
        self.mask = mask.unsqueeze(1)  # [S, 1, L]
        self.some_empty = bool((context_lens == 0).any())

    def gather(self, cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """Every sequence's first `length` slots, [S, length, KVH, D] in `dtype`. Slots past a sequence's
        own context length hold whatever block 0 holds: the mask hides them."""
        out = cache.index_select(0, self.table.flatten()).view(*self.table.shape, -1, *cache.shape[2:])
        out = out.flatten(1, 2)[:, : self.length].to(dtype)
        return out.mul_(scale) if cache.dtype == FP8 else out


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
    layout = _prefill_layout.get((block_tables, cu_seqlens_q, context_lens), (window, bool(softcap), k_cache.shape[1]),
                                 lambda: _prefill_chunks(block_tables, cu_seqlens_q, context_lens, window,
                                                         bool(softcap), k_cache.shape[1]))
    dtype = compute_dtype(query, k_cache, softcap)
    for start, end, length, blocks, mask in layout:
        k = _gather_one(k_cache, blocks, length, k_scale, dtype).transpose(0, 1).unsqueeze(0)
        v = _gather_one(v_cache, blocks, length, v_scale, dtype).transpose(0, 1).unsqueeze(0)
        q = query[start:end].to(dtype).transpose(0, 1).unsqueeze(0)
        if softcap:
            causal = mask[None, None] if mask is not None else None
            attended = _softcapped_attention(q, k, v, causal, scale, softcap)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                      enable_gqa=True)
        out[start:end] = attended[0].transpose(0, 1)
    return out


def _prefill_chunks(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                    window: int | None, softcap: bool, block_size: int) -> list[tuple]:
    """Per sequence with queries: (query start, query end, context length, its blocks as int64, the
    mask or None where `is_causal` is exact), shared by every layer of a step."""
    chunks = []
    starts = cu_seqlens_q.tolist()
    for i, length in enumerate(context_lens.tolist()):
        n = starts[i + 1] - starts[i]
        if n == 0 or length == 0:
            continue
        blocks = block_tables[i, : -(-length // block_size)].long()
        # query j sits at position length - n + j and sees keys 0..that position; is_causal aligns top-left,
        # which is that only when the chunk is the whole context
        mask = None
        if not (n == length and window is None and not softcap):
            mask = torch.ones(n, length, dtype=torch.bool, device=block_tables.device).tril(length - n)
            if window is not None:  # and nothing older than window - 1 tokens before the query
                mask = mask.triu(length - n - window + 1)
        chunks.append((starts[i], starts[i + 1], length, blocks, mask))
    return chunks


def _gather_one(cache: torch.Tensor, blocks: torch.Tensor, length: int, scale: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = cache.index_select(0, blocks).flatten(0, 1)[:length].to(dtype)
    return out.mul_(scale) if cache.dtype == FP8 else out


# --- one sequence at a time: the oracle the batched references are tested against -------------

def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: float = 1.0) -> torch.Tensor:
    """One sequence's first `length` cached tokens, [length, num_kv_heads, head_dim], in fp32."""
    return _gather_one(cache, block_table[: -(-length // cache.shape[1])].long(), length, scale)


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
