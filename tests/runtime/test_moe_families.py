"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE) as tiny random HF checkpoints (hidden 64, 2 layers,
4 experts, top-2, GQA): HF transformers' greedy tokens and log-probabilities in fp32, batched with
chunked prefill and through preemption; two ranks over gloo give the unsplit tokens; the bytes the
model holds are the memory model's, to the byte, in fp32 and with quantized experts."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_model_families import (  # noqa: F401
    ENGINE,
    NEW_TOKENS,
    SMALL,
    WINDOW,
    WINDOWED_BLOCKS,
    assert_hf_greedy,
    build_checkpoint,
    family_tokenizer,
)

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import load_model
from kvpilot.runtime.memory.quantization import weight_bytes
from kvpilot.runtime.models.moe import MoEMLP, route
from kvpilot.runtime.server.memory_report import weight_bytes_held

pytestmark = pytest.mark.slow
EXPERTS = {"num_experts_per_tok": 2}
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)


def moe_families() -> dict[str, Any]:
    import transformers as t

    return {
        "mixtral-window": lambda: t.MixtralConfig(**SMALL, **EXPERTS, num_local_experts=4, sliding_window=WINDOW),
        "qwen3-moe-renormalised": lambda: t.Qwen3MoeConfig(**SMALL, **EXPERTS, head_dim=32, num_experts=4,
                                                           moe_intermediate_size=48, norm_topk_prob=True),
        # norm_topk_prob false: the top-2 weights as the softmax gave them; layer 1 keeps a dense MLP
        "qwen3-moe-dense-layer": lambda: t.Qwen3MoeConfig(**SMALL, **EXPERTS, head_dim=32, num_experts=4,
                                                          moe_intermediate_size=48, norm_topk_prob=False,
                                                          mlp_only_layers=[1]),
        # a shared expert (with its sigmoid gate) beside the routed ones, q/k/v biases
        "qwen2-moe-shared-expert": lambda: t.Qwen2MoeConfig(**SMALL, **EXPERTS, num_experts=4, moe_intermediate_size=48,
                                                            shared_expert_intermediate_size=80),
    }


@pytest.mark.parametrize("kind", list(moe_families()))
def test_moe_family_matches_hf(kind, family_tokenizer, tmp_path):  # noqa: F811
    reference, prompts = build_checkpoint(moe_families()[kind](), family_tokenizer, tmp_path)
    assert max(len(p) for p in prompts) > 2 * WINDOW and min(map(len, prompts)) < WINDOW
    # every layer of Mixtral's is windowed: its sequences free blocks as they go, so a smaller pool preempts
    blocks = WINDOWED_BLOCKS["mistral-window"] if kind == "mixtral-window" else ENGINE["num_kv_blocks"]
    llm = LLM(str(tmp_path), device="cpu", **{**ENGINE, "num_kv_blocks": blocks})
    layers = llm.engine.loaded.model.model.layers
    assert [isinstance(layer.mlp, MoEMLP) for layer in layers] == [True, not kind.endswith("dense-layer")]
    assert_hf_greedy(reference, prompts, llm.generate(prompts, GREEDY))
    assert llm.stats().num_preemptions > 0


@pytest.mark.parametrize("kind", ["mixtral-window", "qwen3-moe-dense-layer", "qwen2-moe-shared-expert"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_held_bytes_are_the_planned_bytes(kind, quantization, family_tokenizer, tmp_path):  # noqa: F811
    build_checkpoint(moe_families()[kind](), family_tokenizer, tmp_path)
    loaded = load_model(str(tmp_path), torch.float32, "cpu", quantization=quantization)
    assert weight_bytes_held(loaded.model) == weight_bytes(loaded.facts, quantization or "fp32", "fp32")
    if quantization is None:  # the loader stacked each layer's experts for the fused kernel: views, held once
        experts = loaded.model.model.layers[0].mlp.experts
        storages = {e.gate_up_proj.weight.untyped_storage().data_ptr() for e in experts}
        assert len(storages) == 1 and len(experts) == 4


@pytest.mark.parametrize("kind", ["mixtral-window", "qwen3-moe-dense-layer", "qwen2-moe-shared-expert"])
def test_two_ranks_give_the_unsplit_tokens(kind, family_tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """Two ranks over gloo: each holds half of every expert's rows and the whole router, routes alike,
    and one all-reduce per MoE block sums the experts' halves."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # workers inherit the environment
    _, prompts = build_checkpoint(moe_families()[kind](), family_tokenizer, tmp_path)
    limits = {"device": "cpu", "num_kv_blocks": 16, "max_model_len": 64, "max_num_batched_tokens": 16}
    expected = LLM(str(tmp_path), **limits).generate(prompts, GREEDY)
    with LLM(str(tmp_path), tensor_parallel_size=2, **limits) as llm:
        outputs = llm.generate(prompts, GREEDY)
        engine = llm.engine
        assert weight_bytes_held(engine.loaded.model) == weight_bytes(engine.facts, "fp32", "fp32", 2)
    for want, got in zip(expected, outputs, strict=True):
        assert got.token_ids == want.token_ids
        for a, b in zip(want.logprobs, got.logprobs, strict=True):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


@pytest.mark.parametrize(("quantization", "fused"), [(None, True), ("int8", True), ("fp8", True), ("int4", False)])
def test_experts_take_the_fused_path_where_it_runs_them(quantization, fused, family_tokenizer, tmp_path):  # noqa: F811
    """Float, int8 and fp8 experts are stacked for the fused kernel (ops.fused_moe) and give what the loop
    over the experts' own modules gives; int4 experts keep the loop."""
    build_checkpoint(moe_families()["mixtral-window"](), family_tokenizer, tmp_path)
    loaded = load_model(str(tmp_path), torch.float32, "cpu", quantization=quantization)
    mlp = loaded.model.model.layers[1].mlp
    assert (mlp._stacked() is not None) == fused
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, ids = route(mlp.gate(x), mlp.top_k, mlp.normalize)
        torch.testing.assert_close(mlp(x), mlp._experts(x, weights, ids), rtol=1e-5, atol=1e-5)
