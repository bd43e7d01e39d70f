"""Pipeline parallelism in the memory model: vLLM's layer split, each stage's weights and KV, and the policy
(tensor parallelism inside a node, pipeline stages across nodes)."""

import json

import pytest

from kvpilot.cli.main import main
from kvpilot.runtime.memory.devices import gpu_from_catalog
from kvpilot.runtime.memory.facts import from_catalog
from kvpilot.runtime.memory.kv_groups import kv_block_bytes, kv_groups
from kvpilot.runtime.memory.planner import PlanError, PlanRequest, plan, size
from kvpilot.runtime.memory.quantization import kv_bytes_per_token, weight_bytes_by_part
from kvpilot.runtime.memory.stages import layer_partition, pipeline_stages

H100 = gpu_from_catalog("h100-80gb")


@pytest.mark.parametrize(("layers", "pp", "counts"), [
    (126, 2, [63, 63]), (32, 3, [11, 11, 10]), (80, 3, [27, 27, 26]), (5, 4, [1, 1, 2, 1]),
    (7, 4, [2, 2, 2, 1]), (10, 4, [2, 3, 3, 2]),  # the remainder fills the stages before the last, back to front
])
def test_layers_split_as_vllm_splits_them(layers, pp, counts):
    assert layer_partition(layers, pp) == counts
    stages = pipeline_stages(layers, pp)
    assert [len(s.layers) for s in stages] == counts and stages[-1].layers.stop == layers
    assert [s.first for s in stages] == [True] + [False] * (pp - 1)
    assert [s.last for s in stages] == [False] * (pp - 1) + [True]


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ValueError, match="pipeline parallel 5 must be between 1 and the model's 4 layers"):
        layer_partition(4, 5)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3.2-1b"])  # untied and tied lm_head
def test_stage_weights_sum_to_the_model_plus_the_tied_copy(model):
    facts = from_catalog(model)
    whole = weight_bytes_by_part(facts, "bf16", "bf16", 2)
    stages = [weight_bytes_by_part(facts, "bf16", "bf16", 2, stage, 2)
              for stage in pipeline_stages(facts.num_layers, 2)]
    assert stages[0]["lm_head"] == 0 and stages[1]["embeddings"] == 0
    tied_copy = whole["embeddings"] if facts.tie_word_embeddings else 0  # the last stage loads its own lm_head
    assert sum(sum(p.values()) for p in stages) == sum(whole.values()) + tied_copy
    for part in ("attention", "mlp", "norms"):
        assert stages[0][part] + stages[1][part] == whole[part]


def test_stage_kv_holds_the_stage_layers_only():
    facts = from_catalog("llama-3.1-405b")
    stage = pipeline_stages(facts.num_layers, 2)[0]
    assert kv_bytes_per_token(facts, "bf16", 8, stage) == 32_256 == kv_bytes_per_token(facts, "bf16", 16) // 2
    groups = kv_groups([None, 4096] * 3, 8192)  # sliding-window layers: each stage keeps every block table
    part = groups.for_layers(range(0, 3))
    assert part.windows == groups.windows and part.width <= groups.width and len(part.layer_slots) == 3


def test_llama_405b_bf16_runs_tp8_pp2_on_two_nodes_with_twice_the_kv_of_tp16():
    """The issue's done-when: NIM's bf16-tp8-pp2 profile, as `kvpilot plan` chooses it."""
    facts = from_catalog("llama-3.1-405b")
    p = plan(facts, H100, PlanRequest(quantization="bf16"))
    assert (p.tensor_parallel, p.pipeline_parallel, p.nodes, p.gpus_per_replica) == (8, 2, 2, 16)
    assert p.stage_layers == (63, 63) and p.kv_bytes_per_token == 32_256
    flat = plan(facts, H100, PlanRequest(quantization="bf16", tensor_parallel=16))
    assert (flat.tensor_parallel, flat.pipeline_parallel, flat.kv_bytes_per_token) == (16, 1, 64_512)
    # 2.04 x (each GPU also holds 64 MiB of rotary tables for 131,072 positions: memory/rotary.py)
    assert (p.kv_capacity_tokens, flat.kv_capacity_tokens) == (679_696, 333_680)
    assert any("tensor parallel 16 across nodes would hold 64,512" in r for r in p.reasons)
    assert p.engine_options()["pipeline-parallel"] == 2 and p.engine_options()["tensor-parallel"] == 8


def test_the_fullest_stage_bounds_the_blocks():
    facts = from_catalog("llama-3.1-70b")  # 80 layers over 3 stages: 27 / 27 / 26, the last with lm_head
    p, _ = size(facts, H100, PlanRequest(max_context=8192), "bf16", "bf16", 4, 8, pp=3)
    stages = pipeline_stages(80, 3)
    blocks = []
    for stage, weights in zip(stages, p.stage_weight_bytes, strict=True):
        block = kv_block_bytes(facts, "bf16", 16, kv_groups([None] * 80, 8192).for_layers(stage.layers), 4)
        free = p.memory.usable - weights - p.memory.overhead - p.memory.margin - p.memory.rotary_tables
        blocks.append(block)
        assert p.num_kv_blocks * block <= free  # every stage allocates the same block ids
    assert p.kv_block_bytes in blocks and p.memory.headroom < p.kv_block_bytes


def test_one_node_that_fits_gets_no_pipeline():
    p = plan(from_catalog("llama-3.1-70b"), H100, PlanRequest(max_context=8192, concurrency=16))
    assert (p.tensor_parallel, p.pipeline_parallel, p.nodes) == (4, 1, 1)


def test_pinned_stages_and_their_refusals():
    facts = from_catalog("llama-3.1-70b")
    p = plan(facts, H100, PlanRequest(max_context=8192, pipeline_parallel=2))
    assert p.pipeline_parallel == 2 and p.tensor_parallel == 1 and p.nodes == 1
    both = plan(facts, H100, PlanRequest(max_context=8192, tensor_parallel=8, pipeline_parallel=2))
    assert (both.tensor_parallel, both.pipeline_parallel, both.nodes) == (8, 2, 2)
    with pytest.raises(PlanError, match=r"pipeline parallel 81 exceeds llama-3\.1-70b's 80 layers"):
        plan(facts, H100, PlanRequest(pipeline_parallel=81))
    with pytest.raises(PlanError, match="exceeds the most GPUs per replica"):
        plan(facts, H100, PlanRequest(tensor_parallel=8, pipeline_parallel=2, max_gpus_per_replica=8))


def test_plan_json_carries_the_pipeline(capsys):
    assert main(["plan", "--model", "llama-3.1-405b", "--gpu", "h100-80gb", "--quantization", "bf16",
                 "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["tensor_parallel"], data["pipeline_parallel"], data["nodes"]) == (8, 2, 2)
    assert main(["plan", "--model", "llama-3.1-70b", "--gpu", "h100-80gb", "--pipeline-parallel", "2",
                 "--tensor-parallel", "4", "--max-context", "8192", "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["tensor_parallel"], data["pipeline_parallel"]) == (4, 2)
