"""Pipeline stages: which decoder layers each stage holds, and where the embeddings and lm_head live.

Layers are split as vLLM splits them (`vllm.distributed.utils.get_pp_indices`): evenly, and a
remainder of r layers goes one each to the r stages before the last (the last holds the final norm
and lm_head, the first the embeddings; the middle ones are filled first so no end stage grows).
The embeddings live on the first stage and the final norm and lm_head on the last; a tied lm_head
is the embedding matrix itself, so with more than one stage the last holds a copy of it, as vLLM
loads it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    index: int
    layers: range
    first: bool = True
    last: bool = True

    @property
    def holds_embeddings(self) -> bool:
        return self.first

    def holds_lm_head(self, tied: bool, pipeline_parallel: int) -> bool:
        """Whether this stage holds an lm_head matrix of its own (tied: only a copy beyond one stage)."""
        return self.last and (not tied or pipeline_parallel > 1)


def layer_partition(num_layers: int, pipeline_parallel: int) -> list[int]:
    """Layers per stage: even, the remainder one each to the stages before the last (vLLM's rule)."""
    if not 1 <= pipeline_parallel <= num_layers:
        raise ValueError(f"pipeline parallel {pipeline_parallel} must be between 1 and the model's "
                         f"{num_layers} layers")
    counts = [num_layers // pipeline_parallel] * pipeline_parallel
    for i in range(2, num_layers % pipeline_parallel + 2):
        counts[-i] += 1
    return counts


def pipeline_stages(num_layers: int, pipeline_parallel: int = 1) -> list[Stage]:
    counts = layer_partition(num_layers, pipeline_parallel)
    stages, start = [], 0
    for index, count in enumerate(counts):
        stages.append(Stage(index, range(start, start + count), index == 0, index == pipeline_parallel - 1))
        start += count
    return stages


def whole_model(num_layers: int) -> Stage:
    return Stage(0, range(num_layers))
