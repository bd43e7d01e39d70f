"""The memory model of mixture-of-experts models: every expert's weights (the planned bytes of each
catalog model are its checkpoint's, to the byte), routers kept in the compute dtype, each expert's
intermediate rows split by tensor parallelism, top-k copies of each token in the activations, and
`kvpilot plan` for Qwen3-30B-A3B and Mixtral-8x7B."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kvpilot.cli.main import main
from kvpilot.runtime.memory.budget import forward_peak_bytes
from kvpilot.runtime.memory.devices import GiB
from kvpilot.runtime.memory.facts import _catalog, from_catalog, from_hf_config
from kvpilot.runtime.memory.quantization import QUANT_MODES, weight_bytes, weight_bytes_by_part
from kvpilot.runtime.memory.support import UnsupportedOption, layer_windows

# `metadata.total_size` of each bf16 checkpoint's model.safetensors.index.json on the hub (the tensors'
# bytes, headers excluded): huggingface.co/<repo>/blob/main/model.safetensors.index.json
CHECKPOINT_BYTES = {
    "mixtral-8x7b": 93_405_585_408,  # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x22b": 281_241_268_224,  # mistralai/Mixtral-8x22B-v0.1
    "qwen3-30b-a3b": 61_064_245_248,  # Qwen/Qwen3-30B-A3B
    "qwen3-235b-a22b": 470_187_269_120,  # Qwen/Qwen3-235B-A22B
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_BYTES))
def test_planned_bf16_weights_are_the_checkpoint_bytes(name):
    assert weight_bytes(from_catalog(name), "bf16", "bf16") == CHECKPOINT_BYTES[name]


def test_the_parts_of_qwen3_30b_a3b():
    facts = from_catalog("qwen3-30b-a3b")  # 48 layers of 128 experts, 768 rows wide, top-8, no shared expert
    assert (facts.num_experts, facts.num_experts_per_tok, facts.moe_intermediate_size) == (128, 8, 768)
    parts = facts.params_by_part
    assert parts["experts"] == 48 * 128 * 3 * 2048 * 768
    assert parts["router"] == 48 * 128 * 2048
    assert parts["mlp"] == 0  # every layer is sparse: its dense intermediate_size is never used
    assert parts["norms"] == (2 * 48 + 1) * 2048 + 48 * 2 * 128  # and the per-head q/k norms


# Qwen/Qwen1.5-MoE-A2.7B-Chat's config.json (the fields that size it)
QWEN15_MOE = {"architectures": ["Qwen2MoeForCausalLM"], "decoder_sparse_step": 1, "hidden_size": 2048,
              "intermediate_size": 5632, "max_position_embeddings": 32768, "max_window_layers": 21,
              "moe_intermediate_size": 1408, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
              "num_hidden_layers": 24, "num_key_value_heads": 16, "shared_expert_intermediate_size": 5632,
              "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False,
              "vocab_size": 151936, "norm_topk_prob": False}


def test_qwen2_moe_shared_experts_are_counted():
    """Qwen1.5-MoE-A2.7B (the Qwen2-MoE family): 60 experts and one shared expert with a sigmoid gate per
    layer, q/k/v biases; its index's total_size is 28,631,568,384 bytes (Qwen/Qwen1.5-MoE-A2.7B)."""
    facts = from_hf_config(QWEN15_MOE, name="qwen1.5-moe-a2.7b")
    assert weight_bytes(facts, "bf16", "bf16") == 28_631_568_384
    assert facts.params_by_part["mlp"] == 24 * 3 * 2048 * 5632  # the shared experts
    assert facts.params_by_part["router"] == 24 * (60 + 1) * 2048  # the router and the shared expert's gate
    two = weight_bytes_by_part(facts, "bf16", "bf16", 2)
    assert two["mlp"] * 2 == weight_bytes_by_part(facts, "bf16", "bf16")["mlp"]  # the shared expert splits too


def test_qwen2_moe_windows_every_other_layer_below_max_window_layers():
    config = {**QWEN15_MOE, "num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 3}
    assert layer_windows(config) == (32768, None, 32768, None)  # as transformers' Qwen2MoeConfig derives them


@pytest.mark.parametrize("quant", sorted(QUANT_MODES))
def test_every_quantization_counts_each_expert_and_keeps_the_router(quant):
    facts = from_catalog("mixtral-8x7b")
    compute = "fp32" if quant == "fp32" else "fp16" if quant == "fp16" else "bf16"
    parts = weight_bytes_by_part(facts, quant, compute)
    dense = dataclasses.replace(facts, num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
    one_mlp = weight_bytes_by_part(dense, quant, compute)["mlp"]  # the same 14336-row MLP, once per layer
    assert parts["experts"] == 8 * one_mlp
    assert parts["router"] == 32 * 8 * 4096 * (4 if compute == "fp32" else 2)


def test_tensor_parallel_splits_each_experts_rows_and_replicates_the_router():
    facts = from_catalog("qwen3-235b-a22b")
    one, eight = weight_bytes_by_part(facts, "bf16", "bf16", 1), weight_bytes_by_part(facts, "bf16", "bf16", 8)
    assert eight["experts"] * 8 == one["experts"]
    assert eight["router"] == one["router"]


def test_activations_hold_top_k_copies_of_each_token():
    facts = from_catalog("qwen3-30b-a3b")
    wider = dataclasses.replace(facts, num_experts_per_tok=16)
    step = forward_peak_bytes(wider, 2, 2048, 2) - forward_peak_bytes(facts, 2, 2048, 2)
    assert step == 2048 * 8 * (3 * 768 // 2 + 2 * 2048) * 2  # 8 more copies: gate/up/product and in/out


def test_a_pre_quantized_moe_checkpoint_is_refused_in_one_line():
    config = {**_catalog()["qwen3-30b-a3b"]["config"], "quantization_config": {"quant_method": "fp8"}}
    with pytest.raises(UnsupportedOption, match="pre-quantized mixture-of-experts checkpoints are not supported"):
        from_hf_config(config, name="qwen3-30b-a3b-fp8")


def test_kvpilot_plan_qwen3_30b_a3b_on_h100(capsys):
    assert main(["plan", "--model", "qwen3-30b-a3b", "--gpu", "h100-80gb", "--output", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["quantization"], plan["tensor_parallel"]) == ("bf16", 1)
    assert plan["memory"]["weights"] == CHECKPOINT_BYTES["qwen3-30b-a3b"]
    assert plan["kv_bytes_per_token"] == 2 * 48 * 4 * 128 * 2
    assert plan["kv_capacity_sequences"] >= 1
    assert any(r.startswith("experts: 128 per MoE layer, all held") and "8 routed per token" in r
               for r in plan["reasons"])


def test_kvpilot_plan_mixtral_8x7b_splits_its_experts_over_two_h100(capsys):
    assert main(["plan", "--model", "mixtral-8x7b", "--gpu", "h100-80gb", "--output", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["quantization"], plan["tensor_parallel"]) == ("bf16", 2)  # 87 GiB of bf16 weights need two
    assert plan["memory"]["weights"] == weight_bytes(from_catalog("mixtral-8x7b"), "bf16", "bf16", 2)
    assert abs(2 * plan["memory"]["weights"] - CHECKPOINT_BYTES["mixtral-8x7b"]) < 0.01 * GiB  # embeddings pad
    assert any("tensor parallel 2 splits each expert's 14336 intermediate rows into 7168 per GPU" in r
               for r in plan["reasons"])
    assert plan["memory"]["kv_cache"] > 20 * GiB


def test_cost_plans_quantized_experts_on_one_gpu(capsys):
    assert main(["plan", "--model", "mixtral-8x7b", "--gpu", "h100-80gb", "--optimize", "cost",
                 "--output", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["quantization"], plan["tensor_parallel"]) == ("fp8", 1)
    assert plan["weights_by_part"]["experts"] == weight_bytes_by_part(from_catalog("mixtral-8x7b"), "fp8", "bf16")[
        "experts"]


def test_a_gguf_mixture_of_experts_is_refused_in_one_line_not_planned_dense(tmp_path):
    """A Mixtral GGUF says its experts only in `llama.expert_count`: named in the config, so the support
    list refuses it at load as it would a config.json (the runtime loads MoE from safetensors)."""
    import gguf
    import numpy as np

    from kvpilot.runtime.loading.loader import load_model

    path = tmp_path / "tiny-moe.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 2), (writer.add_embedding_length, 64), (writer.add_head_count, 4),
                       (writer.add_feed_forward_length, 96), (writer.add_head_count_kv, 2),
                       (writer.add_context_length, 128), (writer.add_expert_count, 8),
                       (writer.add_expert_used_count, 2)):
        add(value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedOption, match=r"tiny-moe.gguf: config field num_local_experts=8 \(LlamaForCausal"):
        load_model(str(path), torch.float32, "cpu")
