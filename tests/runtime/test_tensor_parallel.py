"""Tensor parallelism on the CPU (gloo between processes): a small random Llama split 2 and 4 ways gives
the unsplit engine's tokens and log-probabilities; each rank holds its share of weights and KV heads."""

from __future__ import annotations

import pytest
import torch
from split_engines import GREEDY, LIMITS, assert_same_tokens_and_logprobs, generate_across_two_nodes

from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.memory.quantization import kv_bytes_per_token, weight_bytes
from kvpilot.runtime.memory.support import UnsupportedOption
from kvpilot.runtime.server.memory_report import weight_bytes_held

pytestmark = pytest.mark.slow
# 4 heads over 2 KV heads; a vocabulary that 2 and 4 do not divide (the last rank's rows are padded).
CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 49155, "max_position_embeddings": 256, "initializer_range": 0.2,
          "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def workers_run_the_torch_references(monkeypatch):
    """Workers inherit the environment: spare them the Triton interpreter the kernel tests switch on."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def unsplit(checkpoint, tokenizer):
    prompts = [tokenizer.encode(t) for t in ("The quick brown fox", "def main():\n    return 42", "Once upon a")]
    return prompts, LLM(checkpoint, **LIMITS).generate(prompts, GREEDY)


@pytest.mark.parametrize("tp", [2, 4])  # 4: fewer KV heads than ranks, so each is held by two ranks
def test_split_engine_gives_the_unsplit_tokens_and_logprobs(checkpoint, unsplit, tp):
    prompts, expected = unsplit
    with LLM(checkpoint, tensor_parallel_size=tp, **LIMITS) as llm:
        workers = llm.engine.workers.processes
        assert len(workers) == tp - 1 and all(p.is_alive() for p in workers)
        outputs = llm.generate(prompts, GREEDY)  # 16-token steps: chunked prefill and decodes mixed
        assert_same_tokens_and_logprobs(expected, outputs)
        engine = llm.engine
        facts = engine.facts
        assert weight_bytes_held(engine.loaded.model) == weight_bytes(facts, "fp32", "fp32", tp)
        assert engine.runner.kv_cache.pool.shape[4] == max(1, facts.num_kv_heads // tp)
        assert engine.runner.kv_cache.nbytes == 32 * 16 * kv_bytes_per_token(facts, "fp32", tp)
    assert not any(p.is_alive() for p in workers)


def test_a_split_the_model_cannot_take_is_refused(checkpoint):
    with pytest.raises(UnsupportedOption, match=r"tensor parallel size 3 does not divide .*4 heads, 2 KV heads"):
        LLM(checkpoint, tensor_parallel_size=3, **LIMITS)


def test_ranks_span_two_nodes_as_a_leader_worker_set_runs_them(checkpoint, unsplit):
    """Node 1 is `kvpilot serve --node-rank 1` in its own process (as in a LeaderWorkerSet worker pod);
    node 0 is the engine with ranks 0-1, node 1 runs ranks 2-3."""
    prompts, expected = unsplit

    def leader_runs_ranks_0_and_1(llm):
        assert len(llm.engine.workers.processes) == 1  # rank 1; ranks 2 and 3 are node 1's

    outputs = generate_across_two_nodes(checkpoint, prompts, {"tensor_parallel_size": 4}, leader_runs_ranks_0_and_1)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
