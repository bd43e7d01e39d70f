"""Weights offload (`offload_layers`, runtime/models/offload.py): a tiny random Llama whose decoder layers
partly or wholly stream from a host store gives the tokens and log-probabilities of the engine that
holds them all on the device (batched, prefill chunked 16 tokens at a time; fp32 and int8; a Mixtral;
two tensor-parallel ranks over gloo). The device holds the resident weights and two staging buffers,
the host store the offloaded layers' bytes, in memory of its own that every forward reads."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from split_engines import GREEDY, LIMITS, assert_same_tokens_and_logprobs

from kvpilot.runtime.engine.config import EngineConfig, memory_plan
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.llm_engine import LLMEngine
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.loading.loader import host_weight_bytes, load_model, weight_bytes_held
from kvpilot.runtime.memory.devices import cpu_device, gpu_from_catalog
from kvpilot.runtime.memory.offload import offloaded_layers, with_offload
from kvpilot.runtime.memory.planner import PlanRequest, size
from kvpilot.runtime.memory.support import UnsupportedOption
from kvpilot.runtime.models.offload import streamer_of
from kvpilot.runtime.server.engine_flags import add_engine_flags, engine_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LAYERS = 5
CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 128, "initializer_range": 0.2,
          "tie_word_embeddings": False}
TEXTS = ("The quick brown fox", "def main():\n    items = [1, 2, 3]\n    return sum(item * 2 for item in items)\n",
         "Once upon a")


def save_checkpoint(config, tokenizer, path: Path) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> str:
    from transformers import LlamaConfig

    return save_checkpoint(LlamaConfig(**CONFIG), tokenizer, tmp_path_factory.mktemp("tiny-llama-5"))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(text) for text in TEXTS]
    assert max(map(len, ids)) > LIMITS["max_num_batched_tokens"]  # a prefill split into chunks
    return ids


@pytest.fixture(scope="module")
def resident(checkpoint, prompts):
    """Per weight mode, the engine that keeps every layer on the device: its outputs and its model."""
    engines = {mode: LLM(checkpoint, quantization=mode, **LIMITS) for mode in (None, "int8")}
    return {mode: (llm.generate(prompts, GREEDY), llm.engine.loaded.model) for mode, llm in engines.items()}


def layer_bytes(model: torch.nn.Module, layer: int) -> int:
    prefix = f"model.layers.{layer}."
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name.startswith(prefix))


@pytest.mark.parametrize(("count", "mode"), [(1, None), (2, None), (3, None), (LAYERS, None), (3, "int8")])
def test_offloaded_layers_give_the_resident_tokens_and_logprobs(checkpoint, prompts, resident, count, mode):
    expected, whole = resident[mode]
    llm = LLM(checkpoint, quantization=mode, offload_layers=count, **LIMITS)
    assert_same_tokens_and_logprobs(expected, llm.generate(prompts, GREEDY))
    model = llm.engine.loaded.model
    chosen = offloaded_layers(LAYERS, count)
    assert [host.layer for host in streamer_of(model).layers] == list(chosen)
    offloaded = [layer_bytes(whole, i) for i in chosen]
    assert host_weight_bytes(model) == sum(offloaded)
    assert weight_bytes_held(model) == weight_bytes_held(whole) - sum(offloaded) + 2 * max(offloaded)


def measured_memory(engine) -> dict[str, float]:
    """/metrics' kvpilot:memory_measured_bytes, per part."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from kvpilot.runtime.engine.config import memory_plan
    from kvpilot.runtime.server.memory_report import memory_figures
    from kvpilot.runtime.server.metrics import ServerMetrics

    plan = memory_plan(engine.facts, engine.config)
    metrics = ServerMetrics("m", engine.stats, lambda: memory_figures(engine, plan), lambda: [])
    return {s.labels["part"]: s.value for family in text_string_to_metric_families(generate_latest(
            metrics.registry).decode()) for s in family.samples if s.name == "kvpilot:memory_measured_bytes"}


def test_host_store_is_its_own_memory_and_every_forward_reads_it(checkpoint, prompts, resident):
    llm = LLM(checkpoint, offload_layers=3, **LIMITS)
    model, whole = llm.engine.loaded.model, resident[None][1]
    measured = measured_memory(llm.engine)
    assert measured["weights"] == weight_bytes_held(model) and measured["host_weights"] == host_weight_bytes(model)
    assert "host_weights" not in measured_memory(LLM(checkpoint, loaded=load_model(checkpoint, torch.float32, "cpu"),
                                                     **LIMITS).engine)
    streamer = streamer_of(model)
    hosts = [(h.host.data_ptr(), h.host.data_ptr() + h.host.numel()) for h in streamer.layers]
    staging = {buffer.untyped_storage().data_ptr() for buffer in streamer.staging}
    offloaded = {f"model.layers.{i}." for i in offloaded_layers(LAYERS, 3)}
    whole_state = {name: t.to_dense() if t.layout != torch.strided else t for name, t in whole.state_dict().items()}
    for name, t in model.state_dict().items():
        if t.layout != torch.strided:  # a resident layer's oneDNN-packed weight (models/cpu_linear.py): opaque
            assert not name.startswith(tuple(offloaded)) and torch.equal(t.to_dense(), whole_state[name]), name
            continue
        assert not any(lo <= t.data_ptr() < hi for lo, hi in hosts), name  # no view of the host store
        if name.startswith(tuple(offloaded)):
            assert t.untyped_storage().data_ptr() in staging, name
        else:  # resident layers, embeddings, final norm and lm_head: where and what they were
            assert t.untyped_storage().data_ptr() not in staging and torch.equal(t, whole_state[name]), name
    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
    before = llm.generate(prompts[0], one)[0].logprobs[0].logprob
    third = streamer.layers[2].host  # rank 2 (layer 4): its next copy comes within the next forward
    third[:4].copy_(torch.tensor([1e4], dtype=torch.float32).view(torch.uint8))  # its first fp32 value
    changed = llm.generate(prompts[0], one)[0].logprobs[0].logprob
    assert changed != before


def test_a_forward_stopped_between_layers_leaves_the_next_one_right(checkpoint, prompts, resident):
    """An exception after the first offloaded layer ran (its release issued the copy of the third into
    the first's buffer): the next forward fetches the first again instead of running on the third's weights."""
    llm = LLM(checkpoint, offload_layers=4, **LIMITS)
    streamer = streamer_of(llm.engine.loaded.model)
    streamer.wait(streamer.layers[0].layer)
    streamer.release(streamer.layers[0].layer)
    assert_same_tokens_and_logprobs(resident[None][0], llm.generate(prompts, GREEDY))


def test_mixtral_experts_stream_too(tokenizer, tmp_path):
    from test_model_families import SMALL
    from transformers import MixtralConfig

    checkpoint = save_checkpoint(MixtralConfig(**SMALL, num_experts_per_tok=2, num_local_experts=4),
                                 tokenizer, tmp_path)
    prompts = [tokenizer.encode(text) for text in TEXTS]
    expected = LLM(checkpoint, **LIMITS).generate(prompts, GREEDY)
    llm = LLM(checkpoint, offload_layers=1, **LIMITS)
    assert_same_tokens_and_logprobs(expected, llm.generate(prompts, GREEDY))
    experts = llm.engine.loaded.model.model.layers[offloaded_layers(2, 1)[0]].mlp
    staging = {b.untyped_storage().data_ptr() for b in streamer_of(llm.engine.loaded.model).staging}
    assert {t.untyped_storage().data_ptr() for t in experts._stack} <= staging  # the fused kernel's stacks


def test_two_tensor_parallel_ranks_each_stream_their_shard(checkpoint, prompts, resident, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # workers inherit the environment
    with LLM(checkpoint, tensor_parallel_size=2, offload_layers=3, **LIMITS) as llm:
        assert_same_tokens_and_logprobs(resident[None][0], llm.generate(prompts, GREEDY))
        own = weight_bytes_held(llm.engine.loaded.model)
        assert host_weight_bytes(llm.engine.loaded.model) > 0 and llm.engine.rank_weight_bytes == [own, own]


def test_a_plan_that_offloads_reaches_the_engine_through_its_flags_and_agrees_to_the_byte(checkpoint, resident):
    """Plan.engine_options() -> the flags a pod gets -> the engine: the same layers, the plan's host bytes and
    device weights (resident + two staging buffers) are what the engine holds."""
    facts, cpu = resident[None][1].facts, cpu_device()
    request = PlanRequest(max_context=128, quantization="fp32", kv_dtype="fp32")
    planned = with_offload(size(facts, cpu, request, "fp32", "fp32", 1, 1)[0], facts, cpu, request, 3)[0]
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    flags = [arg for flag, value in planned.engine_options().items() for arg in (f"--{flag}", str(value))]
    config = engine_config(parser.parse_args(["--model", checkpoint, "--device", "cpu", *flags]))
    assert config.offload_layers == 3
    small = {name: value for name, value in LIMITS.items() if name != "device"}  # not the CPU plan's KV pool
    model = LLMEngine(dataclasses.replace(config, **small)).loaded.model
    assert host_weight_bytes(model) == planned.host_weight_bytes
    assert weight_bytes_held(model) == planned.memory.weights
    # on a GPU the engine's own plan (no KV limits given) moves exactly its layers and gives their bytes to KV
    l4, asked = gpu_from_catalog("l4"), EngineConfig(device="cpu", max_model_len=128, offload_layers=LAYERS)
    offloaded, resident_plan = memory_plan(facts, asked, l4), memory_plan(facts, EngineConfig(device="cpu",
                                                                                              max_model_len=128), l4)
    assert offloaded.offload_layers == LAYERS and offloaded.host_weight_bytes > 0
    assert offloaded.memory.weights < resident_plan.memory.weights


def test_bad_offload_values_are_refused_in_one_line(checkpoint, resident):
    with pytest.raises(ValueError, match="offload_layers must be an integer >= 0, got -1"):
        EngineConfig(device="cpu", offload_layers=-1)
    with pytest.raises(UnsupportedOption, match="pipeline parallel 1 only"):
        EngineConfig(device="cpu", pipeline_parallel_size=2, offload_layers=1)
    facts = resident[None][1].facts
    with pytest.raises(ValueError, match=f"offload_layers 6 exceeds .* {LAYERS} layers"):
        EngineConfig(device="cpu", offload_layers=6).for_model(facts)
    with pytest.raises(ValueError, match="between 0 and the model's 5 layers, got 6"):
        LLM(checkpoint, offload_layers=6, **LIMITS)
    with pytest.raises(ValueError, match="loaded with 0 offloaded layers, the config asks for 2"):
        LLM(checkpoint, loaded=load_model(checkpoint, torch.float32, "cpu"), offload_layers=2, **LIMITS)
    result = subprocess.run([sys.executable, "-m", "kvpilot.cli.main", "serve", "--offload-layers", "-1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "offload_layers must be an integer >= 0, got -1" in result.stderr
