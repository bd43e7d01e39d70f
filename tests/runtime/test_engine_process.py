"""The engine in a process of its own (runtime/server/engine_process.py): the same streams as the
in-process engine, aborts that free the blocks, admission in the server's process, a load failure
that arrives as the user's one-line error, a dead engine that fails every stream, and a failing step
that ends its requests and, three in a row, the engine."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading

import pytest
from eventually import eventually

from kvpilot.runtime.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.llm_engine import LLMEngine
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import AdmissionError
from kvpilot.runtime.memory.support import UnsupportedOption
from kvpilot.runtime.server.engine_process import EngineCore, EngineProcess

pytestmark = [pytest.mark.slow]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
BLOCKS = 32


def config() -> EngineConfig:
    return EngineConfig(device="cpu", num_kv_blocks=BLOCKS, max_model_len=512)


@pytest.fixture(scope="module")
def engine():
    engine = EngineProcess(config())
    yield engine
    asyncio.run(engine.shutdown())


async def collect(engine, request_id: str, prompt: list[int], params: SamplingParams) -> list:
    return [out async for out in engine.generate(request_id, prompt, params)]


async def _free(engine) -> bool:
    return engine.stats().num_free_kv_blocks == BLOCKS and engine.stats().num_running == 0


@pytest.mark.asyncio
async def test_streams_add_up_to_the_in_process_result(engine, make_llm, tokenizer):
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "Once upon a time", "def fib(n):")]
    expected = make_llm(num_kv_blocks=BLOCKS, max_model_len=512).generate(prompts, GREEDY)
    streams = await asyncio.gather(*(collect(engine, f"same-{i}", p, GREEDY) for i, p in enumerate(prompts)))
    for outs, want in zip(streams, expected, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == want.token_ids
        assert "".join(o.new_text for o in outs) == want.text == outs[-1].text
        # equal up to the batch's summation order (the streams need not share the offline run's batches)
        assert [lp.logprob for o in outs for lp in o.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs],
                                                                                abs=1e-4)
        assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    await eventually(lambda: _free(engine), 10, "every KV block free")
    assert engine.stats().generation_tokens_total >= 36


@pytest.mark.asyncio
async def test_abort_ends_the_stream_at_once_and_the_engine_frees_the_blocks(engine, tokenizer):
    outs = []
    async for out in engine.generate("long", tokenizer.encode("Count to a thousand:"), LONG):
        outs.append(out)
        if len(outs) == 3:
            engine.abort("long")
    assert outs[-1].finish_reason == "abort" and len(outs) == 4
    assert outs[-1].token_ids == outs[2].token_ids  # what had been generated, as the in-process engine says
    await eventually(lambda: _free(engine), 10, "every KV block free")


@pytest.mark.asyncio
async def test_leaving_the_stream_early_aborts_the_request(engine, tokenizer):
    stream = engine.generate("gone", tokenizer.encode("Tell me a long story."), LONG)
    async for _ in stream:
        break
    await stream.aclose()
    await eventually(lambda: _free(engine), 10, "the request aborted and its blocks free")


@pytest.mark.asyncio
async def test_requests_that_can_never_run_are_refused_in_the_servers_process(engine):
    with pytest.raises(AdmissionError, match="exceeds max_model_len 512"):
        await collect(engine, "big", [1] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(AdmissionError, match="outside the vocabulary"):
        engine.check_request("bad", [10**7], SamplingParams())


def test_the_server_sees_the_engines_config_plan_and_memory(engine):
    assert engine.config.num_kv_blocks == BLOCKS and engine.max_model_len == 512
    figures = engine.memory_figures()
    assert figures.measured["kv_cache"] == figures.planned["kv_cache"] == BLOCKS * engine.plan.kv_block_bytes
    assert figures.measured["weights"] > 100 * 2**20  # SmolLM2-135M in fp32, as the child holds it


def test_a_load_failure_is_the_users_error_in_one_line(capfd, tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(UnsupportedOption, match="GPT2LMHeadModel"):
        EngineProcess(EngineConfig(model=str(tmp_path), device="cpu"))
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.asyncio
async def test_a_dead_engine_fails_every_stream_and_health(tokenizer):
    engine = EngineProcess(config())
    try:
        stream = engine.generate("victim", tokenizer.encode("Tell me a long story."), LONG)
        await stream.__anext__()
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine process exited"):
            async for _ in stream:
                pass
        assert not engine.is_ready()
    finally:
        await engine.shutdown()


def test_a_failing_step_ends_its_requests_and_three_in_a_row_the_engine(loaded_model, tokenizer):
    """EngineCore over a real engine and a real pipe, in a thread of this process, with a broken step."""
    llm_engine = LLMEngine(config(), loaded_model)

    def broken_step():
        raise RuntimeError("device fault")

    llm_engine.step = broken_step
    server_end, engine_end = mp.Pipe()
    core = threading.Thread(target=EngineCore(llm_engine, engine_end, lambda: None).run, daemon=True)
    core.start()
    faults = []
    for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
        server_end.send(("add", f"r{i}", tokenizer.encode("Hello"), GREEDY))
        while (message := server_end.recv())[0] != "fault":
            pass
        faults.append(message[1:])
    assert [ids for _, ids, _ in faults] == [["r0"], ["r1"], ["r2"]]
    assert [fatal for *_, fatal in faults] == [False, False, True]
    assert faults[0][0] == "RuntimeError: device fault" and not llm_engine.requests
    server_end.send(("stop",))
    core.join(10)
    assert not core.is_alive()
