"""The host KV tier: a second block pool in host memory (pinned when the GPU pool is on CUDA) behind the
GPU pool, as vLLM's CPU offloading and LMCache's local tier keep one.

Two uses, both decided by the block manager (bookkeeping, `HostBlockIndex`) and carried out by the
engine before the step's forward pass (`HostKVTier.run`, the copies in the order they were queued):
- prefix spill: a cached full block the GPU pool evicts is copied here first, keyed by its chained
  hash (its tokens kept to rule out collisions); a later prompt whose prefix misses on the GPU but
  hits here gets it copied back instead of computed;
- swap preemption: a preempted sequence's blocks wait here (pinned, never evicted) until it resumes.

A host block is in exactly one of: free, cached (LRU by hash, evictable), swapped (a preempted
sequence's), held (cached, being restored in the current allocation: not evictable until it ends).

Layout: `[num_host_blocks, 2, width, block_size, kv_heads, head_dim]` - the GPU pool's
`[2, width, num_blocks, ...]` with the block axis first, so each host block is one contiguous span
(one DMA per block; the GPU side is gathered on the device).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kvpilot.runtime.memory.host_tier import SwapCost


@dataclass(frozen=True)
class KVCopy:
    gpu_block: int
    host_block: int
    to_host: bool  # True: spill or swap out (GPU -> host); False: restore or swap in


@dataclass(frozen=True)
class SwapPolicy:
    """When a preempted sequence goes to the host tier: `mode` swap or recompute forces it (tests, and
    users who know their link); auto asks the cost model."""

    mode: str
    cost: SwapCost
    block_bytes: int
    num_layers: int

    def prefers_swap(self, num_blocks: int, num_tokens: int) -> bool:
        if self.mode != "auto":
            return self.mode == "swap"
        return self.cost.swap_is_cheaper(num_blocks * self.block_bytes, num_tokens, self.num_layers)


class HostBlockIndex:
    """Which host block holds what; no tensors (the block manager's side of the tier)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a host KV tier needs num_blocks >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached: OrderedDict[int, int] = OrderedDict()  # hash -> host block, least recently used first
        self.keys: dict[int, tuple[int, tuple[int, ...]]] = {}  # cached or held host block -> (hash, tokens)
        self.held: set[int] = set()
        self.swapped: set[int] = set()
        self.spilled_blocks = 0
        self.restored_blocks = 0
        self.swapped_out_blocks = 0
        self.swapped_in_blocks = 0

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)

    @property
    def num_available(self) -> int:
        """Blocks a swap could take now: free ones, and cached ones it would evict."""
        return len(self.free_ids) + len(self.cached)

    def _take(self) -> int | None:
        if self.free_ids:
            return self.free_ids.popleft()
        if not self.cached:
            return None
        _, host_id = self.cached.popitem(last=False)
        del self.keys[host_id]
        return host_id

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        host_id = self.cached.get(block_hash)
        if host_id is None or self.keys[host_id][1] != token_ids:
            return None
        return host_id

    def store(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """The host block to copy a spilled block into; None when one with this hash is here already
        (it becomes the most recently used) or no block is free or evictable."""
        if block_hash in self.cached:
            self.cached.move_to_end(block_hash)
            return None
        if any(key[0] == block_hash for key in (self.keys[h] for h in self.held)):
            return None
        host_id = self._take()
        if host_id is None:
            return None
        self.cached[block_hash] = host_id
        self.keys[host_id] = (block_hash, token_ids)
        self.spilled_blocks += 1
        return host_id

    def hold(self, host_ids: Iterable[int]) -> None:
        """Keep cached blocks from eviction while they are restored."""
        for host_id in host_ids:
            del self.cached[self.keys[host_id][0]]
            self.held.add(host_id)

    def release_held(self) -> None:
        """The held blocks back to the cache, most recently used."""
        for host_id in sorted(self.held):
            self.cached[self.keys[host_id][0]] = host_id
        self.restored_blocks += len(self.held)
        self.held.clear()

    def take_for_swap(self) -> int:
        host_id = self._take()
        if host_id is None:
            raise RuntimeError("no host KV block to swap into: check num_available first")
        self.swapped.add(host_id)
        self.swapped_out_blocks += 1
        return host_id

    def release_swapped(self, host_id: int, swapped_in: bool) -> None:
        self.swapped.remove(host_id)
        self.free_ids.append(host_id)
        self.swapped_in_blocks += swapped_in


class HostKVTier:
    """The host pool's tensor and the copies between it and the GPU pool."""

    def __init__(self, gpu_pool: torch.Tensor, num_blocks: int) -> None:
        self.gpu_pool = gpu_pool
        shape = (num_blocks, *gpu_pool.shape[:2], *gpu_pool.shape[3:])
        self.pool = torch.zeros(shape, dtype=gpu_pool.dtype, device="cpu", pin_memory=gpu_pool.is_cuda)
        self.block_bytes = self.pool[0].numel() * self.pool.element_size()
        self.stream = torch.cuda.Stream(gpu_pool.device) if gpu_pool.is_cuda else None
        self.bytes_to_host = 0
        self.bytes_to_gpu = 0

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def run(self, copies: list[KVCopy]) -> None:
        """Carry out `copies` in order. On CUDA they run on a side stream, after the forward passes
        that wrote the blocks, and the next forward (which overwrites the spilled blocks and reads
        the restored ones) waits for them; the host lists and the next batch's packing go on meanwhile."""
        if not copies:
            return
        if self.stream is None:
            for copy in copies:
                self._copy(copy, non_blocking=False)
            return
        compute = torch.cuda.current_stream(self.gpu_pool.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            for copy in copies:
                self._copy(copy, non_blocking=True)
        compute.wait_stream(self.stream)

    def _copy(self, copy: KVCopy, non_blocking: bool) -> None:
        gpu_block = self.gpu_pool[:, :, copy.gpu_block]
        if copy.to_host:
            self.pool[copy.host_block].copy_(gpu_block, non_blocking=non_blocking)
            self.bytes_to_host += self.block_bytes
        else:
            gpu_block.copy_(self.pool[copy.host_block], non_blocking=non_blocking)
            self.bytes_to_gpu += self.block_bytes
