"""A request as the engine sees it: one `Sequence` that the scheduler, block manager and model runner
all read. Its tokens are the prompt followed by the output so far; `num_computed_tokens` of them
have their K/V in the cache (after a preemption by recompute it drops back to 0; a preemption by swap
keeps it, the K/V waiting in the host tier)."""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any, NamedTuple

import torch

from kvpilot.runtime.engine.sampling import SamplingParams

FREED_BLOCK = 0  # what a windowed group's freed table entry points at


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TokenLogprob(NamedTuple):
    """One generated token's log-probability and the top-n alternatives, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None  # 1 + how many tokens were likelier (set for prompt logprobs, as vLLM reports)


class Sequence:
    _ids = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, block_size: int,
                 generator: torch.Generator | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt must hold at least one token")
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.params = params
        self.block_size = block_size
        self.generator = generator  # set only for requests with a seed: reproducible per request
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the first schedule
        # One block table per KV group (memory/kv_groups.py), all of one length: entry i holds
        # positions i * block_size ..; a windowed group's first `num_freed_blocks[g]` entries are freed
        # (FREED_BLOCK: a valid index the window masks, so the kernels' block arithmetic is unchanged)
        self.block_tables: list[list[int]] = []
        self.num_freed_blocks: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks, computed once per block
        self.num_registered_blocks = 0  # leading blocks whose hash the block manager has recorded
        self.swapped_blocks: list[int] = []  # swapped out: the host-tier blocks its computed tokens wait in
        self.rope_offset = 0  # added to its positions: which rotary rows it reads (the model's rope_offset)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        # prompt_logprobs asked: entry i is prompt token i's (None for the first, which nothing predicts)
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        # Structured output: the request's llguidance matcher (engine/guidance.py); the sampler masks with it
        # and advances it by each token drawn.
        self.matcher: Any | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_tables}, {self.status.value})")

    @property
    def block_table(self) -> list[int]:
        """The first group's table (every layer's, unless layers of different windows split the pool)."""
        return self.block_tables[0] if self.block_tables else []

    def held_blocks(self, group: int) -> list[int]:
        """The blocks `group`'s table holds (its freed entries left out)."""
        return self.block_tables[group][self.num_freed_blocks[group]:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def block_tokens(self, index: int) -> list[int]:
        return self.token_ids[index * self.block_size : (index + 1) * self.block_size]

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)

    def reset_for_recompute(self) -> None:
        """Preempted: its blocks are gone, so every token (prompt and output) is computed again."""
        self.num_computed_tokens = 0
        self.block_tables, self.num_freed_blocks = [], []
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
