"""The host KV tier in the engine (the embedded SmolLM2, fp32, CPU): a long prompt whose blocks were
evicted from a small GPU pool comes back from the host tier with the same tokens and fewer prefill
tokens computed, and /metrics shows it; preemption by swap gives the same tokens as preemption by recompute."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvpilot.runtime.engine.config import memory_plan
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.server.memory_report import memory_figures
from kvpilot.runtime.server.metrics import ServerMetrics

pytestmark = pytest.mark.slow

FEW = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _words(tokenizer, seed: int, num_tokens: int) -> list[int]:
    text = " ".join(f"item{seed}-{i} of the list" for i in range(num_tokens))
    return tokenizer.encode(text)[:num_tokens]


def _returning_prompt_run(llm, long_prompt: list[int], others: list[list[int]]) -> list[int]:
    llm.generate([long_prompt], FEW)
    for other in others:  # one at a time: each evicts more of the long prompt's cached blocks
        llm.generate([other], FEW)
    (again,) = llm.generate([long_prompt], FEW)
    return list(again.token_ids)


def test_a_returning_prompt_is_restored_from_the_host_tier(make_llm, tokenizer):
    long_prompt = _words(tokenizer, 0, 200)  # 12 full blocks of 16
    others = [_words(tokenizer, seed, 120) for seed in (1, 2, 3)]
    fresh = make_llm(num_kv_blocks=16, enable_prefix_caching=False)
    (expected,) = fresh.generate([long_prompt], FEW)

    without = make_llm(num_kv_blocks=16)
    with_tier = make_llm(num_kv_blocks=16, host_kv_blocks=64)
    assert _returning_prompt_run(without, long_prompt, others) == list(expected.token_ids)
    assert _returning_prompt_run(with_tier, long_prompt, others) == list(expected.token_ids)

    plain, tiered = without.stats(), with_tier.stats()
    host = tiered.host
    assert host is not None and plain.host is None
    assert host.spilled_blocks > 0 and host.restored_blocks >= 10  # most of the 12 blocks came back
    assert host.cache_hits == host.restored_blocks * 16 and host.bytes_to_gpu > 0 and host.bytes_to_host > 0
    assert tiered.prefill_tokens_total <= plain.prefill_tokens_total - 10 * 16
    assert tiered.prefix_cache_hits > plain.prefix_cache_hits
    assert tiered.num_free_kv_blocks == 16 and 0 < host.num_used_blocks <= 64
    _check_metrics(with_tier, host)


def _check_metrics(llm, host) -> None:
    """/metrics shows the host tier as the engine counted it, and the memory report its bytes."""
    engine = llm.engine
    plan = memory_plan(engine.facts, engine.config)
    metrics = ServerMetrics("m", llm.stats, lambda: memory_figures(engine, plan), lambda: [])
    samples = {(s.name, s.labels.get("transfer_type") or s.labels.get("kind") or s.labels.get("part")): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
               for s in family.samples}
    assert samples[("vllm:kv_offload_cpu_cache_usage_perc", None)] == host.num_used_blocks / 64
    assert samples[("vllm:kv_offload_total_bytes_total", "GPU_to_CPU")] == host.bytes_to_host
    assert samples[("vllm:kv_offload_total_bytes_total", "CPU_to_GPU")] == host.bytes_to_gpu
    assert samples[("kvpilot:host_kv_blocks_copied_total", "spill")] == host.spilled_blocks
    assert samples[("kvpilot:host_kv_blocks_copied_total", "restore")] == host.restored_blocks
    assert samples[("vllm:external_prefix_cache_hits_total", None)] == host.cache_hits > 0
    assert samples[("kvpilot:host_kv_blocks_total", None)] == 64
    block_bytes = engine.host_tier.block_bytes
    assert host.bytes_to_host == host.spilled_blocks * block_bytes
    assert samples[("kvpilot:memory_planned_bytes", "host_kv_cache")] == 64 * plan.kv_block_bytes == 64 * block_bytes
    assert samples[("kvpilot:memory_measured_bytes", "host_kv_cache")] == 64 * block_bytes


def test_swap_preemption_gives_the_tokens_of_recompute_preemption(make_llm, parity_prompts):
    """On the CPU the cost model (preemption_mode auto) swaps: a prefill costs far more than a memcpy of the
    same K/V. 6 requests of up to 75 + 32 tokens (7 blocks each) in a pool of 16 blocks: preemption is certain."""
    prompts = parity_prompts[:6]
    recompute = make_llm(num_kv_blocks=16, host_kv_blocks=64, preemption_mode="recompute")
    swap = make_llm(num_kv_blocks=16, host_kv_blocks=64)
    expected = [list(o.token_ids) for o in recompute.generate(prompts, LONG)]
    assert [list(o.token_ids) for o in swap.generate(prompts, LONG)] == expected

    recomputed, swapped = recompute.stats(), swap.stats()
    assert recomputed.num_preemptions > 0 and recomputed.num_swap_preemptions == 0
    assert swapped.num_swap_preemptions == swapped.num_preemptions > 0
    assert swapped.host.swapped_out_blocks == swapped.host.swapped_in_blocks > 0
    assert swapped.prefill_tokens_total < recomputed.prefill_tokens_total  # swapped tokens are not computed again
    assert swapped.num_free_kv_blocks == 16 and not swap.engine.block_manager.host.swapped  # nothing left behind
