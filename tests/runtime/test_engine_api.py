"""The engine's API on the real model: finish reasons, stop strings and stop tokens, seeds,
logprobs, admission errors, refused options, and the KV pool's bytes against the memory plan."""

from __future__ import annotations

import pytest
import torch

from kvpilot.runtime.engine.config import EngineConfig, memory_plan
from kvpilot.runtime.engine.kv_cache import allocate_kv_cache
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import AdmissionError
from kvpilot.runtime.memory.quantization import kv_bytes_per_token

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(loaded_model):
    from kvpilot.runtime.engine.llm import LLM

    return LLM(loaded=loaded_model, num_kv_blocks=64, max_model_len=512, device="cpu")


@pytest.fixture(scope="module")
def greedy_run(llm):
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=40))
    return out


def test_eos_stops_with_reason_stop_and_no_eos_text(llm, greedy_run):
    assert greedy_run.finish_reason == "stop" and greedy_run.token_ids[-1] in llm.engine.eos_token_ids
    assert greedy_run.text == llm.tokenizer.decode(greedy_run.token_ids, skip_special_tokens=True)
    (ignored,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True))
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 36
    assert ignored.token_ids[: len(greedy_run.token_ids)] == greedy_run.token_ids


def test_stop_string_cuts_the_text_and_the_stream_never_shows_it(llm, greedy_run):
    stop = greedy_run.text[5:9]
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))
    assert out.finish_reason == "stop" and out.text == greedy_run.text[: greedy_run.text.index(stop)]
    engine = llm.engine
    engine.add_request("streamed", llm.tokenizer.encode(PROMPT), SamplingParams(temperature=0.0, stop=[stop]))
    pieces = []
    while engine.has_unfinished_requests:
        pieces += [o.new_text for o in engine.step()]
    assert "".join(pieces) == out.text and stop not in "".join(pieces)


def test_stop_token_ids_and_max_tokens(llm, greedy_run):
    stop_id = greedy_run.token_ids[4]
    first = greedy_run.token_ids.index(stop_id)
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, stop_token_ids=[stop_id]))
    assert out.finish_reason == "stop" and out.token_ids == greedy_run.token_ids[: first + 1]
    (short,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=3))
    assert short.finish_reason == "length" and short.token_ids == greedy_run.token_ids[:3]
    (late,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=30, min_tokens=28))
    assert len(late.token_ids) >= 28


def test_seeded_sampling_repeats_alone_or_batched(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7)
    (alone,) = llm.generate([PROMPT], params)
    batched = llm.generate(["Once upon a time", PROMPT, "def fib(n):"],
                           [SamplingParams(temperature=1.0, max_tokens=12), params, SamplingParams(max_tokens=5)])
    assert batched[1].token_ids == alone.token_ids
    other = llm.generate([PROMPT] * 3, [SamplingParams(temperature=1.0, max_tokens=12, seed=s) for s in (1, 2, 3)])
    assert len({tuple(o.token_ids) for o in [*other, alone]}) > 1


def test_logprobs_top_n(llm, greedy_run):
    (out,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3))
    assert len(out.logprobs) == 5
    for token_id, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == token_id and lp.top[0][0] == token_id and len(lp.top) == 3
        assert lp.logprob <= 0 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_requests_that_can_never_fit_are_refused_naming_the_numbers(llm, make_llm):
    with pytest.raises(AdmissionError, match=r"prompt \(5 tokens\) \+ max_tokens \(600\) = 605 tokens exceeds "
                                             r"max_model_len 512"):
        llm.generate([PROMPT], SamplingParams(max_tokens=600))
    small = make_llm(num_kv_blocks=16)
    with pytest.raises(AdmissionError, match=r"= 505 tokens needs 32 KV blocks, but the whole KV cache holds 16 "
                                             r"blocks \(256 tokens\)"):
        small.generate([PROMPT, PROMPT], [SamplingParams(max_tokens=5), SamplingParams(max_tokens=500)])
    assert not small.engine.has_unfinished_requests  # checked before any request of the batch ran


@pytest.mark.parametrize(("options", "match"), [
    ({"quantization": "int3"}, r"quantization 'int3' is not one of none, int8, int4, fp8"),
    ({"quantization": "bf16"}, r"quantization 'bf16' differs from the compute dtype fp32: set dtype bf16"),
    ({"kv_cache_dtype": "fp16"}, r"KV cache dtype 'fp16' differs from the compute dtype fp32"),
    ({"kv_cache_dtype": "int8"}, r"KV cache dtype 'int8' is not one of auto, fp32, fp8"),
    ({"tensor_parallel_size": 0}, r"tensor_parallel_size must be an integer >= 1, got 0"),
    ({"pipeline_parallel_size": 0}, r"pipeline_parallel_size must be an integer >= 1, got 0"),
    ({"tensor_parallel_size": 4, "nnodes": 3}, r"nnodes \(3\) must divide tensor_parallel_size x pip"),
    ({"tensor_parallel_size": 2, "nnodes": 2, "node_rank": 2, "leader_address": "x"}, r"node_rank 2 is not one"),
    ({"device": "cuda"} if not torch.cuda.is_available() else {"device": "tpu"}, r"device"),
])
def test_options_not_run_yet_are_refused_at_start_up(options, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{"device": "cpu", **options})


def test_unset_limits_come_from_the_model_and_the_plan(loaded_model):
    facts = loaded_model.facts
    config = EngineConfig(device="cpu", max_num_batched_tokens=8, num_kv_blocks=10).for_model(facts)
    assert config.max_model_len == facts.max_position_embeddings == 8192
    assert config.max_num_seqs == 8  # never more sequences than one step's token budget can decode
    with pytest.raises(ValueError, match=r"max_model_len 9000 exceeds .* 8192 positions"):
        EngineConfig(device="cpu", max_model_len=9000).for_model(facts)


def test_kv_memory_becomes_the_blocks_it_holds(loaded_model):
    facts = loaded_model.facts
    per_block = kv_bytes_per_token(facts, "fp32") * 16
    config = EngineConfig(device="cpu", max_model_len=2048, kv_memory=10 * per_block + per_block // 2).for_model(facts)
    assert config.num_kv_blocks == 10 and config.kv_memory == 0
    with pytest.raises(ValueError, match=f"holds no KV block of {per_block} bytes"):
        EngineConfig(device="cpu", max_model_len=2048, kv_memory=per_block - 1).for_model(facts)
    with pytest.raises(ValueError, match="num_kv_blocks or kv_memory, not both"):
        EngineConfig(device="cpu", num_kv_blocks=4, kv_memory=per_block)


def test_bad_limits_are_named():
    with pytest.raises(ValueError, match=r"block_size must be an integer >= 1, got 0"):
        EngineConfig(device="cpu", block_size=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(16\)"):
        EngineConfig(device="cpu", max_num_seqs=16, max_num_batched_tokens=8)


def test_kv_pool_bytes_equal_the_one_formula_and_the_plan(llm, loaded_model):
    facts, config = loaded_model.facts, llm.engine.config
    per_token = kv_bytes_per_token(facts, "fp32", tp=1)
    assert llm.engine.runner.kv_cache.nbytes == config.num_kv_blocks * config.block_size * per_token
    unset = EngineConfig(device="cpu", max_model_len=2048)
    plan = memory_plan(facts, unset)
    assert unset.for_model(facts).num_kv_blocks == plan.num_kv_blocks
    groups = unset.kv_groups(facts)  # one group: every layer attends to its whole context
    pool = allocate_kv_cache(facts, plan.num_kv_blocks, plan.block_size, torch.float32, "meta", groups)  # no memory
    assert groups.num_groups == 1 and plan.kv_block_bytes == plan.block_size * per_token
    assert pool.nbytes == plan.num_kv_blocks * plan.block_size * per_token == plan.memory.kv_cache
    assert plan.kv_bytes_per_token == per_token
