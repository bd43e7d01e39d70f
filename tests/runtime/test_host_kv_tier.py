"""The host KV tier without a model: copies are bit-exact, the host index's LRU, the swap cost model,
a hypothesis state machine over allocate / grow / free / evict / spill / restore / swap that keeps
both tiers' invariants and checks, after every step, that every block holds the K/V of its tokens, and
the scheduler swapping preempted sequences out and back in under random load, draining without a leak."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpilot.runtime.engine.block_manager import BlockManager
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.host_kv import HostBlockIndex, HostKVTier, KVCopy, SwapPolicy
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import AdmissionError, Scheduler
from kvpilot.runtime.engine.sequence import Sequence, SequenceStatus
from kvpilot.runtime.memory.host_tier import CPU_SWAP_COST, GPU_SWAP_COST, SwapCost, host_kv_blocks

BS = 4
GPU_BLOCKS = 8
HOST_BLOCKS = 3  # fewer than a prompt's blocks: restores and spills contend for the host blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_a_block_comes_back_bit_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(2, 3, 5, BS, 2, 8, generator=gen) * 100).to(dtype)  # width 3, 5 blocks
    tier = HostKVTier(pool, 2)
    original = pool[:, :, 3].clone()
    tier.run([KVCopy(3, 1, to_host=True)])
    pool[:, :, 3] = 0
    tier.run([KVCopy(0, 1, to_host=False), KVCopy(3, 1, to_host=False)])
    assert torch.equal(pool[:, :, 3].view(torch.uint8), original.view(torch.uint8))
    assert torch.equal(pool[:, :, 0].view(torch.uint8), original.view(torch.uint8))
    assert tier.block_bytes == 2 * 3 * BS * 2 * 8 * pool.element_size()
    assert tier.bytes_to_host == tier.block_bytes and tier.bytes_to_gpu == 2 * tier.block_bytes
    assert tier.nbytes == 2 * tier.block_bytes


def test_the_host_index_evicts_its_least_recently_used_block():
    index = HostBlockIndex(2)
    a, b = index.store(1, (1,)), index.store(2, (2,))
    assert index.store(1, (1,)) is None  # already here: now the most recently used
    c = index.store(3, (3,))
    assert c == b and index.lookup(2, (2,)) is None and index.lookup(1, (1,)) == a
    assert index.lookup(1, (9,)) is None  # same hash, other tokens: a collision is a miss
    index.take_for_swap()  # evicts 1, the least recently used
    assert index.lookup(1, (1,)) is None and index.num_available == 1 and index.num_used == 2


def test_the_swap_cost_model():
    cost = SwapCost(link_bytes_per_s=1e9, prefill_seconds_per_token_layer=1e-6)
    assert cost.swap_seconds(10**9) == 2.0 and cost.recompute_seconds(1000, 30) == pytest.approx(0.03)
    assert not cost.swap_is_cheaper(10**9, 1000, 30) and cost.swap_is_cheaper(10**6, 1000, 30)
    # SmolLM2-135M fp32: 30 layers x 2 x 3 KV heads x 64 x 4 bytes = 46 KiB per token
    per_token = 30 * 2 * 3 * 64 * 4
    assert CPU_SWAP_COST.swap_is_cheaper(512 * per_token, 512, 30)
    # Llama-3-8B bf16: 128 KiB per token, 32 layers: swap is cheaper over PCIe Gen4, recompute over 1 GB/s
    assert GPU_SWAP_COST.swap_is_cheaper(512 * 128 * 1024, 512, 32)
    assert not SwapCost(1e9, GPU_SWAP_COST.prefill_seconds_per_token_layer).swap_is_cheaper(512 * 128 * 1024, 512, 32)
    forced = SwapPolicy("swap", GPU_SWAP_COST, 10**9, 32)
    assert forced.prefers_swap(100, 1) and not SwapPolicy("recompute", CPU_SWAP_COST, 1, 32).prefers_swap(1, 10**6)
    assert host_kv_blocks(10 * 1024 + 5, 1024) == 10
    with pytest.raises(ValueError, match="-1"):
        host_kv_blocks(-1, 1024)


@pytest.mark.parametrize(("options", "match"), [({"host_kv_blocks": -1}, "host_kv_blocks"),
                                                ({"preemption_mode": "spill"}, "preemption_mode")])
def test_config_refuses_bad_host_tier_options(options, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(device="cpu", **options)


def content(tokens: list[int], position: int) -> float:
    """What 'the model' writes for `position`: a function of every token up to it, as K/V are."""
    return float(hash(tuple(tokens[: position + 1])) % (1 << 20))


BASES = ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7])


class TwoTiers(RuleBasedStateMachine):
    def __init__(self, host_blocks: int = HOST_BLOCKS) -> None:
        super().__init__()
        self.index = HostBlockIndex(host_blocks)
        self.bm = BlockManager(GPU_BLOCKS, BS, True, (None,), self.index)
        self.pool = torch.zeros(2, 1, GPU_BLOCKS, BS, 1, 1)
        self.tier = HostKVTier(self.pool, host_blocks)
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.prefix_of: dict[int, tuple[int, ...]] = {}  # block hash -> the tokens up to its end

    def _compute(self, seq: Sequence) -> None:
        """Run the queued copies, check what the sequence has computed, then 'run the model' on the rest."""
        self.tier.run(self.bm.take_copies())
        self._check_sequence(seq)
        for pos in range(seq.num_computed_tokens, seq.num_tokens):
            slot = (seq.block_table[pos // BS], pos % BS)
            self.pool[0, 0, slot[0], slot[1]] = content(seq.token_ids, pos)
            self.pool[1, 0, slot[0], slot[1]] = -content(seq.token_ids, pos)
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_blocks(seq)
        for i, block_hash in enumerate(seq.block_hashes):
            self.prefix_of[block_hash] = tuple(seq.token_ids[: (i + 1) * BS])

    def _check_sequence(self, seq: Sequence) -> None:
        for pos in range(seq.num_computed_tokens):
            block, slot = seq.block_table[pos // BS], pos % BS
            assert self.pool[0, 0, block, slot].item() == content(seq.token_ids, pos), (seq, pos)
            assert self.pool[1, 0, block, slot].item() == -content(seq.token_ids, pos), (seq, pos)

    def _expected_block(self, block_hash: int) -> torch.Tensor:
        tokens = list(self.prefix_of[block_hash])
        values = torch.tensor([content(tokens, p) for p in range(len(tokens) - BS, len(tokens))])
        return torch.stack([values, -values]).view(2, 1, BS, 1, 1)

    @rule(base=st.sampled_from(BASES), tail=st.lists(st.integers(0, 3), max_size=6), cut=st.integers(1, 12))
    def add(self, base: list[int], tail: list[int], cut: int) -> None:
        seq = Sequence(f"r{len(self.prefix_of)}-{cut}", (base[:cut] + tail) or [0], SamplingParams(), BS)
        prefix = self.bm.find_prefix(seq)
        num_new = seq.num_uncomputed_tokens - len(prefix) * BS
        if self.bm.can_allocate(seq, num_new, prefix):
            self.bm.allocate(seq, num_new, prefix)
            assert seq.num_computed_tokens == len(prefix) * BS
            self._compute(seq)
            self.running.append(seq)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 100), token=st.integers(0, 3))
    def grow(self, pick: int, token: int) -> None:
        seq = self.running[pick % len(self.running)]
        seq.append_token(token)
        if self.bm.can_allocate(seq, 1):
            self.bm.allocate(seq, 1)
            self._compute(seq)
        else:
            seq.token_ids.pop()

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 100))
    def free(self, pick: int) -> None:
        seq = self.running.pop(pick % len(self.running))
        self.bm.free(seq)

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 100))
    def swap_out(self, pick: int) -> None:
        seq = self.running[pick % len(self.running)]
        if self.bm.can_swap_out(seq):
            self.bm.swap_out(seq)
            self.tier.run(self.bm.take_copies())
            self.running.remove(seq)
            self.swapped.append(seq)

    @precondition(lambda self: self.swapped)
    @rule(pick=st.integers(0, 100))
    def swap_in(self, pick: int) -> None:
        seq = self.swapped[pick % len(self.swapped)]
        assert len(self.bm.find_prefix(seq)) == 0
        if self.bm.can_allocate(seq, 0):
            self.bm.allocate(seq, 0)
            self._compute(seq)  # checks every computed token came back
            self.swapped.remove(seq)
            self.running.append(seq)

    @precondition(lambda self: self.swapped)
    @rule(pick=st.integers(0, 100))
    def abort_swapped(self, pick: int) -> None:
        self.bm.free(self.swapped.pop(pick % len(self.swapped)))

    @invariant()
    def gpu_pool_is_consistent(self) -> None:
        bm = self.bm
        assert not bm.pending_copies
        owners = [0] * GPU_BLOCKS
        for seq in self.running:
            for block_id in seq.block_table:
                owners[block_id] += 1
        free, evictable = list(bm.free_block_ids), list(bm.evictable)
        assert len(set(free)) == len(free) and not set(free) & set(evictable)
        for block in bm.blocks:
            assert block.ref_count == owners[block.block_id], block
            assert (block.block_id in free or block.block_id in evictable) == (block.ref_count == 0), block
            if block.hash is not None:  # a cached block holds its tokens' K/V
                assert bm.hash_to_block_id[block.hash] == block.block_id
                assert torch.equal(self.pool[:, :, block.block_id], self._expected_block(block.hash)), block

    @invariant()
    def host_tier_is_consistent(self) -> None:
        index = self.index
        cached = list(index.cached.values())
        swapped = [h for seq in self.swapped for h in seq.swapped_blocks]
        every = list(index.free_ids) + cached + swapped
        assert sorted(every) == list(range(index.num_blocks))  # no leak, no block in two places
        assert index.swapped == set(swapped) and not index.held and set(index.keys) == set(cached)
        assert index.num_used == len(cached) + len(swapped) <= index.num_blocks
        for block_hash, host_id in index.cached.items():
            assert index.keys[host_id][0] == block_hash
            assert torch.equal(self.tier.pool[host_id], self._expected_block(block_hash))
        for seq in self.swapped:
            assert seq.block_tables == [] and seq.num_computed_tokens == seq.num_tokens


TwoTiers.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
test_two_tiers = TwoTiers.TestCase


def test_the_state_machine_reaches_spill_restore_and_swap():
    """The workload the machine draws from does exercise the tier: one scripted run through it."""
    machine = TwoTiers(host_blocks=6)
    machine.add(BASES[2], [0], 12)  # 3 full blocks cached
    machine.free(0)
    machine.add(BASES[0], [1, 2, 3], 8)  # 3 blocks
    machine.add(BASES[1], [0] * 6, 8)  # 3 more (its first is shared): the pool evicts and spills a block of 7s
    assert machine.index.spilled_blocks >= 1
    machine.free(0)
    machine.free(0)
    machine.add(BASES[2], [0], 12)  # back from the host tier
    assert machine.index.restored_blocks >= 1 and machine.bm.host_cache_hits >= BS
    machine.swap_out(0)
    machine.swap_in(0)
    assert machine.index.swapped_in_blocks == machine.index.swapped_out_blocks > 0
    machine.gpu_pool_is_consistent()
    machine.host_tier_is_consistent()


def _check_scheduler(sched: Scheduler) -> None:
    bm, index = sched.block_manager, sched.block_manager.host
    owners = [0] * bm.num_blocks
    for seq in sched.running:
        assert not seq.swapped_blocks
        for block_id in seq.block_table:
            owners[block_id] += 1
    assert [b.ref_count for b in bm.blocks] == owners
    swapped = []
    for seq in sched.waiting:
        assert seq.block_tables == []
        if seq.swapped_blocks:  # its computed tokens wait in the host tier, with one token or more to compute
            assert len(seq.swapped_blocks) == seq.num_blocks_for(seq.num_computed_tokens) and seq.num_uncomputed_tokens
        else:
            assert seq.num_computed_tokens == 0
        swapped += seq.swapped_blocks
    assert index.swapped == set(swapped) and len(swapped) == len(set(swapped))
    assert sorted(list(index.free_ids) + list(index.cached.values()) + swapped) == list(range(index.num_blocks))


ops = st.lists(st.tuples(st.sampled_from(["add"] * 3 + ["step"] * 6 + ["abort", "preempt"]), st.integers(1, 14),
                         st.integers(1, 10)), min_size=20, max_size=80)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(4, 12), host_blocks=st.integers(1, 10),
       mode=st.sampled_from(["swap", "recompute", "auto"]), seed=st.integers(0, 99))
def test_the_scheduler_swaps_and_drains_without_a_leak(ops, num_blocks, host_blocks, mode, seed):
    rng = random.Random(seed)
    config = EngineConfig(device="cpu", block_size=BS, num_kv_blocks=num_blocks, max_model_len=48, max_num_seqs=4,
                          max_num_batched_tokens=8)
    bm = BlockManager(num_blocks, BS, True, (None,), HostBlockIndex(host_blocks))
    sched = Scheduler(config, bm, SwapPolicy(mode, CPU_SWAP_COST, 1024, 30))
    live: list[Sequence] = []

    def step() -> None:
        batch = sched.schedule()
        bm.take_copies()  # the block-level machine above runs and checks the copies; here only their bookkeeping
        for seq in sched.postprocess(batch):
            seq.append_token(rng.randrange(3))
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
                live.remove(seq)

    for kind, a, b in ops:
        if kind == "add":
            seq = Sequence(f"r{len(live)}-{a}-{b}", [a % 3] * min(a, 6) + [rng.randrange(2) for _ in range(a - 6)],
                           SamplingParams(max_tokens=b), BS)
            try:
                sched.add(seq)
                live.append(seq)
            except AdmissionError:
                pass
        elif kind == "step":
            step()
        elif live:
            seq = live[a % len(live)]
            if kind == "abort":
                sched.finish(seq, "abort")
                live.remove(seq)
            elif seq.status is SequenceStatus.RUNNING:
                sched.preempt(seq)
        _check_scheduler(sched)
    for _ in range(1000):  # no deadlock: what is left always drains
        if not sched.has_unfinished:
            break
        step()
        _check_scheduler(sched)
    assert not live and not sched.has_unfinished
    assert bm.num_free_blocks == num_blocks and not bm.host.swapped
    assert mode != "recompute" or sched.num_swap_preemptions == 0
    event(f"swapped: {sched.num_swap_preemptions > 0}")
