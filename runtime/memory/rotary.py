"""The rotary cos/sin tables the runtime builds at load time: derived, not weights, but on the GPU all the same.

`runtime/models/layers.py` RotaryEmbedding holds, for each rope set of the model (one; Gemma 3: its
local and its global layers' bases), an fp32 cos and an fp32 sin table of `max_model_len` rows by
half the rotary dimension; longrope past its original context holds a second block of rows for its
long factors. Every GPU of every pipeline stage builds every set (tensor parallelism splits heads, not
positions). Llama-3.1-8B at 131,072 positions: 2 x 131,072 x 64 x 4 bytes = 64 MiB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kvpilot.runtime.memory.support import rope_settings

if TYPE_CHECKING:
    from kvpilot.runtime.memory.facts import ModelFacts

TABLE_ENTRY_BYTES = 4  # fp32: the tables are built, and kept, in fp32 whatever the compute dtype
TABLES_PER_SET = 2  # cos and sin


def rope_set_originals(config: Mapping[str, Any]) -> tuple[int, ...]:
    """One entry per rope set the runtime builds: longrope's original context (past it the set holds
    the long factors' rows too), else 0."""
    return tuple(int(rope.get("original_max_position_embeddings") or 0) if rope["rope_type"] == "longrope" else 0
                 for rope in rope_settings(config).values())


def rotary_dim(head_dim: int, config: Mapping[str, Any]) -> int:
    """The channels of each head that rotate (partial rotary: Phi), as the model file reads them."""
    rope = next(iter(rope_settings(config).values()))
    return int(head_dim * float(rope.get("partial_rotary_factor", 1.0))) or head_dim


def rotary_table_bytes(facts: ModelFacts, max_positions: int) -> int:
    """Bytes of every rotary table on one GPU for a context of `max_positions` tokens."""
    rows = sum(2 * max_positions if 0 < original < max_positions else max_positions for original in facts.rope_sets)
    frequencies = ((facts.rotary_dim or facts.head_dim) + 1) // 2
    return TABLES_PER_SET * rows * frequencies * TABLE_ENTRY_BYTES
