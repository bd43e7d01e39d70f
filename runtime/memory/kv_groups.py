"""How the paged KV pool holds layers with different attention windows (vLLM's hybrid allocator, in
its simplest form).

Layers are grouped by window; each group has its own block table per sequence (same block size),
and a windowed group frees the blocks wholly outside the window of its newest token, so a windowed
layer holds at most `window` tokens per sequence however long the sequence grows.

Every block of the one pool has the same bytes: `width` layers' K and V for `block_size` tokens.
A block id belongs to one group's table at a time, and layer slot j of a block holds the j-th layer
of whichever group owns it. `width` is the smallest group of layers sharing a window; a larger one
is split into groups of `width` layers, the last one padded (its padding slots are counted in the
memory, never used). With one window (or none) there is one group of every layer: the pool is the
plain one.

A window at least as long as the context frees nothing: its layers count as full attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.memory.quantization import kv_bytes_per_token


@dataclass(frozen=True)
class KVGroups:
    windows: tuple[int | None, ...]  # per group: its layers' window in tokens, None for full attention
    layer_slots: tuple[tuple[int, int], ...]  # per layer: (its group, its slot in the group's blocks)
    width: int  # layer slots in one block

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def is_hybrid(self) -> bool:
        """More than one block table per sequence."""
        return self.num_groups > 1

    @property
    def sliding_windows(self) -> tuple[int, ...]:
        return tuple(sorted({w for w in self.windows if w is not None}))

    def layer_groups(self) -> list[int]:
        return [group for group, _ in self.layer_slots]

    def blocks_per_sequence(self, num_tokens: int, block_size: int) -> int:
        return blocks_per_sequence(self.windows, num_tokens, block_size)

    def for_layers(self, layers: range) -> KVGroups:
        """The pool of a pipeline stage that holds `layers`: every group (block ids are the scheduler's,
        one table per group for all stages), each block holding only this stage's layers of its group."""
        taken: dict[int, int] = {}
        slots = []
        for layer in layers:
            group = self.layer_slots[layer][0]
            slots.append((group, taken.get(group, 0)))
            taken[group] = taken.get(group, 0) + 1
        return KVGroups(self.windows, tuple(slots), max(taken.values()))


def blocks_per_sequence(windows: Sequence[int | None], num_tokens: int, block_size: int) -> int:
    """The most blocks one sequence of up to `num_tokens` tokens holds while it decodes, over groups of
    `windows`: every block of a full-attention group; in a windowed group, the blocks under the window
    of its newest token. The plan sizes by it, and the scheduler admits by it."""
    whole = math.ceil(num_tokens / block_size)
    return sum(whole if w is None else min(whole, window_blocks(w, block_size)) for w in windows)


def window_blocks(window: int, block_size: int) -> int:
    """Blocks that `window` consecutive positions can span."""
    return math.ceil((window - 1) / block_size) + 1


def kv_groups(windows: Sequence[int | None], max_model_len: int) -> KVGroups:
    """Group `windows` (one per layer, as `support.layer_windows` gives them) for a context of
    `max_model_len` tokens."""
    if not windows:
        raise ValueError("a model needs at least one layer to group")
    effective = [w if w is not None and w < max_model_len else None for w in windows]
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(effective):
        by_window.setdefault(window, []).append(layer)
    ordered = sorted(by_window.items(), key=lambda item: (item[0] is not None, item[0] or 0))  # full first
    width = min(len(layers) for _, layers in ordered)
    group_windows: list[int | None] = []
    slots: dict[int, tuple[int, int]] = {}
    for window, layers in ordered:
        for start in range(0, len(layers), width):
            for slot, layer in enumerate(layers[start : start + width]):
                slots[layer] = (len(group_windows), slot)
            group_windows.append(window)
    return KVGroups(tuple(group_windows), tuple(slots[layer] for layer in range(len(windows))), width)


def model_kv_groups(facts: ModelFacts, max_model_len: int) -> KVGroups:
    return kv_groups(facts.layer_windows or (None,) * facts.num_layers, max_model_len)


def kv_block_bytes(facts: ModelFacts, kv_dtype: str, block_size: int, groups: KVGroups, tp: int = 1) -> int:
    """One block of the pool on one GPU: `groups.width` layers' K and V for `block_size` tokens
    (`block_size x kv_bytes_per_token` when there is one group)."""
    return kv_bytes_per_token(facts, kv_dtype, tp) // facts.num_layers * groups.width * block_size
