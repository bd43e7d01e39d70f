"""Layers grouped by sliding window (memory/kv_groups.py), the plan that counts a windowed layer's KV
by its window, and an engine built from such a plan holding exactly the sequences it promises."""

from __future__ import annotations

import dataclasses

import pytest

from kvpilot.runtime.memory.devices import Device, GiB, gpu_from_catalog
from kvpilot.runtime.memory.facts import from_catalog
from kvpilot.runtime.memory.kv_groups import kv_block_bytes, kv_groups, window_blocks
from kvpilot.runtime.memory.planner import PlanRequest, plan
from kvpilot.runtime.memory.quantization import kv_bytes_per_token


def test_layers_group_by_window_in_equal_widths():
    gemma2 = kv_groups([4096, None] * 21, 8192)
    assert gemma2.windows == (None, 4096) and gemma2.width == 21
    assert gemma2.layer_slots[:4] == ((1, 0), (0, 0), (1, 1), (0, 1))
    gemma3 = kv_groups([None if (i + 1) % 6 == 0 else 1024 for i in range(26)], 32768)  # 4 full, 22 windowed
    assert gemma3.width == 4 and gemma3.windows == (None,) + (1024,) * 6  # 24 slots for 22 layers: 2 padded
    assert sorted(gemma3.layer_slots) == sorted(set(gemma3.layer_slots))  # no two layers share a slot
    mistral = kv_groups([4096] * 32, 32768)
    assert mistral.windows == (4096,) and mistral.width == 32 and not mistral.is_hybrid
    assert kv_groups([4096, None] * 21, 4096).windows == (None,)  # a window as long as the context frees nothing


def test_blocks_per_sequence_bounds_a_window_by_the_blocks_it_spans():
    assert window_blocks(8, 4) == 3 and window_blocks(9, 4) == 3 and window_blocks(1, 4) == 1
    groups = kv_groups([8, None], 64)
    assert groups.blocks_per_sequence(64, 4) == 16 + 3
    assert groups.blocks_per_sequence(6, 4) == 2 + 2  # shorter than the window: every block
    facts = from_catalog("gemma-2-9b")
    per_token = kv_bytes_per_token(facts, "bf16")
    assert kv_block_bytes(facts, "bf16", 16, kv_groups(facts.layer_windows, 8192)) * 2 == 16 * per_token


def test_gemma2_plan_counts_windowed_layers_by_their_window():
    facts = from_catalog("gemma-2-9b")
    assert facts.layer_windows == (4096, None) * 21
    device = gpu_from_catalog("l4")
    windowed = plan(facts, device, PlanRequest())
    unbounded = plan(dataclasses.replace(facts, layer_windows=()), device, PlanRequest())
    assert windowed.memory.kv_cache == pytest.approx(unbounded.memory.kv_cache, abs=windowed.kv_block_bytes)
    assert windowed.kv_blocks_per_sequence == 512 + 257 and unbounded.kv_blocks_per_sequence == 512
    assert windowed.kv_capacity_sequences > unbounded.kv_capacity_sequences
    assert windowed.kv_capacity_sequences == windowed.num_kv_blocks // (512 + 257)
    assert any("sliding-window layers hold at most 4096 tokens" in r for r in windowed.reasons)
    assert not any("sliding-window" in r for r in unbounded.reasons)
    short = plan(facts, device, PlanRequest(max_context=4096))  # the window never binds: one plain pool
    assert short.kv_groups == 1 and short.kv_blocks_per_sequence == 256 and not short.sliding_windows


# --- the engine holds what the plan promises ----------------------------------------------------

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 64, "initializer_range": 0.2}


@pytest.mark.slow
def test_engine_from_a_gemma2_plan_holds_the_planned_sequences(tmp_path):
    """A tiny Gemma 2 (window 16 of 64 positions) planned on a host sized for 3 full-length sequences and
    not 4: the engine built from the plan's options runs 3 of 64 tokens at once without a preemption,
    its windowed layers never holding more than 2 blocks of 16 each; a 4th sequence preempts."""
    import torch
    import transformers as t
    from transformers import AutoModelForCausalLM

    from kvpilot.runtime.engine.config import EngineConfig
    from kvpilot.runtime.engine.llm_engine import LLMEngine
    from kvpilot.runtime.engine.sampling import SamplingParams
    from kvpilot.runtime.loading.embedded import embedded_model_path
    from kvpilot.runtime.memory.facts import load_hf_config
    from kvpilot.runtime.memory.planner import size

    torch.manual_seed(0)
    config = t.Gemma2Config(**SMALL, head_dim=32, sliding_window=16, query_pre_attn_scalar=24)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    tokenizer = t.AutoTokenizer.from_pretrained(embedded_model_path().parent, gguf_file=embedded_model_path().name)
    tokenizer.save_pretrained(tmp_path)
    facts = load_hf_config(tmp_path)
    request = PlanRequest(max_context=64, concurrency=3, max_batched_tokens=64, max_num_seqs=8,
                          quantization="fp32", kv_dtype="fp32", gpu_memory_utilization=1.0)
    probe, _ = size(facts, Device("host", 64 * GiB, fp8=False, kind="cpu"), request, "fp32", "fp32", 1, 1)
    assert probe.kv_blocks_per_sequence == 4 + 2 and probe.kv_groups == 2
    spent = probe.memory.weights + probe.memory.rotary_tables + probe.memory.activations + probe.memory.overhead
    host = Device("host", spent + (4 * 6 - 1) * probe.kv_block_bytes, fp8=False, kind="cpu")
    chosen = plan(facts, host, request)
    assert chosen.num_kv_blocks == 23 and chosen.kv_capacity_sequences == 3

    options = chosen.engine_options()
    engine = LLMEngine(EngineConfig(
        model=str(tmp_path), device="cpu", dtype=str(options["dtype"]), kv_cache_dtype=str(options["kv-cache-dtype"]),
        num_kv_blocks=int(options["num-kv-blocks"]), block_size=int(options["block-size"]),
        max_model_len=int(options["max-model-len"]), max_num_seqs=int(options["max-num-seqs"]),
        max_num_batched_tokens=int(options["max-num-batched-tokens"])))
    assert not engine.config.enable_prefix_caching  # two block tables per sequence: no prefix cache
    assert engine.runner.kv_cache.nbytes == chosen.memory.kv_cache

    def run(count: int) -> tuple[int, int]:
        params = SamplingParams(temperature=0.0, max_tokens=64 - 12, ignore_eos=True)
        for i in range(count):
            engine.add_request(f"{count}-{i}", [10 + i] * 12, params)
        most_running = 0
        while engine.has_unfinished_requests:
            engine.step()
            running = engine.scheduler.running
            most_running = max(most_running, len(running))
            for seq in running:
                assert len(seq.held_blocks(1)) <= 2 and len(seq.held_blocks(0)) <= 4
        assert engine.block_manager.num_free_blocks == chosen.num_kv_blocks  # nothing leaked
        return most_running, engine.stats().num_preemptions

    assert run(3) == (3, 0)
    assert run(4)[1] > 0
