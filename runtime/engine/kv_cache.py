"""The paged KV pool: for every layer one K and one V cache of `[num_blocks, block_size, num_kv_heads,
head_dim]` (the layout of `kvpilot.kernels.reference`), carved out of one allocation made once at
start-up with exactly the planned number of blocks. Its size is `kv_block_bytes` (the one formula
the memory plan uses) times the blocks, to the byte.

Layers of different sliding windows (memory/kv_groups.py) share the blocks: a block holds `width`
layer slots, and each layer reads and writes its slot of the blocks its group's table names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.kv_groups import KVGroups, kv_block_bytes
from kvpilot.runtime.memory.quantization import kv_heads_per_gpu

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8"}


@dataclass
class KVCache:
    pool: torch.Tensor  # [2, width (layer slots), num_blocks, block_size, num_kv_heads, head_dim]
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.pool.shape[2]

    @property
    def block_size(self) -> int:
        return self.pool.shape[3]

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()


def expected_kv_bytes(facts: ModelFacts, num_blocks: int, block_size: int, dtype: torch.dtype, groups: KVGroups,
                      tp: int = 1) -> int:
    return num_blocks * kv_block_bytes(facts, DTYPE_NAMES[dtype], block_size, groups, tp)


def allocate_kv_cache(facts: ModelFacts, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str, groups: KVGroups, tp: int = 1) -> KVCache:
    """This GPU's KV heads of every layer (all of them unless tensor-parallel: see parallel.py).

    fp8 blocks hold K/V divided by a scale of 1.0 (the kernels' k_scale / v_scale default), as
    vLLM's fp8 cache does without calibrated scales.

    Zeroed, so the slots the kernels gather but mask out never hold NaNs."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"KV cache dtype {dtype} is not one of {', '.join(map(str, DTYPE_NAMES))}")
    shape = (2, groups.width, num_blocks, block_size, kv_heads_per_gpu(facts, tp), facts.head_dim)
    pool = torch.zeros(shape, dtype=dtype, device=device)
    k_slots, v_slots = pool[0].unbind(0), pool[1].unbind(0)
    cache = KVCache(pool, [k_slots[slot] for _, slot in groups.layer_slots],
                    [v_slots[slot] for _, slot in groups.layer_slots])
    expected = expected_kv_bytes(facts, num_blocks, block_size, dtype, groups, tp)
    if cache.nbytes != expected:
        raise RuntimeError(f"KV pool holds {cache.nbytes} bytes, the memory model says {expected}")
    return cache
