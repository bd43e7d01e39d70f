"""The CPU decoder compiled with torch.compile (runtime/models/compiled.py): the same tokens and
log-probabilities as HF transformers (fp32, within 1e-4, as the eager engine), through batches that mix
decodes and prefill chunks, one-token batches and preemptions, without a second compile; models it
cannot compile, and a compile that fails, run eagerly."""

from __future__ import annotations

import logging

import pytest
import torch
from test_model_families import (  # noqa: F401
    ENGINE,
    NEW_TOKENS,
    WINDOWED_BLOCKS,
    assert_hf_greedy,
    build,
    family_tokenizer,
)

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.models.cpu_linear import PackedLinear

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)


def compiled_llm(path, kind: str, **options) -> LLM:
    return LLM(str(path), device="cpu", enforce_eager=False,
               **{**ENGINE, "num_kv_blocks": WINDOWED_BLOCKS.get(kind, 4), **options})


def _frame_count() -> int:
    """How many graphs dynamo has built in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("kind", ["gemma2", "qwen3"])
def test_the_compiled_decoder_gives_hf_s_tokens_and_logprobs(kind, family_tokenizer, tmp_path):  # noqa: F811
    """gemma2: sliding windows (a layout per layer), soft-capping, sandwich norms; qwen3: q/k norms, a tied
    head. One batch with chunked prefill and preemptions, then one sequence alone (one-token steps)."""
    torch._dynamo.reset()
    reference, prompts = build(kind, family_tokenizer, tmp_path)
    llm = compiled_llm(tmp_path, kind)
    model = llm.engine.loaded.model.model
    assert model.compiled is not None
    assert any(isinstance(m, PackedLinear) for m in model.modules())  # the packed matmul runs inside the graph
    graphs = _frame_count()
    assert_hf_greedy(reference, prompts, llm.generate(prompts, GREEDY))
    assert llm.stats().num_preemptions > 0
    assert_hf_greedy(reference, prompts[:1], llm.generate(prompts[:1], GREEDY))
    assert _frame_count() == graphs  # built at start-up, for every batch size


def test_a_model_the_compiler_does_not_take_runs_eagerly(family_tokenizer, tmp_path, caplog):  # noqa: F811
    """Quantized projections stay eager (the decoder is not compiled), and say why."""
    build("qwen3", family_tokenizer, tmp_path)
    with caplog.at_level(logging.INFO, logger="kvpilot.runtime.models.compiled"):
        llm = compiled_llm(tmp_path, "qwen3", quantization="int8")
    assert llm.engine.loaded.model.model.compiled is None
    assert "decoder runs eagerly: quantized or expert projections" in caplog.text


def test_a_failing_compile_leaves_the_decoder_eager(family_tokenizer, tmp_path, caplog, monkeypatch):  # noqa: F811
    """Without a working C++ compiler inductor cannot build the graph: the engine warns once, at
    start-up, and serves HF's tokens eagerly."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    reference, prompts = build("qwen3", family_tokenizer, tmp_path)
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a graph built before must not be reused
    with caplog.at_level(logging.WARNING, logger="kvpilot.runtime.engine.model_runner"):
        llm = compiled_llm(tmp_path, "qwen3")
    assert llm.engine.loaded.model.model.compiled is None
    assert "torch.compile failed, the decoder runs eagerly" in caplog.text
    assert_hf_greedy(reference, prompts, llm.generate(prompts, GREEDY))
