"""Continuous batching with chunked prefill, FCFS.

Every step runs, in this order and within `max_num_batched_tokens`:
1. every running sequence's decode (one token each), oldest first; when the pool has no block for
   one, the newest running sequence is preempted (blocks freed, back to the head of the queue), down
   to the decoding sequence itself: by swap (its blocks to the host tier, back when it resumes) when
   there is a host tier with room and the swap policy prefers it, else by recompute;
2. the rest of the running prompts, chunked to the budget and to the free blocks;
3. waiting sequences, oldest first, each with as much of its prompt as the budget leaves, as long
   as the pool holds the chunk and fewer than `max_num_seqs` run (with sliding windows, as much of
   the chunk as the pool holds: a windowed prompt can need more blocks at once than it ever keeps).
   None after a preemption: the pool is short already.
A request that could never fit (longer than `max_model_len`, or than the whole pool) is refused
when it arrives, so no sequence waits forever and the queue never deadlocks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvpilot.runtime.engine.block_manager import BlockManager
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.host_kv import SwapPolicy
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.sequence import Sequence, SequenceStatus
from kvpilot.runtime.memory.kv_groups import blocks_per_sequence


class AdmissionError(ValueError):
    """A request that can never be served (HTTP 400): the message names the request's and the limit's numbers."""


@dataclass(frozen=True)
class RequestLimits:
    """What decides whether a request can ever be served: the vocabulary, the model length and the
    KV pool's shape. The engine admits by it; a client in another process checks with the engine's
    own copy before anything is sent back."""

    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    windows: tuple[int | None, ...]

    def check(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """`params` normalised for this vocabulary; raises `AdmissionError` naming the numbers."""
        if not prompt_token_ids:
            raise AdmissionError(f"request {request_id!r}: the prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise AdmissionError(f"request {request_id!r}: prompt token ids {bad[:5]} are outside the vocabulary "
                                 f"0..{vocab - 1}")
        self.check_length(request_id, len(prompt_token_ids), params.max_tokens)
        try:
            return params.for_vocab(vocab)
        except ValueError as err:
            raise AdmissionError(f"request {request_id!r}: {err}") from None

    def check_length(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        check_length(request_id, num_prompt_tokens, max_tokens, self.max_model_len, self.windows,
                     self.num_kv_blocks, self.block_size)


def check_length(request_id: str, num_prompt_tokens: int, max_tokens: int, max_model_len: int,
                 windows: tuple[int | None, ...], num_blocks: int, block_size: int) -> None:
    """Refuse a sequence longer than the model or than the whole KV pool."""
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise AdmissionError(f"request {request_id!r}: prompt ({num_prompt_tokens} tokens) + max_tokens "
                             f"({max_tokens}) = {total} tokens exceeds max_model_len {max_model_len}")
    blocks = blocks_per_sequence(windows, total, block_size)
    if blocks > num_blocks:
        tokens = num_blocks // len(windows) * block_size  # for every layer
        raise AdmissionError(f"request {request_id!r}: prompt ({num_prompt_tokens} tokens) + max_tokens "
                             f"({max_tokens}) = {total} tokens needs {blocks} KV blocks, but the whole KV cache "
                             f"holds {num_blocks} blocks ({tokens} tokens)")


@dataclass
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)  # one token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens in this chunk)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    def items(self) -> list[tuple[Sequence, int]]:
        return [(seq, 1) for seq in self.decodes] + self.prefills


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, swap: SwapPolicy | None = None) -> None:
        """`swap`: when a preempted sequence is swapped to the host tier (None: always recomputed)."""
        if not config.is_complete:
            raise ValueError("the scheduler needs a complete config: call EngineConfig.for_model first")
        self.max_model_len: int = config.max_model_len
        self.max_num_seqs: int = config.max_num_seqs
        self.max_num_batched_tokens: int = config.max_num_batched_tokens
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swap_preemptions = 0  # of those, swapped to the host tier
        self.swap = swap
        self._seq_limit = self.max_num_seqs  # of the step being scheduled

    def check_admission(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        bm = self.block_manager
        check_length(request_id, num_prompt_tokens, max_tokens, self.max_model_len, bm.windows, bm.num_blocks,
                     bm.block_size)

    def add(self, seq: Sequence) -> None:
        self.check_admission(seq.request_id, seq.num_prompt_tokens, seq.params.max_tokens)
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (finished or aborted) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self.block_manager.free(seq)  # a swapped-out sequence's host blocks
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def preempt(self, seq: Sequence, batch: ScheduledBatch | None = None) -> None:
        """Free `seq`'s blocks now (swapped to the host tier, or to be recomputed), put it first in the queue."""
        self.running.remove(seq)
        bm = self.block_manager
        if (self.swap is not None and bm.can_swap_out(seq)
                and self.swap.prefers_swap(len(seq.block_table), seq.num_computed_tokens)):
            bm.swap_out(seq)
            seq.status = SequenceStatus.WAITING
            self.num_swap_preemptions += 1
        else:
            bm.free(seq)
            seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        if batch is not None:
            batch.preempted.append(seq)

    def _victim(self, seq: Sequence, scheduled: set[int]) -> Sequence | None:
        """The newest running sequence other than `seq` that has nothing scheduled in this step."""
        for other in reversed(self.running):
            if other is not seq and other.seq_id not in scheduled:
                return other
        return None

    def _tokens_that_fit(self, seq: Sequence, wanted: int) -> int:
        return self.block_manager.tokens_that_fit(seq, wanted)

    def schedule(self, busy: frozenset[int] = frozenset(), max_seqs: int | None = None) -> ScheduledBatch:
        """`busy`: sequences in a step still in flight (pipeline micro-batches): neither scheduled nor
        preempted until their step is back; `max_seqs`: the most sequences this step takes (a share of
        the running ones per micro-batch, so the stages get steps of even size)."""
        batch, scheduled = ScheduledBatch(), set(busy)
        self._seq_limit = max_seqs or self.max_num_seqs
        budget = self._schedule_decodes(batch, scheduled, self.max_num_batched_tokens)
        budget = self._schedule_running_prompts(batch, scheduled, budget)
        if not batch.preempted:
            self._admit_waiting(batch, scheduled, budget)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch, scheduled: set[int], budget: int) -> int:
        bm = self.block_manager
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1 or seq.seq_id in scheduled:
                continue
            if self._full(batch):
                break
            while not bm.can_allocate(seq, 1):
                victim = self._victim(seq, scheduled)
                self.preempt(victim or seq, batch)
                if victim is None:
                    break
            else:
                bm.allocate(seq, 1)
                batch.decodes.append(seq)
                scheduled.add(seq.seq_id)
                budget -= 1
        return budget

    def _schedule_running_prompts(self, batch: ScheduledBatch, scheduled: set[int], budget: int) -> int:
        """Chunks of prompts already started, oldest first; one that finds no free block preempts
        newer sequences, so the oldest always progresses."""
        for seq in list(self.running):
            if budget <= 0 or self._full(batch):
                break
            if seq.status is not SequenceStatus.RUNNING or seq.seq_id in scheduled:
                continue
            num_new = self._tokens_that_fit(seq, min(seq.num_uncomputed_tokens, budget))
            while num_new == 0 and (victim := self._victim(seq, scheduled)) is not None \
                    and self.running.index(victim) > self.running.index(seq):
                self.preempt(victim, batch)
                num_new = self._tokens_that_fit(seq, min(seq.num_uncomputed_tokens, budget))
            if num_new:
                self.block_manager.allocate(seq, num_new)
                batch.prefills.append((seq, num_new))
                scheduled.add(seq.seq_id)
                budget -= num_new
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, scheduled: set[int], budget: int) -> None:
        """FCFS: stop at the first waiting sequence whose next chunk the pool cannot hold."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not self._full(batch):
            seq = self.waiting[0]
            cached = bm.find_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens - len(cached) * bm.block_size, budget)
            if bm.has_windows:
                num_new = bm.tokens_that_fit(seq, num_new, cached)
            if not num_new or not bm.can_allocate(seq, num_new, cached):
                break
            self.waiting.popleft()
            bm.allocate(seq, num_new, cached)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.monotonic()
            self.running.append(seq)
            batch.prefills.append((seq, num_new))
            scheduled.add(seq.seq_id)
            budget -= num_new

    def _full(self, batch: ScheduledBatch) -> bool:
        return len(batch.decodes) + len(batch.prefills) >= self._seq_limit

    def postprocess(self, batch: ScheduledBatch) -> list[Sequence]:
        """Count the computed tokens, record newly full blocks in the prefix cache; return the
        sequences whose every token is now computed: each gets its next token sampled."""
        ready = []
        for seq, num_new in batch.items():
            seq.num_computed_tokens += num_new
            self.block_manager.cache_full_blocks(seq)
            self.block_manager.free_outside_windows(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                ready.append(seq)
        return ready
