"""One bad request never hurts another (#16): innocent streams run while malformed requests arrive,
and each innocent request completes with its own tokens; an engine-wide failure is told apart."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from eventually import eventually
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpilot.runtime.engine.sampling import SamplingParams
from kvpilot.runtime.engine.scheduler import AdmissionError
from kvpilot.runtime.server.app import ServerConfig

from .conftest import MODEL

VOCAB = 49152
INNOCENT_PROMPTS = ["Tell me about the sea.", "Name three colours.", "What is 2 + 2?", "Write a haiku."]
INNOCENT_TOKENS = 16
MALFORMED = [
    {"seed": 2**64},
    {"seed": 2**64 - 1, "n": 2},
    {"top_k": 2**63, "temperature": 1.0},
    {"stop_token_ids": [VOCAB], "min_tokens": 3},
    {"stop_token_ids": [VOCAB + 10**6], "min_tokens": 3, "stream": True},
    {"min_tokens": 9, "max_tokens": 4},
    {"min_tokens": 10**6},
    {"messages": [{"role": "user", "content": "a\ud800b"}]},
    {"top_logprobs": 3},
    {"stream_options": {"include_usage": True}},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"temperature": -1},
    {"n": 10**9},
    {"max_tokens": 10**9},
    {"logprobs": True, "top_logprobs": 10**6},
    {"repetition_penalty": 0},
]


def _innocent(prompt: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": INNOCENT_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}


async def _stream_text(client: httpx.AsyncClient, body: dict) -> tuple[str, str | None]:
    """The streamed text and the last finish reason; raises on an error event or a missing [DONE]."""
    text, reason, done = "", None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                reason = choice["finish_reason"] or reason
    assert done
    return text, reason


async def _abuse(client: httpx.AsyncClient, fields: dict) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | fields
    raw = json.dumps(body)  # escapes lone surrogates as \ud800 (valid JSON), which httpx's json= cannot send
    async with client.stream("POST", "/v1/chat/completions", content=raw,
                             headers={"content-type": "application/json"}) as response:
        await response.aread()
        return response.status_code


def _all_running(live, innocent: list[asyncio.Task]) -> bool:
    """The innocent streams are all in the engine (so the abuse arrives while they run)."""
    assert not all(task.done() for task in innocent), "the innocent streams ended before the abuse was sent"
    return live.engine.stats().num_running == len(INNOCENT_PROMPTS)


def test_innocent_streams_finish_with_their_own_tokens_while_malformed_requests_arrive(live):
    async def scenario() -> tuple[list, list, list]:
        async with httpx.AsyncClient(base_url=live.url, timeout=300) as client:
            alone = [await _stream_text(client, _innocent(p)) for p in INNOCENT_PROMPTS]
            innocent = [asyncio.create_task(_stream_text(client, _innocent(p))) for p in INNOCENT_PROMPTS]
            await eventually(lambda: _all_running(live, innocent), 60, "the innocent streams run in the engine")
            statuses = await asyncio.gather(*(_abuse(client, fields) for fields in MALFORMED))
            together = await asyncio.gather(*innocent)
            return alone, together, statuses

    alone, together, statuses = asyncio.run(scenario())
    assert together == alone
    assert all(reason == "length" for _, reason in together)
    by_request = dict(zip(map(str, MALFORMED), statuses, strict=True))
    assert by_request[str({"top_k": 2**63, "temperature": 1.0})] == 200  # normalised: every token
    assert all(400 <= s < 500 for f, s in by_request.items() if "top_k" not in f), by_request
    assert httpx.get(f"{live.url}/health").status_code == 200


# Every field the chat request knows (OpenAI's and vLLM's extras), drawn from values both sane and not.
_ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, VOCAB, -2**63]))
_floats = st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from([0.0, 1e-9, 1e30, 2.0, 2.0000001]))
_ids = st.lists(st.one_of(st.integers(0, 20), st.sampled_from([VOCAB - 1, VOCAB, 2**40, -1])), max_size=3)
_text = st.text(max_size=6) | st.sampled_from(["a\ud800b", "", "\x00", "🎉"])
FIELDS = {
    "n": st.integers(-1, 3), "max_tokens": st.one_of(st.none(), st.integers(-1, 6)), "temperature": _floats,
    "top_p": _floats, "top_k": _ints, "min_p": _floats, "seed": st.one_of(st.none(), _ints), "stop": st.one_of(
        st.none(), _text, st.lists(_text, max_size=6)), "stop_token_ids": _ids, "presence_penalty": _floats,
    "frequency_penalty": _floats, "repetition_penalty": _floats, "min_tokens": _ints, "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(), "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.just({"include_usage": True})), "logprobs": st.booleans(),
    "top_logprobs": st.one_of(st.none(), _ints), "max_completion_tokens": st.one_of(st.none(), st.integers(-1, 6)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "nobody"]),
                                                "content": _text}), min_size=0, max_size=2),
}


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_no_generated_request_fails_a_concurrent_one(live, fields):
    if fields.get("max_tokens") is None:  # None: the room left, hundreds of tokens on a CPU
        fields["max_tokens"] = 4

    async def scenario() -> tuple[tuple, int]:
        async with httpx.AsyncClient(base_url=live.url, timeout=300) as client:
            innocent = asyncio.create_task(_stream_text(client, _innocent(INNOCENT_PROMPTS[0]) | {"max_tokens": 6}))
            status = await _abuse(client, fields)
            return await innocent, status

    (text, reason), status = asyncio.run(scenario())
    assert reason == "length" and text == EXPECTED.setdefault("text", text)
    assert status < 500, fields


EXPECTED: dict[str, str] = {}  # the innocent stream's greedy text, the same in every example


def test_the_engine_refuses_what_could_fail_a_step(llm_engine):
    with pytest.raises(AdmissionError, match=r"stop_token_ids: ids \[49152\] are outside the vocabulary"):
        llm_engine.add_request("r", [1, 2], SamplingParams(stop_token_ids=[VOCAB], min_tokens=2))
    assert "r" not in llm_engine.requests


def test_an_engine_wide_failure_ends_its_requests_then_fails_health(serve, llm_engine, monkeypatch, caplog):
    """A fault no request owns (here the forward pass itself) is logged with its traceback, and is not a
    500 forever: one failed step and the next request is served again; after three steps in a row fail,
    /health is 503 and Kubernetes restarts the pod."""
    server = serve(ServerConfig(MODEL))
    execute, faulty = llm_engine.runner.execute, [True]

    def sometimes_broken(host):
        if faulty[0]:
            raise RuntimeError("device fault")
        return execute(host)

    monkeypatch.setattr(llm_engine.runner, "execute", sometimes_broken)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/completions", json=body).status_code == 500
        faulty[0] = False
        assert http.post("/v1/completions", json=body).status_code == 200  # the engine recovered
        assert http.get("/health").status_code == 200
        faulty[0] = True
        for _ in range(3):
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
            assert "device fault" in response.json()["error"]["message"]
        assert http.get("/health").status_code == 503
        assert http.get("/ready").status_code == 503
    assert not llm_engine.requests and not llm_engine.has_unfinished_requests
    failures = [r for r in caplog.records if r.getMessage().startswith("engine step failed")]
    assert len(failures) == 4 and all(r.exc_info and "device fault" in str(r.exc_info[1]) for r in failures)
