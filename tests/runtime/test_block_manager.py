"""The block manager and scheduler without a model: free list, reference counts, prefix caching,
LRU eviction, preemption and admission, and invariants under hypothesis-generated workloads."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvpilot.runtime.engine.block_manager import BlockManager
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import AdmissionError, Scheduler
from kvpilot.runtime.engine.sequence import Sequence, SequenceStatus

BS = 4


def make_seq(tokens: list[int], max_tokens: int = 4, request_id: str | None = None) -> Sequence:
    return Sequence(request_id or f"r{random.random()}", tokens, SamplingParams(max_tokens=max_tokens), BS)


def make_scheduler(num_blocks: int, max_num_seqs: int = 4, max_batched: int = 16, max_model_len: int = 64,
                   prefix_caching: bool = True) -> Scheduler:
    config = EngineConfig(device="cpu", block_size=BS, num_kv_blocks=num_blocks, max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched)
    return Scheduler(config, BlockManager(num_blocks, BS, prefix_caching))


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    owners = [0] * bm.num_blocks
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) >= seq.num_blocks_for(seq.num_computed_tokens)
        for block_id in seq.block_table:
            owners[block_id] += 1
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
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


def run_step(sched: Scheduler, rng: random.Random) -> list[Sequence]:
    """One engine step with a stand-in for the model: every sequence that is ready gets a token."""
    batch = sched.schedule()
    finished = []
    for seq in sched.postprocess(batch):
        seq.append_token(rng.randrange(8))
        if seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq, "length")
            finished.append(seq)
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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, num_blocks=st.integers(3, 8), prefix_caching=st.booleans(), seed=st.integers(0, 99))
def test_invariants_hold_and_nothing_leaks(ops, num_blocks, prefix_caching, seed):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=num_blocks, max_num_seqs=4, max_batched=8, max_model_len=32,
                           prefix_caching=prefix_caching)
    live: list[Sequence] = []
    forced = 0
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, family = op
            tokens = [family] * min(prompt_len, 6) + [rng.randrange(2) for _ in range(prompt_len - 6)]
            seq = make_seq(tokens, max_tokens)
            try:
                sched.add(seq)
                live.append(seq)
            except AdmissionError:
                assert -(-(prompt_len + max_tokens) // BS) > num_blocks
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
    assert bm.num_free_blocks == num_blocks and all(b.ref_count == 0 for b in bm.blocks)
