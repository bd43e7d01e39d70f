"""The paged KV pool's bookkeeping: a free list, reference counts, sliding windows and the prefix cache.

Each KV group (memory/kv_groups.py) gives a sequence one block table; the tables grow together,
one block each per `block_size` positions, from the one free list. After each step a windowed
group frees the blocks wholly before the window of the sequence's next token (`free_outside_windows`):
they go back to the pool, their table entries become FREED_BLOCK.

The prefix cache runs with one group only (every layer in the same blocks).

A full block is keyed by the chained hash of (parent block's hash, the block's tokens), so equal
hashes mean equal prefixes. A new sequence takes the cached blocks of its longest cached prefix.
Freed blocks that carry a hash stay in the cache (`evictable`, least recently freed first) and are
only evicted when no never-cached free block is left: the cache costs nothing until memory runs out.

With a host KV tier (engine/host_kv.py) an evicted cached block is spilled there first, a prefix that
misses here but hits there is restored into new blocks, and a preempted sequence can be swapped out
and back in. The copies are queued (`pending_copies`) in the order the decisions were made; the engine
runs them before the step's forward pass, so a spill always reads a block before its new owner writes it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from kvpilot.runtime.engine.host_kv import HostBlockIndex, KVCopy
from kvpilot.runtime.engine.sequence import FREED_BLOCK, Sequence
from kvpilot.runtime.memory.kv_groups import blocks_per_sequence

ROOT_HASH = 0  # the parent hash of a sequence's first block, plus its rope offset (other rope, other K/V)


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()  # the tokens the hash stands for, to rule out collisions

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


@dataclass(frozen=True)
class CachedPrefix:
    """The longest cached prefix of a prompt: blocks on the GPU, then host-tier blocks that continue it."""

    gpu: tuple[int, ...] = ()  # taken as they are
    host: tuple[int, ...] = ()  # restored into new GPU blocks

    def __len__(self) -> int:
        return len(self.gpu) + len(self.host)


def _as_prefix(cached: Seq[int] | CachedPrefix) -> CachedPrefix:
    return cached if isinstance(cached, CachedPrefix) else CachedPrefix(tuple(cached))


def chain_hash(parent_hash: int, token_ids: Seq[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 windows: Seq[int | None] = (None,), host: HostBlockIndex | None = None) -> None:
        """`windows`: each KV group's sliding window in tokens (None: full attention); `host`: the host
        KV tier's index (one KV group only, as the prefix cache)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks} x {block_size}")
        if not windows or (enable_prefix_caching and len(windows) > 1):
            raise ValueError(f"the prefix cache needs exactly one KV group, got windows {list(windows)}")
        if host is not None and len(windows) > 1:
            raise ValueError(f"the host KV tier needs exactly one KV group, got windows {list(windows)}")
        self.windows = tuple(windows)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # free, holding nothing worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recently freed first
        self.hash_to_block_id: dict[int, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens found (on the GPU or in the host tier)
        self.host = host
        self.pending_copies: list[KVCopy] = []  # for the engine to run before the next forward pass
        self.host_cache_queries = 0  # prompt tokens looked up in the host tier (those the GPU missed)
        self.host_cache_hits = 0  # of those, tokens restored from it

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def has_windows(self) -> bool:
        return any(w is not None for w in self.windows)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # --- prefix cache ---------------------------------------------------------------------------
    def _hash_full_blocks(self, seq: Sequence) -> list[int]:
        """Extend `seq.block_hashes` over every full block of its tokens; hashes are computed once."""
        for i in range(len(seq.block_hashes), seq.num_tokens // self.block_size):
            parent = seq.block_hashes[i - 1] if i else ROOT_HASH + seq.rope_offset
            seq.block_hashes.append(chain_hash(parent, seq.block_tokens(i)))
        return seq.block_hashes

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`, leaving at least its last token to
        compute (the step that computes it produces the logits for the next one)."""
        if not self.enable_prefix_caching or seq.prompt_logprobs is not None:  # cached tokens get no logits
            return []
        hashes = self._hash_full_blocks(seq)
        cached: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.hash_to_block_id.get(hashes[i])
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.block_tokens(i)):
                break
            cached.append(block_id)
        return cached

    def find_prefix(self, seq: Sequence) -> CachedPrefix:
        """`find_cached_prefix`, continued in the host tier where the GPU's chain breaks."""
        if seq.swapped_blocks:  # its computed tokens come back from its own host blocks
            return CachedPrefix()
        gpu = self.find_cached_prefix(seq)
        if self.host is None or not self.enable_prefix_caching or seq.prompt_logprobs is not None:
            return CachedPrefix(tuple(gpu))
        hashes, host = seq.block_hashes, []
        for i in range(len(gpu), (seq.num_tokens - 1) // self.block_size):
            host_id = self.host.lookup(hashes[i], tuple(seq.block_tokens(i)))
            if host_id is None:
                break
            host.append(host_id)
        return CachedPrefix(tuple(gpu), tuple(host))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Record the hashes of the blocks `seq` has filled and computed since the last call."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_registered_blocks:
            return
        hashes = self._hash_full_blocks(seq)
        for i in range(seq.num_registered_blocks, num_full):  # registered before a window frees them
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[i] not in self.hash_to_block_id:
                block.hash, block.token_ids = hashes[i], tuple(seq.block_tokens(i))
                self.hash_to_block_id[block.hash] = block.block_id
        seq.num_registered_blocks = num_full

    # --- allocation -----------------------------------------------------------------------------
    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] | CachedPrefix = ()) -> int:
        """Free blocks that scheduling `num_new_tokens` more tokens of `seq` would take."""
        computed, held, revived = self._start(seq, cached)
        return len(self.windows) * max(0, seq.num_blocks_for(computed + num_new_tokens) - held) + revived

    def tokens_that_fit(self, seq: Sequence, wanted: int, cached: Seq[int] | CachedPrefix = ()) -> int:
        """The most of `wanted` new tokens of `seq` the free blocks hold."""
        computed, held, revived = self._start(seq, cached)
        spare = (self.num_free_blocks - revived) // len(self.windows)  # new blocks for each group's table
        return max(0, min(wanted, (held + spare) * self.block_size - computed))

    def _start(self, seq: Sequence, cached: Seq[int] | CachedPrefix) -> tuple[int, int, int]:
        """(computed tokens, table length, blocks its start takes from the free pool) before allocating:
        cached blocks taken back, and new blocks for what comes back from the host tier."""
        if seq.swapped_blocks:
            return seq.num_computed_tokens, len(seq.swapped_blocks), len(seq.swapped_blocks)
        prefix = _as_prefix(cached)
        if not prefix:
            return seq.num_computed_tokens, len(seq.block_table), 0
        revived = sum(1 for b in prefix.gpu if self.blocks[b].ref_count == 0) + len(prefix.host)
        return len(prefix) * self.block_size, len(prefix), revived

    def blocks_for_sequence(self, num_tokens: int) -> int:
        return blocks_per_sequence(self.windows, num_tokens, self.block_size)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] | CachedPrefix = ()) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens, cached) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] | CachedPrefix = ()) -> None:
        """Give `seq` the blocks for `num_new_tokens` more tokens; a waiting sequence first takes the
        cached blocks of its prefix (`find_prefix`), which count as computed, or its swapped blocks back."""
        if not self.can_allocate(seq, num_new_tokens, cached):
            raise RuntimeError(f"{seq!r}: {self.num_blocks_needed(seq, num_new_tokens, cached)} blocks needed "
                               f"for {num_new_tokens} tokens, {self.num_free_blocks} free")
        if seq.swapped_blocks:
            self._swap_in(seq)
        elif not seq.block_tables:
            prefix = _as_prefix(cached)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += len(prefix) * self.block_size
            for block_id in prefix.gpu:
                self._take(block_id)
            seq.block_tables = [list(prefix.gpu)] + [[] for _ in self.windows[1:]]
            if self.host is not None and self.enable_prefix_caching:
                self._restore(seq, prefix)
            seq.num_freed_blocks = [0] * len(self.windows)
            seq.num_registered_blocks = len(prefix)
            seq.num_computed_tokens = len(prefix) * self.block_size
            seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
        wanted = seq.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        for table in seq.block_tables:
            while len(table) < wanted:
                table.append(self._take_free())

    def _restore(self, seq: Sequence, prefix: CachedPrefix) -> None:
        """New blocks for the host-tier part of `seq`'s prefix, the copies back queued, their hashes
        registered as this pool's."""
        start = len(prefix.gpu)
        self.host_cache_queries += max(0, seq.num_tokens - start * self.block_size)
        self.host_cache_hits += len(prefix.host) * self.block_size
        self.host.hold(prefix.host)  # a spill that the new blocks cause must not evict what is still to copy
        for i, host_id in enumerate(prefix.host, start):
            block_id = self._take_free()
            self.pending_copies.append(KVCopy(block_id, host_id, to_host=False))
            block, block_hash = self.blocks[block_id], seq.block_hashes[i]
            if block_hash not in self.hash_to_block_id:
                block.hash, block.token_ids = block_hash, tuple(seq.block_tokens(i))
                self.hash_to_block_id[block_hash] = block_id
            seq.block_table.append(block_id)
        self.host.release_held()

    def _swap_in(self, seq: Sequence) -> None:
        table = []
        for host_id in seq.swapped_blocks:
            block_id = self._take_free()
            self.pending_copies.append(KVCopy(block_id, host_id, to_host=False))
            self.host.release_swapped(host_id, swapped_in=True)  # later copies into it run after this one
            table.append(block_id)
        seq.block_tables, seq.num_freed_blocks, seq.swapped_blocks = [table], [0], []
        seq.num_registered_blocks = 0  # cache_full_blocks registers the full ones again

    def can_swap_out(self, seq: Sequence) -> bool:
        return (self.host is not None and len(seq.block_tables) == 1
                and len(seq.block_table) <= self.host.num_available)

    def swap_out(self, seq: Sequence) -> None:
        """Preempt `seq` by swapping: its blocks are copied to the host tier and freed here; its computed
        tokens stay computed (`allocate` brings them back)."""
        if not self.can_swap_out(seq):
            raise RuntimeError(f"{seq!r} cannot be swapped out: {len(seq.block_table)} blocks, "
                               f"{self.host.num_available if self.host else 0} host blocks available")
        swapped = []
        for block_id in seq.block_table:
            host_id = self.host.take_for_swap()
            self.pending_copies.append(KVCopy(block_id, host_id, to_host=True))
            swapped.append(host_id)
        self.free(seq)
        seq.swapped_blocks = swapped

    def take_copies(self) -> list[KVCopy]:
        """The queued copies, in order; the engine runs them before the next forward pass."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:  # evict the least recently freed cached block
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
                self._spill(block)
            block.hash, block.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    def _spill(self, block: Block) -> None:
        if self.host is None:
            return
        host_id = self.host.store(block.hash, block.token_ids)
        if host_id is not None:
            self.pending_copies.append(KVCopy(block.block_id, host_id, to_host=True))

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is None:
                self.free_block_ids.append(block_id)
            else:
                self.evictable[block_id] = None

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks at once (host-tier ones too); the tail goes first, so it is evicted before
        the shared head."""
        for group in range(len(seq.block_tables)):
            for block_id in reversed(seq.held_blocks(group)):
                self._release(block_id)
        for host_id in seq.swapped_blocks:
            self.host.release_swapped(host_id, swapped_in=False)
        seq.swapped_blocks = []
        seq.block_tables, seq.num_freed_blocks = [], []
        seq.num_registered_blocks = 0

    def free_outside_windows(self, seq: Sequence) -> None:
        """Release the blocks of `seq`'s windowed groups that hold only positions before the window of
        its next token (at `num_computed_tokens`): no layer of the group reads them again."""
        for group, window in enumerate(self.windows):
            if window is None or not seq.block_tables:
                continue
            table = seq.block_tables[group]
            outside = min(len(table), max(0, seq.num_computed_tokens - window + 1) // self.block_size)
            for i in range(seq.num_freed_blocks[group], outside):
                self._release(table[i])
                table[i] = FREED_BLOCK
            seq.num_freed_blocks[group] = max(seq.num_freed_blocks[group], outside)

    def slot_usage(self, seqs: Seq[Sequence]) -> tuple[int, int]:
        """(slots in the blocks `seqs` hold, slots of those holding computed tokens); shared blocks count once."""
        filled: dict[int, int] = {}
        for seq in seqs:
            for group, table in enumerate(seq.block_tables):
                for i in range(seq.num_freed_blocks[group], len(table)):
                    used = min(self.block_size, max(0, seq.num_computed_tokens - i * self.block_size))
                    filled[table[i]] = max(filled.get(table[i], 0), used)
        return len(filled) * self.block_size, sum(filled.values())
