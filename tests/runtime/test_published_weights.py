"""Meta's official Llama-3.1-405B-Instruct-FP8 at tensor parallel 8: vLLM logged "Loading model weights took
57.75 GiB" per GPU (issue 13's figure). The checkpoint is fbgemm_fp8: fp8 weights with one fp32 scale per
output channel for the MLPs of layers 1-124; every attention projection, the MLPs of the first and the last
layer and lm_head stay bf16 (`modules_to_not_convert`). Planned as all-fp8 it was 47.77 GiB."""

from __future__ import annotations

import pytest

from kvpilot.runtime.memory.devices import GiB, gpu_from_catalog
from kvpilot.runtime.memory.facts import from_hf_config
from kvpilot.runtime.memory.planner import PlanRequest, plan

LAYERS = 126
# config.json of https://huggingface.co/meta-llama/Llama-3.1-405B-Instruct-FP8 (blob/main/config.json): its
# modules_to_not_convert names q/k/v/o_proj of all 126 layers, gate/up/down_proj of layers 0 and 125, and lm_head
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 16384, "intermediate_size": 53248,
    "num_attention_heads": 128, "num_hidden_layers": LAYERS, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {
        "quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
        "modules_to_not_convert": [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "qkvo"]
        + [f"model.layers.{i}.mlp.{p}_proj" for i in (0, LAYERS - 1) for p in ("gate", "up", "down")] + ["lm_head"]},
}
VLLM_WEIGHTS_PER_GPU = 57.75 * GiB
# The checkpoint vLLM first loaded kept 16 KV heads (Meta's duplicated heads); Hugging Face fixed the repository
# to 8 on 2024-08-16 ("fixed the model repository with the correct number of kv heads":
# https://github.com/vllm-project/vllm/issues/6689; SGLang overrode it to 8 meanwhile:
# https://github.com/sgl-project/sglang/pull/723).
FIRST_UPLOAD_KV_HEADS = 16


def per_gpu_weights(config: dict) -> int:
    facts = from_hf_config(config, name="llama-3.1-405b-instruct-fp8")
    p = plan(facts, gpu_from_catalog("h100-80gb"), PlanRequest(tensor_parallel=8, max_context=8192))
    assert (p.quantization, p.checkpoint) == ("fp8", "fbgemm_fp8 float8")
    return p.memory.weights


def test_the_405b_fp8_checkpoint_plans_what_vllm_loaded():
    first_upload = {**CONFIG, "num_key_value_heads": FIRST_UPLOAD_KV_HEADS}
    assert per_gpu_weights(first_upload) == pytest.approx(VLLM_WEIGHTS_PER_GPU, rel=0.01)


def test_the_fixed_repository_holds_eight_kv_heads_less_and_more_than_all_fp8():
    weights = per_gpu_weights(CONFIG)
    first_upload = per_gpu_weights({**CONFIG, "num_key_value_heads": FIRST_UPLOAD_KV_HEADS})
    extra_kv = LAYERS * 2 * (FIRST_UPLOAD_KV_HEADS - 8) * 128 * 16384 * 2 // 8  # bf16 k/v_proj rows, per GPU
    assert first_upload - weights == extra_kv
    all_fp8 = from_hf_config({k: v for k, v in CONFIG.items() if k != "quantization_config"})
    plain = plan(all_fp8, gpu_from_catalog("h100-80gb"), PlanRequest(tensor_parallel=8, max_context=8192,
                                                                      quantization="fp8")).memory.weights
    assert plain == pytest.approx(47.77 * GiB, rel=0.002) and weights > 1.18 * plain  # the bf16 attention counts
