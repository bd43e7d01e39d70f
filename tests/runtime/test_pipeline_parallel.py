"""Pipeline parallelism on the CPU (gloo between processes): a small random Llama split in 2 stages, and in
2 stages of 2 tensor-parallel ranks, gives the unsplit engine's tokens and log-probabilities; each rank
holds its stage's weights (as the plan counts them) and its stage's layers of KV."""

from __future__ import annotations

import pytest
import torch
from split_engines import GREEDY, LIMITS, assert_same_tokens_and_logprobs, generate_across_two_nodes

from kvpilot.runtime.engine.config import memory_plan
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.memory.quantization import kv_bytes_per_token
from kvpilot.runtime.memory.stages import pipeline_stages

pytestmark = pytest.mark.slow
# 3 layers: stage 0 holds 2, stage 1 holds 1 (vLLM's split); a vocabulary 2 does not divide.
CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 49155, "max_position_embeddings": 256, "initializer_range": 0.2}
TEXTS = ("The quick brown fox", "def main():\n    return 42", "Once upon a")


@pytest.fixture(autouse=True)
def workers_run_the_torch_references(monkeypatch):
    """Workers inherit the environment: spare them the Triton interpreter the kernel tests switch on."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def unsplit(request, tmp_path_factory, tokenizer):
    """A checkpoint (its lm_head its own, or tied to the embedding) and the unsplit engine's answers."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(**CONFIG, tie_word_embeddings=request.param)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    with LLM(str(path), **LIMITS) as llm:
        return str(path), prompts, llm.generate(prompts, GREEDY)


@pytest.mark.parametrize("tp", [1, 2])
def test_stages_give_the_unsplit_tokens_and_logprobs(unsplit, tp):
    checkpoint, prompts, expected = unsplit
    with LLM(checkpoint, tensor_parallel_size=tp, pipeline_parallel_size=2, **LIMITS) as llm:
        workers = llm.engine.workers.processes
        assert len(workers) == 2 * tp - 1 and all(p.is_alive() for p in workers)
        outputs = llm.generate(prompts, GREEDY)  # 16-token steps: chunked prefill and decodes mixed
        assert_same_tokens_and_logprobs(expected, outputs)
        engine = llm.engine
        assert engine.config.pipeline_micro_batches == 2  # a step per stage in flight (vLLM's virtual engines)
        for i, prompt in enumerate(prompts):  # more than one step's 16 tokens
            engine.add_request(f"again-{i}", prompt * 3, GREEDY)
        first = {o.request_id for o in engine.step()}  # started two steps of disjoint sequences, finished one
        (batch, _), = engine.in_flight
        assert first and not first & {seq.request_id for seq, _ in batch.items()}
        while engine.has_unfinished_requests:
            engine.step()
        facts, plan = engine.facts, memory_plan(engine.facts, engine.config)
        assert (plan.tensor_parallel, plan.pipeline_parallel, plan.stage_layers) == (tp, 2, (2, 1))
        stage_of_rank = [rank // tp for rank in range(2 * tp)]
        assert engine.rank_weight_bytes == [plan.stage_weight_bytes[s] for s in stage_of_rank]
        stage0 = pipeline_stages(facts.num_layers, 2)[0]
        assert len(engine.runner.kv_cache.k_caches) == 2  # rank 0: stage 0's layers only
        assert engine.runner.kv_cache.nbytes == 32 * 16 * kv_bytes_per_token(facts, "fp32", tp, stage0)
    assert not any(p.is_alive() for p in workers)


@pytest.mark.parametrize("unsplit", [False], indirect=True)
def test_a_stage_per_node_as_a_leader_worker_set_runs_them(unsplit):
    """Node 1 is `kvpilot serve --node-rank 1` in its own process (a LeaderWorkerSet worker pod, its
    LWS_WORKER_INDEX): it runs stage 1; node 0 is the engine and stage 0."""
    checkpoint, prompts, expected = unsplit

    def leader_runs_stage_0_alone(llm):
        assert llm.engine.workers.processes == [] and llm.engine.config.stages_of_node() == [0]

    outputs = generate_across_two_nodes(checkpoint, prompts, {"pipeline_parallel_size": 2}, leader_runs_stage_0_alone)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
