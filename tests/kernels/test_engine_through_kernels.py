"""End to end: the engine generating with a small random Llama through the Triton kernels (interpreted on
the CPU, compiled on CUDA) gives the same greedy tokens as through the torch reference."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, interpreter

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import LoadedModel
from kvpilot.runtime.memory.facts import ModelFacts
from kvpilot.runtime.models.llama import LlamaForCausalLM
from kvpilot.runtime.models.quantized import quantized_weight_names, quantizer, replace_with_quantized


class NumberTokenizer:
    """The one method the engine's detokenizer needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, token_ids))


def tiny_llama(device: str, **moe: int) -> LoadedModel:
    """Two layers, 4 query heads on 2 KV heads of 16 dims (GQA), random weights large enough that the
    greedy choice is well separated (logit gaps far above kernel rounding); `moe`: ModelFacts' expert
    fields (a Mixtral-like model)."""
    facts = ModelFacts(name="tiny-random-llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=128, vocab_size=97, max_position_embeddings=128, **moe)
    torch.manual_seed(0)
    model = LlamaForCausalLM(facts, max_positions=128)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.model.rotary.build_tables(torch.device(device))
    return LoadedModel(model.to(device).eval(), NumberTokenizer(), facts, eos_token_ids=[0], source=Path("random"))


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = dict.fromkeys(("write_kv_cache", "paged_attention_decode", "paged_attention_prefill"), 0)
    for name in calls:
        module = importlib.import_module(f"kvpilot.kernels.{name}")
        launcher = getattr(module, name)

        def counted(*args, _name=name, _launcher=launcher, **kwargs):
            calls[_name] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_tokens_match_the_reference_path(monkeypatch, prefix_caching):
    loaded = tiny_llama(DEVICE)
    # prompts of 1, 7, 17 and 40 tokens, the last two sharing a block-sized prefix; chunked prefill via the
    # small token budget, so steps mix decode and prefill chunks
    prompts = [[5], [3, 1, 4, 1, 5, 9, 2], list(range(10, 27)), list(range(10, 26)) + list(range(40, 64))]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def generate(use_kernels: bool) -> list[list[int]]:
        llm = LLM(loaded=loaded, device=DEVICE, dtype="fp32", block_size=8, num_kv_blocks=32, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=24, enable_prefix_caching=prefix_caching)
        with interpreter(use_kernels and DEVICE == "cpu"):
            return [list(out.token_ids) for out in llm.generate(prompts, greedy)]

    with interpreter(False):
        expected = generate(use_kernels=False) if DEVICE == "cpu" else None
    calls = count_kernel_calls(monkeypatch)
    actual = generate(use_kernels=True)
    # two layers: a prefill step or more, then at least five decode steps, each writing the cache first
    assert calls["paged_attention_prefill"] >= 2 and calls["paged_attention_decode"] >= 2 * 5, calls
    assert calls["write_kv_cache"] >= 2 * 6, calls
    if expected is None:  # on CUDA the reference path is the same model on the CPU
        expected = LLM(loaded=tiny_llama("cpu"), device="cpu", dtype="fp32", block_size=8, num_kv_blocks=32,
                       max_model_len=128, max_num_seqs=4, max_num_batched_tokens=24,
                       enable_prefix_caching=prefix_caching).generate(prompts, greedy)
        expected = [list(out.token_ids) for out in expected]
    assert actual == expected
    assert all(len(tokens) == 6 for tokens in actual)


@pytest.mark.parametrize(("quantization", "kv_cache_dtype"), [("int8", "fp8"), ("int4", "auto"), ("fp8", "auto")])
def test_quantized_engine_through_the_kernels_matches_the_reference_path(monkeypatch, quantization, kv_cache_dtype):
    """The same quantized model and fp8 KV cache: quantized_matmul and the fp8 attention kernels give the
    greedy tokens the torch references give."""
    prompts = [[5], [3, 1, 4, 1, 5, 9, 2], list(range(10, 27))]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def generate(device: str, use_kernels: bool) -> list[list[int]]:
        loaded = quantized(tiny_llama(device), quantization)
        llm = LLM(loaded=loaded, device=device, dtype="fp32", quantization=quantization,
                  kv_cache_dtype=kv_cache_dtype, block_size=8, num_kv_blocks=32, max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=24)
        with interpreter(use_kernels and device == "cpu"):
            return [list(out.token_ids) for out in llm.generate(prompts, greedy)]

    with interpreter(False):
        expected = generate("cpu", use_kernels=False)
    matmuls = {"calls": 0}
    module = importlib.import_module("kvpilot.kernels.quantized_matmul")
    launcher = module.quantized_matmul

    def counted(*args, **kwargs):
        matmuls["calls"] += 1
        return launcher(*args, **kwargs)

    monkeypatch.setattr(module, "quantized_matmul", counted)
    assert generate(DEVICE, use_kernels=True) == expected
    assert matmuls["calls"] >= 4 * 2 * 4  # four projections, two layers, a prefill and three decode steps


def quantized(loaded: LoadedModel, mode: str) -> LoadedModel:
    """`loaded` with its decoder projections quantized, as the loader does it while reading a checkpoint."""
    model = loaded.model
    for name in sorted(quantized_weight_names(model)):
        weight = model.get_parameter(name).detach()
        replace_with_quantized(model, name, weight, quantizer(mode, torch.float32))
    return loaded


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_moe_engine_through_the_fused_moe_kernel_matches_the_reference_path(monkeypatch, quantization):
    """A Mixtral-like model (4 experts of 48 rows, top-2), float or int8, through the Triton fused-MoE
    kernel gives the greedy tokens the torch reference gives."""
    prompts = [[5], [3, 1, 4, 1, 5, 9, 2], list(range(10, 27))]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48}

    def generate(device: str, use_kernels: bool) -> list[list[int]]:
        loaded = tiny_llama(device, **moe)
        if quantization:
            loaded = quantized(loaded, quantization)
        llm = LLM(loaded=loaded, device=device, dtype="fp32", block_size=8, num_kv_blocks=32, max_model_len=128,
                  max_num_seqs=4, max_num_batched_tokens=24, quantization=quantization)
        with interpreter(use_kernels and device == "cpu"):
            return [list(out.token_ids) for out in llm.generate(prompts, greedy)]

    with interpreter(False):
        expected = generate("cpu", use_kernels=False)
    calls = {"fused_moe": 0}
    module = importlib.import_module("kvpilot.kernels.fused_moe")
    launcher = module.fused_moe

    def counted(*args, **kwargs):
        calls["fused_moe"] += 1
        return launcher(*args, **kwargs)

    monkeypatch.setattr(module, "fused_moe", counted)
    assert generate(DEVICE, use_kernels=True) == expected
    assert calls["fused_moe"] >= 2 * 4  # two MoE layers, a prefill and three decode steps
