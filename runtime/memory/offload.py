"""Weights offload, the last resort: which decoder layers keep their weights in host memory.

A plan that offloads `count` of a stage's layers keeps their weights in host memory (pinned on a GPU)
and streams each one into one of two GPU staging buffers just ahead of its use, double-buffered: the
copy of the next offloaded layer overlaps the compute of the layers before it. The offloaded layers
are spread evenly over the stage, so resident layers sit between them and hide the copies.

Pure Python: the plan (operator, `kvpilot plan`) and the engine (`--offload-layers`) pick the same
layers from this one function.
"""

from __future__ import annotations


def offloaded_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """Indices (0-based, within the stage) of the `count` layers whose weights live in host memory,
    spread evenly: the middle of each of `count` equal slices of the stage's layers."""
    if not 0 <= count <= num_layers:
        raise ValueError(f"offload_layers must be between 0 and the model's {num_layers} layers, got {count}")
    return tuple((2 * j + 1) * num_layers // (2 * count) for j in range(count))
