"""The rotary cos/sin tables: the plan counts, as their own line, exactly the bytes the runtime builds
(memory/rotary.py against models/layers.py RotaryEmbedding), for every rope layout the runtime runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvpilot.runtime.loading.loader import rotary_table_bytes_held, weight_bytes_held
from kvpilot.runtime.memory.devices import cpu_device, gpu_from_catalog
from kvpilot.runtime.memory.facts import from_catalog, from_hf_config
from kvpilot.runtime.memory.planner import PlanRequest, plan
from kvpilot.runtime.memory.quantization import weight_bytes
from kvpilot.runtime.models.llama import LlamaForCausalLM
from kvpilot.runtime.models.parallel import SINGLE
from kvpilot.runtime.models.variant import variant_from_config

MiB = 1 << 20
SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128}
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.5, 2.0, 2.5, 3.0]}


def configs() -> dict[str, dict[str, Any]]:
    """HF configs of each rope layout: one set of tables, a partial rotary dimension with longrope (a second
    block of rows past the original context), Gemma 3's two sets, SmolLM3's layers without rope."""
    return {
        "llama": {"architectures": ["LlamaForCausalLM"], **SMALL},
        "phi3-longrope-partial": {"architectures": ["Phi3ForCausalLM"], **SMALL, "original_max_position_embeddings": 32,
                                  "partial_rotary_factor": 0.5, "rope_scaling": LONGROPE},
        "gemma3-two-ropes": {"architectures": ["Gemma3ForCausalLM"], **SMALL, "head_dim": 32, "sliding_window": 16,
                             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                             "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0},
        "smollm3-no-rope-layers": {"architectures": ["SmolLM3ForCausalLM"], **SMALL, "no_rope_layers": [1, 0, 1]},
    }


# bytes by hand: 2 tables (cos, sin) x rows x rotary_dim / 2 frequencies x 4 bytes (fp32)
EXPECTED = {("llama", 128): 2 * 128 * 8 * 4,
            ("phi3-longrope-partial", 128): 2 * (2 * 128) * 4 * 4,  # past 32: short and long rows
            ("phi3-longrope-partial", 32): 2 * 32 * 4 * 4,  # within the original context: short rows only
            ("gemma3-two-ropes", 128): 2 * 2 * 128 * 16 * 4,  # local and global sets
            ("smollm3-no-rope-layers", 128): 2 * 128 * 8 * 4}


@pytest.mark.parametrize(("kind", "positions"), list(EXPECTED), ids=[f"{k}-{n}" for k, n in EXPECTED])
def test_the_plan_counts_what_the_runtime_builds(kind, positions):
    config = configs()[kind]
    facts = from_hf_config(config, name=kind)
    with torch.device("cpu"):
        model = LlamaForCausalLM(facts, positions, None, SINGLE, variant_from_config(config))
    held = rotary_table_bytes_held(model)
    planned = plan(facts, cpu_device(), PlanRequest(max_context=positions)).memory
    assert planned.rotary_tables == held == EXPECTED[kind, positions]
    # the tables are their own line: the weights line stays the checkpoint's bytes, to the byte
    assert planned.weights == weight_bytes_held(model) == weight_bytes(facts, "fp32", "fp32")


def test_published_models_at_their_full_context():
    """Llama-3.1-8B at 131,072 positions: 64 MiB per GPU at any TP degree; SmolLM2-135M at 8,192: 2 MiB."""
    h100 = gpu_from_catalog("h100-80gb")
    for tp in (1, 2):
        p = plan(from_catalog("llama-3.1-8b"), h100, PlanRequest(tensor_parallel=tp))
        assert p.max_model_len == 131_072 and p.memory.rotary_tables == 64 * MiB
    assert plan(from_catalog("smollm2-135m"), h100, PlanRequest()).memory.rotary_tables == 2 * MiB
    gemma3 = plan(from_catalog("gemma-3-1b"), h100, PlanRequest(max_context=8192)).memory
    assert gemma3.rotary_tables == 2 * 2 * 8192 * 128 * 4  # two sets of 256-channel heads


def test_the_kv_pool_gets_only_what_the_tables_leave():
    p = plan(from_catalog("llama-3.1-8b"), gpu_from_catalog("h100-80gb"), PlanRequest())
    m = p.memory
    spent = m.weights + m.rotary_tables + m.kv_cache + m.activations + m.overhead + m.margin
    assert m.usable - spent == m.headroom and 0 <= m.headroom < p.kv_block_bytes
