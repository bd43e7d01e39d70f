"""The asyncio engine the server streams from: per-request streams, aborts, admission errors, and a
step loop that leaves the event loop free."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from eventually import eventually

from kvpilot.runtime.engine.async_engine import AsyncLLMEngine
from kvpilot.runtime.engine.config import EngineConfig
from kvpilot.runtime.engine.llm_engine import LLMEngine
from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import AdmissionError

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest_asyncio.fixture
async def engine(loaded_model):
    config = EngineConfig(device="cpu", num_kv_blocks=32, max_model_len=512)
    engine = AsyncLLMEngine(LLMEngine(config, loaded_model))
    yield engine
    await engine.shutdown()


async def collect(engine: AsyncLLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list:
    return [out async for out in engine.generate(request_id, prompt, params)]


async def test_streams_add_up_to_the_offline_result(engine, make_llm, tokenizer):
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "Once upon a time", "def fib(n):")]
    expected = make_llm().generate(prompts, GREEDY)
    streams = await asyncio.gather(*(collect(engine, f"r{i}", p, GREEDY) for i, p in enumerate(prompts)))
    for outs, want, prompt in zip(streams, expected, prompts, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == want.token_ids
        assert "".join(o.new_text for o in outs) == want.text == outs[-1].text
        assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
        assert all(o.num_prompt_tokens == len(prompt) for o in outs)
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.generation_tokens_total == 36


async def test_abort_ends_the_stream_and_frees_the_blocks(engine, tokenizer):
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    outs = []
    async for out in engine.generate("long", tokenizer.encode("Count to a thousand:"), long):
        outs.append(out)
        if len(outs) == 3:
            engine.abort("long")
    assert outs[-1].finish_reason == "abort" and len(outs) == 4
    # an abort that lands mid-step is applied as soon as that step ends
    await eventually(lambda: engine.stats().num_free_kv_blocks == 32, 10, "every KV block free")
    assert engine.stats().num_running == 0


async def test_leaving_the_stream_early_aborts_the_request(engine, tokenizer):
    stream = engine.generate("gone", tokenizer.encode("Tell me a long story."),
                             SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    await eventually(lambda: not engine.engine.has_unfinished_requests and engine.stats().num_free_kv_blocks == 32,
                     10, "the request aborted and its blocks free")


async def test_admission_errors_reach_the_caller(engine):
    with pytest.raises(AdmissionError, match="exceeds max_model_len 512"):
        await collect(engine, "big", [1] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        await collect(engine, "bad", [10**7], SamplingParams())


async def test_the_event_loop_stays_free_while_the_model_steps(engine, tokenizer):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    outs = await collect(engine, "r", tokenizer.encode("Hello"), GREEDY)
    task.cancel()
    assert len(outs) == 12 and ticks >= 12  # at least one tick per model step
