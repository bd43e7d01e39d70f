"""The block manager and scheduler without a model: free list, reference counts, prefix caching,
LRU eviction, preemption and admission, sliding-window groups freeing their old blocks, and
invariants under hypothesis-generated workloads."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvpilot.runtime.engine.block_manager import BlockManager
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import AdmissionError, Scheduler
from kvpilot.runtime.engine.sequence import FREED_BLOCK, Sequence, SequenceStatus
from kvpilot.runtime.memory.kv_groups import window_blocks

BS = 4


def make_seq(tokens: list[int], max_tokens: int = 4, request_id: str | None = None) -> Sequence:
    return Sequence(request_id or f"r{random.random()}", tokens, SamplingParams(max_tokens=max_tokens), BS)


def make_scheduler(num_blocks: int, max_num_seqs: int = 4, max_batched: int = 16, max_model_len: int = 64,
                   prefix_caching: bool = True, windows: tuple[int | None, ...] = (None,)) -> Scheduler:
    config = EngineConfig(device="cpu", block_size=BS, num_kv_blocks=num_blocks, max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched)
    return Scheduler(config, BlockManager(num_blocks, BS, prefix_caching, windows))


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    owners = [0] * bm.num_blocks
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING and len(seq.block_tables) == len(bm.windows)
        for group, window in enumerate(bm.windows):
            table, freed = seq.block_tables[group], seq.num_freed_blocks[group]
            assert len(table) == len(seq.block_table) >= seq.num_blocks_for(seq.num_computed_tokens)
            assert table[:freed] == [FREED_BLOCK] * freed and (window is not None or freed == 0)
            if window is not None:  # nothing the next token's window reads is freed
                assert freed * BS <= max(0, seq.num_computed_tokens - window + 1)
            for block_id in seq.held_blocks(group):
                owners[block_id] += 1
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_tables == [] and seq.num_computed_tokens == 0
    free, evictable = list(bm.free_block_ids), list(bm.evictable)
    assert len(set(free)) == len(free) and not set(free) & set(evictable)
    for block in bm.blocks:
        assert block.ref_count == owners[block.block_id], block
        is_free = block.block_id in bm.evictable or block.block_id in free
        assert is_free == (block.ref_count == 0), block
        assert (block.block_id in bm.evictable) == (block.ref_count == 0 and block.hash is not None), block
    for h, block_id in bm.hash_to_block_id.items():
        assert bm.blocks[block_id].hash == h
    assert bm.num_free_blocks + sum(1 for b in bm.blocks if b.ref_count) == bm.num_blocks


def check_windows_bounded(sched: Scheduler, seqs: list[Sequence]) -> None:
    """A windowed group holds at most the blocks its window spans (ceil((window - 1) / BS) + 1, within
    the ceil(window / BS) + 1 of vLLM's bound)."""
    for seq in seqs:
        for group, window in enumerate(sched.block_manager.windows):
            if window is not None:
                assert len(seq.held_blocks(group)) <= window_blocks(window, BS) <= -(-window // BS) + 1, seq


def run_step(sched: Scheduler, rng: random.Random) -> list[Sequence]:
    """One engine step with a stand-in for the model: every sequence that is ready gets a token."""
    batch = sched.schedule()
    check_windows_bounded(sched, batch.decodes)  # a prompt chunk may span more than the window, a decode never
    finished = []
    for seq in sched.postprocess(batch):
        seq.append_token(rng.randrange(8))
        if seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq, "length")
            finished.append(seq)
    check_windows_bounded(sched, sched.running)
    return finished


def test_prefix_cache_reuses_full_blocks_and_evicts_lru_only_when_needed():
    sched = make_scheduler(num_blocks=8, max_batched=32)
    bm = sched.block_manager
    first = make_seq(list(range(10)), max_tokens=1)
    sched.add(first)
    run_step(sched, random.Random(0))
    assert first.is_finished and bm.num_free_blocks == 8
    head, tail = (bm.hash_to_block_id[h] for h in first.block_hashes[:2])  # tokens 0..3 and 4..7
    assert list(bm.evictable) == [tail, head]  # freed tail first: evicted first
    second = make_seq([*range(9), 99])
    assert bm.find_cached_prefix(second) == [head, tail]
    assert bm.find_cached_prefix(make_seq([5, *range(1, 10)])) == []  # the chain breaks at block 0
    assert bm.find_cached_prefix(make_seq(list(range(8)))) == [head]  # its last token must be computed
    hog = make_seq(list(range(100, 124)))  # 6 blocks: exactly the never-cached free ones
    sched.add(hog)
    sched.schedule()
    assert list(bm.evictable) == [tail, head]
    sched.add(make_seq(list(range(200, 203))))
    sched.schedule()  # no never-cached block is left: the least recently freed cached one goes
    assert list(bm.evictable) == [head] and list(bm.hash_to_block_id.values()) == [head]
    check_invariants(sched)


def test_admission_names_both_numbers():
    sched = make_scheduler(num_blocks=4, max_model_len=64)
    with pytest.raises(AdmissionError, match=r"= 70 tokens exceeds max_model_len 64"):
        sched.add(make_seq([1] * 60, max_tokens=10))
    with pytest.raises(AdmissionError, match=r"needs 5 KV blocks.*holds 4 blocks \(16 tokens\)"):
        sched.add(make_seq([1] * 15, max_tokens=5))
    assert isinstance(AdmissionError("x"), ValueError)  # the server maps ValueErrors to HTTP 400


def test_decodes_come_first_and_prompts_are_chunked_to_the_budget():
    sched = make_scheduler(num_blocks=32, max_batched=6)
    a, b = make_seq(list(range(5)), max_tokens=8), make_seq(list(range(20, 34)), max_tokens=8)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [(s, n) for s, n in batch.prefills] == [(a, 5), (b, 1)]
    sched.postprocess(batch)
    a.append_token(1)
    batch = sched.schedule()
    assert batch.decodes == [a] and batch.prefills == [(b, 5)]
    check_invariants(sched)


def test_max_num_seqs_caps_the_running_batch_fcfs():
    sched = make_scheduler(num_blocks=32, max_num_seqs=2)
    seqs = [make_seq([i] * 3) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    sched.schedule()
    assert sched.running == seqs[:2] and list(sched.waiting) == seqs[2:]


def test_a_decode_without_a_block_preempts_the_newest_sequence():
    sched = make_scheduler(num_blocks=4, max_batched=16, prefix_caching=False)
    old, new = make_seq([1] * 8, max_tokens=8), make_seq([2] * 7, max_tokens=8)
    sched.add(old)
    sched.add(new)
    rng = random.Random(0)
    run_step(sched, rng)  # both prompts: 2 blocks each, the pool is full
    run_step(sched, rng)  # old's next token needs a third block: new is preempted
    assert sched.num_preemptions == 1 and list(sched.waiting) == [new] and new.num_computed_tokens == 0
    assert new.num_output_tokens == 1 and new.num_tokens == 8  # its output so far is kept, recomputed later
    check_invariants(sched)


def test_abort_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=8)
    seq = make_seq(list(range(10)))
    sched.add(seq)
    sched.schedule()
    assert sched.block_manager.num_free_blocks == 5
    sched.finish(seq, "abort")
    assert sched.block_manager.num_free_blocks == 8 and seq.finish_reason == "abort"
    check_invariants(sched)


KINDS = ["add"] * 3 + ["step"] * 5 + ["abort", "finish", "preempt"]
operations = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 14), st.integers(1, 8), st.integers(0, 2)),
                      min_size=20, max_size=80)


# one group of every layer; Mistral v0.1 (every layer windowed); Gemma 2 (full / windowed); Gemma 3's
# padded groups (one full, two windowed)
WINDOWS = [(None,), (5,), (None, 6), (None, 9, 9)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, num_blocks=st.integers(3, 12), prefix_caching=st.booleans(), seed=st.integers(0, 99),
       windows=st.sampled_from(WINDOWS))
def test_invariants_hold_and_nothing_leaks(ops, num_blocks, prefix_caching, seed, windows):
    rng = random.Random(seed)
    prefix_caching = prefix_caching and len(windows) == 1  # the prefix cache needs one group
    sched = make_scheduler(num_blocks=num_blocks, max_num_seqs=4, max_batched=8, max_model_len=32,
                           prefix_caching=prefix_caching, windows=windows)
    live: list[Sequence] = []
    forced, window_freed = 0, False
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, family = op
            tokens = [family] * min(prompt_len, 6) + [rng.randrange(2) for _ in range(prompt_len - 6)]
            seq = make_seq(tokens, max_tokens)
            try:
                sched.add(seq)
                live.append(seq)
            except AdmissionError:
                assert sched.block_manager.blocks_for_sequence(prompt_len + max_tokens) > num_blocks
        elif op[0] == "step":
            for seq in run_step(sched, rng):
                live.remove(seq)
        elif live:
            seq = live[(op[1] + op[3]) % len(live)]
            if op[0] == "preempt":
                if seq.status is SequenceStatus.RUNNING:
                    sched.preempt(seq)
                    forced += 1
            else:
                sched.finish(seq, "abort" if op[0] == "abort" else "stop")
                live.remove(seq)
        check_invariants(sched)
        window_freed = window_freed or any(sum(seq.num_freed_blocks) for seq in sched.running)
    for _ in range(500):  # no deadlock: what is left always drains
        if not sched.has_unfinished:
            break
        for seq in run_step(sched, rng):
            live.remove(seq)
        check_invariants(sched)
    assert not live and not sched.has_unfinished
    event(f"scheduler preempted: {sched.num_preemptions > forced}")
    bm = sched.block_manager
    event(f"prefix cache hit: {bm.prefix_cache_hits > 0}")
    event(f"window freed a block: {window_freed}")
    assert bm.num_free_blocks == num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def test_a_windowed_group_frees_what_its_window_left_behind():
    """Gemma 2's layout: a full-attention table and a window-8 table. The full one keeps every block;
    the windowed one, however long the sequence, only the blocks under the window of its next token."""
    sched = make_scheduler(num_blocks=20, max_batched=8, prefix_caching=False, windows=(None, 8))
    bm = sched.block_manager
    seq = make_seq(list(range(30)), max_tokens=10)
    sched.add(seq)
    rng = random.Random(0)
    while seq.num_computed_tokens < 30:  # the prompt, chunked 8 tokens at a time
        run_step(sched, rng)
        check_invariants(sched)
    full, windowed = seq.block_tables
    assert len(seq.held_blocks(0)) == len(full) == 8
    assert seq.num_freed_blocks == [0, 5] and windowed[:5] == [FREED_BLOCK] * 5  # positions 0..19 are behind 23..30
    assert bm.num_free_blocks == 20 - 8 - 3
    while not seq.is_finished:
        run_step(sched, rng)
        check_invariants(sched)
    assert bm.num_free_blocks == 20 and all(b.ref_count == 0 for b in bm.blocks)


def test_a_windowed_prompt_longer_than_the_free_blocks_is_admitted_chunk_by_chunk():
    """The pool holds exactly one sequence at its peak (11 full + 3 windowed blocks); its 40-token prompt in
    one chunk would take 10 + 10: it is admitted with what fits and finishes, nothing refused or stuck."""
    sched = make_scheduler(num_blocks=14, max_batched=64, prefix_caching=False, windows=(None, 8))
    seq = make_seq([1] * 40, max_tokens=4)
    assert sched.block_manager.blocks_for_sequence(44) == 14
    sched.add(seq)
    first = sched.schedule()
    assert first.prefills == [(seq, 28)]  # 7 + 7 blocks
    sched.postprocess(first)
    check_invariants(sched)
    rng = random.Random(0)
    for _ in range(20):
        if seq.is_finished:
            break
        run_step(sched, rng)
        check_invariants(sched)
    assert seq.is_finished and sched.num_preemptions == 0 and sched.block_manager.num_free_blocks == 14


def test_prefix_caching_needs_one_group():
    with pytest.raises(ValueError, match=r"prefix cache needs exactly one KV group, got windows \[None, 8\]"):
        BlockManager(8, BS, True, (None, 8))
    BlockManager(8, BS, False, (None, 8))
    BlockManager(8, BS, True, (8,))  # Mistral v0.1: one windowed group keeps its prefix cache


def test_the_same_tokens_under_another_rope_share_no_block():
    """A longrope sequence that may pass the original context reads the long factors' rotary rows
    (rope_offset): its K/V differ from the same tokens' under the short factors."""
    sched = make_scheduler(num_blocks=8, max_batched=32)
    short = make_seq(list(range(10)), max_tokens=1)
    sched.add(short)
    run_step(sched, random.Random(0))
    same, long = make_seq([*range(9), 99]), make_seq([*range(9), 99])
    long.rope_offset = 64
    assert len(sched.block_manager.find_cached_prefix(same)) == 2
    assert sched.block_manager.find_cached_prefix(long) == []
