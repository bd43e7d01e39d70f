"""The memory model: model facts, bytes per quantization mode, KV bytes per token, plans."""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpilot.runtime.memory.devices import Device, GiB, custom_gpu, gpu_from_catalog, parse_quantity
from kvpilot.runtime.memory.facts import (
    UnknownModel,
    catalog_names,
    from_catalog,
    from_hf_config,
    load_hf_config,
    resolve_model,
)
from kvpilot.runtime.memory.planner import NoFit, PlanError, PlanRequest, plan, size
from kvpilot.runtime.memory.quantization import (
    INT4_GROUP_SIZE,
    kv_bytes_per_token,
    tp_compatible,
    weight_bytes,
    weight_bytes_by_part,
)

H100 = gpu_from_catalog("h100-80gb")
A100 = gpu_from_catalog("a100-80gb")
L4 = gpu_from_catalog("l4")


# --- model facts -----------------------------------------------------------------------------

def test_catalog_holds_the_required_models():
    required = {"llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b",
                "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
                "mistral-7b-v0.3", "gemma-2-9b", "smollm2-135m", "smollm2-360m", "smollm2-1.7b"}
    assert required <= set(catalog_names())


@pytest.mark.parametrize(("name", "billions"), [
    ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("llama-3.1-405b", 405.85),
    ("llama-3.2-1b", 1.24), ("llama-3.2-3b", 3.21), ("qwen2.5-0.5b", 0.494), ("qwen2.5-7b", 7.62),
    ("qwen2.5-72b", 72.71), ("mistral-7b-v0.3", 7.25), ("gemma-2-9b", 9.24), ("smollm2-135m", 0.1345),
])
def test_parameter_counts_match_published_sizes(name, billions):
    assert from_catalog(name).num_params / 1e9 == pytest.approx(billions, rel=0.005)


def test_parts_of_llama_8b():
    parts = from_catalog("llama-3.1-8b").params_by_part
    assert parts["embeddings"] == parts["lm_head"] == 128256 * 4096
    # q + o: 2 * 4096 * 4096; k + v: 2 * 4096 * 1024; 32 layers
    assert parts["attention"] == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024)
    assert parts["mlp"] == 32 * 3 * 4096 * 14336
    assert parts["norms"] == (2 * 32 + 1) * 4096


def test_tied_embeddings_have_no_lm_head():
    assert from_catalog("smollm2-135m").params_by_part["lm_head"] == 0


@pytest.mark.parametrize("alias", ["meta-llama/Llama-3.1-8B-Instruct", "hf://meta-llama/Meta-Llama-3.1-8B-Instruct",
                                   "llama-3.1-8b", "LLAMA-3.1-8B"])
def test_catalog_lookup_by_repo_id(alias):
    assert resolve_model(alias).name == "llama-3.1-8b"


def test_gguf_file_name_resolves():
    assert from_catalog("SmolLM2-135M-Instruct.Q4_1.gguf").name == "smollm2-135m"


def test_config_json_beats_catalog(tmp_path):
    config = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
              "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 2048}
    (tmp_path / "config.json").write_text(json.dumps(config))
    facts = resolve_model(f"file://{tmp_path}")
    assert (facts.num_layers, facts.head_dim, facts.num_kv_heads) == (3, 64, 2)
    assert load_hf_config(tmp_path / "config.json") == facts


def test_qwen2_has_qkv_bias():
    assert from_catalog("qwen2.5-7b").qkv_bias and not from_catalog("llama-3.1-8b").qkv_bias


def test_unknown_model_says_what_to_do():
    with pytest.raises(UnknownModel, match="architecture inline"):
        resolve_model("hf://acme/mystery-13b")


def test_broken_config_names_the_missing_field():
    with pytest.raises(UnknownModel, match="hidden_size"):
        from_hf_config({"num_attention_heads": 4}, name="x")


# --- bytes ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("llama-3.1-8b", 2 * 32 * 8 * 128 * 2),   # 131,072
    ("llama-3.1-70b", 2 * 80 * 8 * 128 * 2),  # 327,680
    ("qwen2.5-7b", 2 * 28 * 4 * 128 * 2),     # 57,344
])
def test_kv_bytes_per_token(name, expected):
    facts = from_catalog(name)
    assert kv_bytes_per_token(facts, "bf16") == expected
    assert kv_bytes_per_token(facts, "fp8") == expected // 2


def test_kv_bytes_shard_with_tensor_parallel_and_replicate_past_kv_heads():
    facts = from_catalog("llama-3.1-70b")  # 8 KV heads
    assert kv_bytes_per_token(facts, "bf16", tp=4) == 2 * 80 * 2 * 128 * 2
    assert kv_bytes_per_token(facts, "bf16", tp=16) == 2 * 80 * 1 * 128 * 2  # one replicated head each


def test_llama_8b_bf16_weights():
    assert weight_bytes(from_catalog("llama-3.1-8b"), "bf16", "bf16") == pytest.approx(16.06e9, rel=0.001)


def test_int4_weights_within_one_percent_of_the_hand_count():
    facts = from_catalog("llama-3.1-8b")
    parts = facts.params_by_part
    linear = parts["attention"] + parts["mlp"]
    groups = linear // INT4_GROUP_SIZE
    hand = linear * 0.5 + groups * (2 + 2) + (parts["embeddings"] + parts["lm_head"] + parts["norms"]) * 2
    assert weight_bytes(facts, "int4", "bf16") == pytest.approx(hand, rel=0.01)


def test_int8_and_fp8_pay_per_channel_scales():
    facts = from_catalog("llama-3.1-8b")
    int8 = weight_bytes_by_part(facts, "int8", "bf16")
    fp8 = weight_bytes_by_part(facts, "fp8", "bf16")
    out_channels = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)
    linear = facts.params_by_part["attention"] + facts.params_by_part["mlp"]
    assert int8["attention"] + int8["mlp"] == linear + out_channels * 2
    assert fp8["attention"] + fp8["mlp"] == linear + out_channels * 4


def test_tensor_parallel_splits_weights():
    facts = from_catalog("llama-3.1-70b")
    one, eight = weight_bytes(facts, "bf16", "bf16", 1), weight_bytes(facts, "bf16", "bf16", 8)
    assert one / 8 <= eight < one / 8 * 1.01  # norms are replicated


def test_tp_compatibility():
    facts = from_catalog("llama-3.1-70b")  # 64 heads, 8 KV heads
    assert [tp for tp in (1, 2, 3, 4, 8, 16, 128) if tp_compatible(facts, tp)] == [1, 2, 4, 8, 16]
    smol = from_catalog("smollm2-135m")  # 9 heads, 3 KV heads; 1536 MLP rows do not split 9 ways (the runtime refuses)
    assert [tp for tp in (1, 2, 3, 4, 9) if tp_compatible(smol, tp)] == [1, 3]
    qwen3_moe = from_catalog("qwen3-30b-a3b")  # 32 heads, 4 KV heads, experts 768 rows wide
    assert [tp for tp in (1, 2, 4, 8, 16, 32) if tp_compatible(qwen3_moe, tp)] == [1, 2, 4, 8, 16, 32]
    assert not tp_compatible(dataclasses.replace(qwen3_moe, moe_intermediate_size=760), 16)


def test_quantities():
    assert parse_quantity("48Gi") == 48 * GiB
    assert parse_quantity("80G") == 80 * 10**9
    assert custom_gpu("48Gi").memory_bytes == 48 * GiB


# --- plans --------------------------------------------------------------------------------------

def test_llama_8b_on_one_h100_at_8k_is_bf16_on_one_gpu():
    p = plan(from_catalog("llama-3.1-8b"), H100, PlanRequest(max_context=8192, concurrency=16))
    assert (p.quantization, p.kv_dtype, p.tensor_parallel) == ("bf16", "bf16", 1)
    assert p.kv_capacity_sequences >= 16
    assert p.kv_capacity_tokens == p.num_kv_blocks * 16


def test_llama_70b_bf16_never_fits_one_h100_and_picks_the_power_of_two_for_the_kv():
    facts = from_catalog("llama-3.1-70b")
    req = PlanRequest(max_context=8192, concurrency=16, quantization="bf16")
    one, shortfall = size(facts, H100, req, "bf16", "bf16", 1, 8)
    assert shortfall > 0 and one.memory.weights > one.memory.usable
    two, shortfall_two = size(facts, H100, req, "bf16", "bf16", 2, 8)
    assert shortfall_two > 0 and two.memory.weights < two.memory.usable  # weights fit, 16 x 8k of KV does not
    p = plan(facts, H100, req)
    assert p.tensor_parallel == 4
    assert p.kv_capacity_sequences >= 16


def test_llama_70b_int4_fits_one_h100_with_8k_of_kv():
    p = plan(from_catalog("llama-3.1-70b"), H100, PlanRequest(max_context=8192, quantization="int4"))
    assert (p.tensor_parallel, p.quantization) == (1, "int4")
    assert p.kv_capacity_tokens >= 8192


def test_llama_405b_on_8_h100_needs_fp8():
    p = plan(from_catalog("llama-3.1-405b"), H100, PlanRequest(max_context=8192, concurrency=4))
    assert p.quantization == "fp8" and p.tensor_parallel == 8 and p.nodes == 1


def test_llama_405b_quality_spans_two_nodes_in_bf16_when_allowed():
    req = PlanRequest(max_context=8192, concurrency=4, max_gpus_per_replica=16)
    p = plan(from_catalog("llama-3.1-405b"), H100, req)  # a stage per node: TP never crosses nodes
    assert (p.quantization, p.tensor_parallel, p.pipeline_parallel, p.nodes) == ("bf16", 8, 2, 2)
    cost = plan(from_catalog("llama-3.1-405b"), H100, PlanRequest(max_context=8192, concurrency=4,
                                                                  max_gpus_per_replica=16, optimize="cost"))
    assert (cost.quantization, cost.tensor_parallel) == ("int4", 4)  # lower precision before more GPUs


def test_llama_405b_on_a100_picks_int8_or_int4():
    p = plan(from_catalog("llama-3.1-405b"), A100, PlanRequest(max_context=8192, concurrency=4))
    assert p.quantization in ("int8", "int4") and p.kv_dtype == "bf16"


def test_quality_vs_cost_order():
    facts = from_catalog("llama-3.1-70b")
    req = dict(max_context=8192, concurrency=16)
    quality = plan(facts, H100, PlanRequest(**req, optimize="quality"))
    cost = plan(facts, H100, PlanRequest(**req, optimize="cost"))
    assert (quality.quantization, quality.tensor_parallel) == ("bf16", 4)
    assert cost.tensor_parallel == 1 and cost.quantization == "int4"
    assert any("rejected" in r for r in cost.reasons)


def test_no_fit_says_the_best_attempt_and_the_shortfall():
    with pytest.raises(NoFit, match=r"best attempt, int4 weights \+ fp8 KV on 1 x l4, misses by \d+\.\d+ GiB") as err:
        plan(from_catalog("llama-3.1-405b"), L4, PlanRequest(max_context=8192, max_gpus_per_replica=1))
    assert err.value.shortfall_bytes > 180 * GiB


def test_fp8_on_a_gpu_without_fp8_is_refused():
    with pytest.raises(PlanError, match="a100-80gb has none"):
        plan(from_catalog("llama-3.1-8b"), A100, PlanRequest(quantization="fp8"))


def test_context_beyond_the_model_is_refused():
    with pytest.raises(PlanError, match="exceeds smollm2-135m's 8192 positions"):
        plan(from_catalog("smollm2-135m"), H100, PlanRequest(max_context=100_000))


@pytest.mark.parametrize("bad", [dict(concurrency=0), dict(gpu_memory_utilization=1.5), dict(optimize="speed"),
                                 dict(quantization="int2"), dict(max_context=0)])
def test_bad_requests_name_the_value(bad):
    with pytest.raises(PlanError, match=str(next(iter(bad.values())))):
        PlanRequest(**bad)


def test_cpu_plan_fits_the_host_and_caps_kv():
    cpu = Device("cpu", 16 * GiB, fp8=False, kind="cpu")
    p = plan(from_catalog("smollm2-135m"), cpu, PlanRequest(max_context=2048, concurrency=4))
    assert (p.quantization, p.gpus_per_replica, p.tensor_parallel) == ("fp32", 0, 1)
    assert p.memory.kv_cache <= 4 * GiB + p.kv_bytes_per_token * p.block_size
    assert p.memory.headroom >= 0


def test_plan_dict_is_json():
    p = plan(from_catalog("llama-3.1-8b"), H100, PlanRequest(max_context=8192))
    data = json.loads(json.dumps(p.to_dict()))
    assert data["kv_capacity_tokens"] == p.kv_capacity_tokens and data["memory"]["headroom"] >= 0


# --- properties -----------------------------------------------------------------------------------

MODELS = ["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "mistral-7b-v0.3", "gemma-2-9b", "smollm2-1.7b"]


@settings(max_examples=150, deadline=None)
@given(model=st.sampled_from(MODELS), memory_gib=st.integers(8, 200), util=st.floats(0.5, 0.98),
       context=st.integers(256, 8192), concurrency=st.integers(1, 64), optimize=st.sampled_from(["quality", "cost"]),
       fp8=st.booleans())
def test_no_plan_exceeds_utilization_of_any_gpu(model, memory_gib, util, context, concurrency, optimize, fp8):
    gpu = Device("custom", memory_gib * GiB, fp8=fp8)
    req = PlanRequest(max_context=context, concurrency=concurrency, gpu_memory_utilization=util, optimize=optimize)
    try:
        p = plan(from_catalog(model), gpu, req)
    except NoFit:
        return
    m = p.memory
    assert m.weights + m.kv_cache + m.activations + m.overhead <= int(util * memory_gib * GiB)
    assert p.kv_capacity_sequences >= concurrency


@settings(max_examples=150, deadline=None)
@given(model=st.sampled_from(MODELS), quant=st.sampled_from(["bf16", "fp8", "int8", "int4"]),
       tp=st.sampled_from([1, 2, 4, 8]), small=st.integers(8, 160), extra=st.integers(0, 80))
def test_more_memory_never_yields_fewer_kv_blocks(model, quant, tp, small, extra):
    facts = from_catalog(model)
    req = PlanRequest(max_context=4096)
    blocks = [size(facts, Device("g", gib * GiB, fp8=True), req, quant, "bf16", tp, 8)[0].num_kv_blocks
              for gib in (small, small + extra)]
    assert blocks[0] <= blocks[1]


def test_pinned_tensor_parallel_is_planned_as_asked_or_refused():
    facts = from_catalog("llama-3.1-70b")
    req = PlanRequest(max_context=8192, concurrency=16, tensor_parallel=8)
    assert plan(facts, H100, req).tensor_parallel == 8  # the search would stop at 4
    with pytest.raises(NoFit, match="on 2 x h100-80gb"):  # never widened past the pin
        plan(facts, H100, PlanRequest(max_context=8192, concurrency=64, quantization="bf16", tensor_parallel=2))
    with pytest.raises(PlanError, match="does not split"):
        plan(facts, H100, PlanRequest(tensor_parallel=3))


def test_catalog_totals_are_what_cuda_allocates_not_nvidia_smi():
    assert H100.memory_bytes == int(79.19 * GiB) and A100.memory_bytes == int(79.15 * GiB)
    assert L4.memory_bytes == int(21.99 * GiB) and gpu_from_catalog("rtx-4090").memory_bytes == int(23.64 * GiB)


def test_activations_follow_the_step_budget():
    facts = from_catalog("llama-3.1-8b")
    small = plan(facts, H100, PlanRequest(max_context=8192, max_batched_tokens=512, max_num_seqs=8))
    large = plan(facts, H100, PlanRequest(max_context=8192, max_batched_tokens=16384, max_num_seqs=512))
    assert small.memory.activations < large.memory.activations
    assert small.num_kv_blocks > large.num_kv_blocks
    assert (large.max_batched_tokens, large.max_num_seqs) == (16384, 512)


def test_a_family_name_stands_for_boards_that_plan_alike():
    """`h100` may land on the SXM or the PCIe board: that is only right while they match in what a plan reads."""
    family = gpu_from_catalog("h100")
    members = [gpu_from_catalog(name) for name in ("h100-80gb", "h100-pcie-80gb")]
    for member in members:
        assert (member.memory_bytes, member.fp8, member.bf16) == (family.memory_bytes, family.fp8, family.bf16)
    assert family.product_labels == tuple(m.product_label for m in members)
    assert gpu_from_catalog("h100-80gb").product_labels == ("NVIDIA-H100-80GB-HBM3",)
