"""Greedy tokens from kvpilot equal HF transformers' on the same SmolLM2 GGUF weights (fp32, CPU):
one request at a time, all batched with mixed lengths, with prefix-cache hits, with chunked
prefill forced small, and through preemption by recompute in a pool too small for the load."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _token_ids(outputs) -> list[list[int]]:
    return [list(o.token_ids) for o in outputs]


def test_one_request_at_a_time(make_llm, parity_prompts, hf_reference, greedy):
    llm = make_llm(enable_prefix_caching=False)
    for prompt, expected in zip(parity_prompts, hf_reference, strict=True):
        (out,) = llm.generate([prompt], greedy)
        assert out.token_ids == expected
        assert out.finish_reason == "length"


def test_all_batched_with_mixed_lengths(make_llm, parity_prompts, hf_reference, greedy):
    llm = make_llm(enable_prefix_caching=False)
    assert len({len(p) for p in parity_prompts}) > 4
    assert _token_ids(llm.generate(parity_prompts, greedy)) == hf_reference
    assert llm.stats().num_free_kv_blocks == llm.stats().num_kv_blocks


def test_with_prefix_cache_hits(make_llm, parity_prompts, hf_reference, greedy):
    llm = make_llm()
    first = llm.generate(parity_prompts[:1], greedy)  # caches the shared system prompt
    rest = llm.generate(parity_prompts[1:], greedy)
    again = llm.generate(parity_prompts, greedy)  # every full prompt block is cached now
    assert _token_ids(first + rest) == hf_reference
    assert _token_ids(again) == hf_reference
    assert all(o.num_cached_tokens == 32 for o in rest)
    assert all(o.num_cached_tokens == (len(p) - 1) // 16 * 16 for o, p in zip(again, parity_prompts, strict=True))
    stats = llm.stats()
    assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries


def test_with_chunked_prefill_forced_small(make_llm, parity_prompts, hf_reference, greedy):
    llm = make_llm(max_num_batched_tokens=8, max_num_seqs=4, enable_prefix_caching=False)
    assert _token_ids(llm.generate(parity_prompts, greedy)) == hf_reference


def test_preemption_in_a_pool_too_small_gives_the_same_output(make_llm, parity_prompts, hf_reference, greedy):
    # each request needs 6 blocks of 16 at its longest; 8 of them together would need 48
    llm = make_llm(num_kv_blocks=14)
    assert _token_ids(llm.generate(parity_prompts, greedy)) == hf_reference
    stats = llm.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_kv_blocks == 14 and stats.num_running == stats.num_waiting == 0
