"""Weights offload in the planner (memory/offload.py): the last resort when nothing fits, only with consent;
the fewest offloaded layers, their host bytes, the staging buffers and the decode rate the host link allows."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvpilot.cli.main import main
from kvpilot.runtime.memory.devices import (
    GPU_CATALOG,
    PCIE_GEN3_X16_BYTES_PER_S,
    PCIE_GEN4_X16_BYTES_PER_S,
    PCIE_GEN5_X16_BYTES_PER_S,
    Device,
    GiB,
    gpu_from_catalog,
)
from kvpilot.runtime.memory.facts import resolve_model
from kvpilot.runtime.memory.host_tier import GPU_SWAP_COST
from kvpilot.runtime.memory.offload import offloaded_layers, with_offload
from kvpilot.runtime.memory.planner import NoFit, PlanError, PlanRequest, plan, size
from kvpilot.runtime.memory.quantization import weight_bytes_by_part
from kvpilot.runtime.memory.stages import Stage

LLAMA_70B = resolve_model("llama-3.1-70b")
L4 = gpu_from_catalog("l4")
# One L4 for llama-3.1-70b at 8k tokens: int4 weights alone are 36 GiB of its 22.
ONE_L4 = PlanRequest(max_context=8192, max_gpus_per_replica=1)
ALLOWED = PlanRequest(max_context=8192, max_gpus_per_replica=1, allow_offload=True)


def decoder_layer_bytes(quant: str, tp: int = 1) -> int:
    """One llama decoder layer's weight bytes on one GPU, from the whole model's parts (its layers are alike):
    attention + MLP + the layer's norms, the final norm left out."""
    parts = weight_bytes_by_part(LLAMA_70B, quant, "bf16", tp)
    final_norm = LLAMA_70B.hidden_size * 2
    return (parts["attention"] + parts["mlp"] + parts["norms"] - final_norm) // LLAMA_70B.num_layers


def test_the_host_link_per_gpu_is_in_the_catalog_and_the_swap_model_reads_it():
    assert GPU_CATALOG["l4"].host_link_bytes_per_s == PCIE_GEN4_X16_BYTES_PER_S == 25 * 10**9
    for name in ("h100-80gb", "h100-pcie-80gb", "h200-141gb"):
        assert GPU_CATALOG[name].host_link_bytes_per_s == PCIE_GEN5_X16_BYTES_PER_S == 50 * 10**9
    assert GPU_CATALOG["t4"].host_link_bytes_per_s == PCIE_GEN3_X16_BYTES_PER_S
    assert gpu_from_catalog("h100").host_link_bytes_per_s == PCIE_GEN5_X16_BYTES_PER_S  # the family name
    assert Device("custom-48Gi", 48 * GiB, fp8=False).host_link_bytes_per_s == PCIE_GEN4_X16_BYTES_PER_S
    assert GPU_SWAP_COST.link_bytes_per_s == PCIE_GEN4_X16_BYTES_PER_S


def test_without_consent_nothing_fits_and_the_message_names_the_offload_that_would():
    allowed = plan(LLAMA_70B, L4, ALLOWED)
    with pytest.raises(NoFit) as err:
        plan(LLAMA_70B, L4, ONE_L4)
    message = str(err.value)
    assert "the best attempt, int4 weights + fp8 KV on 1 x l4, misses by" in message
    assert (f"; offloading {allowed.offload_layers} of 80 layers' weights to host memory "
            f"({allowed.host_weight_bytes / GiB:.2f} GiB per GPU) would fit (int4 weights + fp8 KV on 1 x l4) at "
            f"~{allowed.decode_tokens_per_s:.2f} tokens/s per sequence (set serving.allowOffload: true, or kvpilot "
            "plan --allow-offload)") in message


def test_the_offload_plan_keeps_the_fewest_layers_in_host_memory():
    chosen = plan(LLAMA_70B, L4, ALLOWED)
    count, layer = chosen.offload_layers, decoder_layer_bytes("int4")
    assert (chosen.quantization, chosen.kv_dtype, chosen.tensor_parallel) == ("int4", "fp8", 1)
    assert 0 < count < 80
    assert chosen.host_weight_bytes == count * layer and chosen.staging_bytes == 2 * layer
    assert chosen.weights_by_part["staging"] == chosen.staging_bytes
    full = sum(weight_bytes_by_part(LLAMA_70B, "int4", "bf16").values())
    mem = chosen.memory
    assert mem.weights == full - count * layer + 2 * layer == sum(chosen.weights_by_part.values())
    # every GPU byte is accounted for within usable memory, and the KV cache takes the rest
    assert mem.weights + mem.kv_cache + mem.activations + mem.overhead + mem.margin <= mem.usable
    assert 0 <= mem.headroom < chosen.kv_block_bytes
    assert chosen.num_kv_blocks >= chosen.kv_blocks_per_sequence
    # one layer fewer in host memory leaves too little for the KV cache
    needed = chosen.kv_blocks_per_sequence * chosen.kv_block_bytes
    one_fewer = mem.usable - mem.overhead - mem.margin - mem.activations - (full - (count - 1) * layer + 2 * layer)
    assert one_fewer < needed <= one_fewer + layer
    attempt, _ = size(LLAMA_70B, L4, ALLOWED, "int4", "fp8", 1, 8)
    assert with_offload(attempt, LLAMA_70B, L4, ALLOWED, count - 1)[1] > 0
    assert with_offload(attempt, LLAMA_70B, L4, ALLOWED, count)[1] == 0


def test_layers_of_different_sizes_move_their_own_bytes_and_stage_through_the_largest():
    """A MoE model whose even layers are dense: the host holds exactly the offloaded layers' bytes, the
    staging buffers are twice the largest of them (an MoE layer), and the GPU's parts lose what moved."""
    facts = dataclasses.replace(resolve_model("qwen3-235b-a22b"), dense_layers=tuple(range(0, 94, 2)))
    chosen = plan(facts, L4, ALLOWED)
    quant = chosen.quantization

    def layer(i: int) -> dict[str, int]:
        return weight_bytes_by_part(facts, quant, "bf16", 1, Stage(i, range(i, i + 1), first=False, last=False))

    moved = offloaded_layers(94, chosen.offload_layers)
    assert chosen.host_weight_bytes == sum(sum(layer(i).values()) for i in moved)
    assert sum(layer(1).values()) > sum(layer(0).values())  # an MoE layer outweighs a dense one
    assert chosen.staging_bytes == 2 * max(sum(layer(i).values()) for i in moved) == 2 * sum(layer(1).values())
    full = weight_bytes_by_part(facts, quant, "bf16")
    assert chosen.weights_by_part["experts"] == full["experts"] - sum(layer(i)["experts"] for i in moved)
    assert chosen.weights_by_part["embeddings"] == full["embeddings"]  # never offloaded


def test_the_prediction_is_the_host_link_over_the_bytes_streamed_each_step():
    chosen = plan(LLAMA_70B, L4, ALLOWED)
    assert chosen.decode_tokens_per_s == pytest.approx(25e9 / chosen.host_weight_bytes)
    assert 0.5 < chosen.decode_tokens_per_s < 2  # ~21 GiB over PCIe Gen4 each step
    predicted = next(r for r in chosen.reasons if r.startswith("predicted decode:"))
    assert f"at most {chosen.decode_tokens_per_s:.2f} tokens/s per sequence" in predicted
    assert f"{chosen.decode_tokens_per_s * chosen.max_num_seqs:.1f} tokens/s at a full batch" in predicted
    assert "25 GB/s host link" in predicted and "upper bound" in predicted
    faster = plan(LLAMA_70B, gpu_from_catalog("h100-80gb"), PlanRequest(
        max_context=8192, max_gpus_per_replica=1, quantization="bf16", allow_offload=True))
    assert faster.decode_tokens_per_s == pytest.approx(50e9 / faster.host_weight_bytes)  # PCIe Gen5


def test_the_plan_carries_the_offload_to_the_runtime_and_its_readers():
    chosen = plan(LLAMA_70B, L4, ALLOWED)
    assert chosen.engine_options()["offload-layers"] == chosen.offload_layers
    data = chosen.to_dict()
    assert (data["offload_layers"], data["host_weight_bytes"], data["staging_bytes"]) == (
        chosen.offload_layers, chosen.host_weight_bytes, chosen.staging_bytes)
    assert data["host_weight_bytes_per_pod"] == chosen.host_weight_bytes
    assert any(r.startswith("weights offload (allowed): nothing fits") for r in chosen.reasons)


def test_consent_changes_nothing_when_a_plan_fits():
    request = PlanRequest(max_context=8192)
    fits = plan(LLAMA_70B, gpu_from_catalog("h100-80gb"), request)
    consented = plan(LLAMA_70B, gpu_from_catalog("h100-80gb"), PlanRequest(max_context=8192, allow_offload=True))
    assert fits == consented and fits.offload_layers == 0 and "offload-layers" not in fits.engine_options()


def test_offload_is_the_last_resort_after_more_nodes():
    """With no GPU cap, one node of L4s falls short in bf16 but pipeline stages across nodes fit: no offload."""
    request = PlanRequest(max_context=8192, quantization="bf16", allow_offload=True)
    chosen = plan(LLAMA_70B, L4, request)
    assert chosen.offload_layers == 0 and chosen.pipeline_parallel > 1


def test_quality_takes_the_fastest_offload_and_cost_the_fewest_gpus():
    facts = resolve_model("llama-3.1-405b")
    quality = plan(facts, L4, PlanRequest(max_context=8192, max_gpus_per_replica=2, allow_offload=True))
    cost = plan(facts, L4, PlanRequest(max_context=8192, max_gpus_per_replica=2, allow_offload=True,
                                       optimize="cost"))
    assert (quality.tensor_parallel, cost.tensor_parallel) == (2, 1)
    assert quality.quantization == cost.quantization == "int4"
    assert quality.host_weight_bytes < cost.host_weight_bytes
    assert quality.decode_tokens_per_s > cost.decode_tokens_per_s
    assert quality.host_weight_bytes_per_pod == 2 * quality.host_weight_bytes
    assert quality.to_dict()["host_weight_bytes_per_pod"] == 2 * quality.host_weight_bytes


def test_when_even_offloading_every_layer_is_short_nofit_says_so():
    with pytest.raises(NoFit, match="offloading weights to host memory does not fit either"):
        plan(LLAMA_70B, L4, PlanRequest(max_gpus_per_replica=1, allow_offload=True))  # 128k tokens of KV


def test_offload_is_refused_on_the_cpu_and_with_pinned_pipeline_stages():
    cpu = Device("cpu", 64 * GiB, fp8=False, kind="cpu")
    with pytest.raises(PlanError, match="on the CPU the weights are in host memory already"):
        plan(resolve_model("smollm2-135m"), cpu, PlanRequest(allow_offload=True))
    with pytest.raises(PlanError, match="weights offload runs on one pipeline stage; pipeline parallel 2"):
        PlanRequest(pipeline_parallel=2, allow_offload=True)
    with pytest.raises(NoFit) as err:  # pinned stages: no offload offered either
        plan(LLAMA_70B, L4, PlanRequest(max_context=8192, pipeline_parallel=2, tensor_parallel=1))
    assert "offloading" not in str(err.value)


def test_kvpilot_plan_allow_offload(capsys):
    flags = ["plan", "--model", "llama-3.1-70b", "--gpu", "l4", "--max-gpus", "1", "--max-context", "8192"]
    assert main(flags) == 2
    assert "--allow-offload" in capsys.readouterr().err
    assert main([*flags, "--allow-offload", "--output", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = plan(LLAMA_70B, L4, ALLOWED)
    assert data["offload_layers"] == expected.offload_layers > 0
    assert data["memory"]["weights"] == expected.memory.weights
    assert main([*flags, "--allow-offload"]) == 0
    table = capsys.readouterr().out
    assert "weights in host memory" in table and "staging buffers" in table and "weights offload" in table
