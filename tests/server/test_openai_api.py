"""The OpenAI API through the official `openai` client against a live server: answers, streaming,
usage, stop strings, seeds, logprobs, and every error with its status code and message."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from kvpilot.runtime.server.app import ServerConfig

from .conftest import MAX_MODEL_LEN, MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat(live, **kwargs):
    return live.client().chat.completions.create(model=MODEL, messages=kwargs.pop("messages", QUESTION), **kwargs)


def test_models(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_health_and_ready(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200


def test_chat_greedy_answers_with_usage(live, http):
    reply = chat(live, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    prompt_ids = http.post("/tokenize", json={"model": MODEL, "messages": QUESTION}).json()["tokens"]
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_completion_length_and_ignore_eos(live):
    reply = live.client().completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    assert reply.choices[0].text


def test_completion_from_token_ids(live, http):
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = live.client().completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    by_text = live.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_streaming_chat_equals_the_whole_answer_and_reports_usage(live):
    whole = chat(live, max_tokens=20, temperature=0)
    stream = chat(live, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_completion(live):
    stream = live.client().completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=10, temperature=0,
                                              stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    whole = live.client().completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=10, temperature=0)
    assert text == whole.choices[0].text


def test_stop_string_cuts_the_text(live):
    whole = chat(live, max_tokens=24, temperature=0).choices[0].message.content
    stop = whole.split()[3]  # a word from the middle of the greedy answer
    reply = chat(live, max_tokens=24, temperature=0, stop=[stop]).choices[0]
    assert reply.finish_reason == "stop"
    assert reply.message.content == whole[: whole.index(stop)]


def test_seed_reproduces_samples(live):
    runs = [chat(live, max_tokens=16, temperature=1.0, seed=1234).choices[0].message.content for _ in range(2)]
    assert runs[0] == runs[1]
    many = chat(live, max_tokens=16, temperature=1.0, seed=1234, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == runs[0]  # choice i samples with seed + i
    assert len({c.message.content for c in many.choices}) > 1


def test_chat_logprobs(live):
    reply = chat(live, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob <= 0
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-4)  # greedy
    assert "".join(item.token for item in content) == reply.choices[0].message.content


def test_completion_logprobs(live):
    reply = live.client().completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2,
                                             extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_vllm_extra_sampling_fields(live):
    reply = chat(live, max_tokens=8, temperature=0.8, seed=3,
                 extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 8,
                             "stop_token_ids": [2]})
    assert reply.usage.completion_tokens == 8


def test_tokenize_detokenize_round_trip(http):
    ids = http.post("/tokenize", json={"prompt": "kvpilot pages the KV cache"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == MAX_MODEL_LEN
    text = http.post("/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert "kvpilot pages the KV cache" in text


# --- errors -----------------------------------------------------------------------------------------

def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    return body


def test_too_long_names_both_numbers(live):
    with pytest.raises(openai.BadRequestError) as err:
        chat(live, max_tokens=MAX_MODEL_LEN)
    message = err.value.body["message"]
    assert str(MAX_MODEL_LEN) in message and f"{MAX_MODEL_LEN} for the completion" in message
    assert err.value.body["param"] == "max_tokens"


def test_unknown_model_is_404(live):
    with pytest.raises(openai.NotFoundError) as err:
        live.client().chat.completions.create(model="gpt-9", messages=QUESTION)
    assert "gpt-9" in err.value.body["message"]


def test_wrong_type_names_the_field(http):
    body = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION,
                                                          "temperature": "hot"}), 400)
    assert body["param"] == "temperature" and "temperature" in body["message"]
    missing = _error(http.post("/v1/completions", json={"model": MODEL}), 400)
    assert missing["param"] == "prompt"


def test_bad_json_is_400(http):
    body = _error(http.post("/v1/chat/completions", content=b"{not json",
                            headers={"content-type": "application/json"}), 400)
    assert "JSON" in body["message"]


def test_queue_full_is_429_with_retry_after(serve):
    full = serve(ServerConfig(MODEL, max_waiting=0))
    with httpx.Client(base_url=full.url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 2})
    _error(response, 429)
    assert response.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        chat(full, max_tokens=2)


def test_api_key(serve):
    guarded = serve(ServerConfig(MODEL, api_key="s3cret"))
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        body = _error(http.get("/v1/models"), 401)
        assert "API key" in body["message"]
        with pytest.raises(openai.AuthenticationError):
            guarded.client().models.list()
        ok = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="s3cret", max_retries=0).models.list()
        assert ok.data[0].id == MODEL
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200


def test_body_limit_is_413(serve):
    small = serve(ServerConfig(MODEL, max_body_bytes=2000))
    big = {"model": MODEL, "prompt": "x " * 2000, "max_tokens": 1}
    with httpx.Client(base_url=small.url, timeout=60) as http:
        _error(http.post("/v1/completions", json=big), 413)

        def chunks():
            yield json.dumps(big).encode()

        _error(http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("functions", [{"name": "f", "parameters": {}}], "function calling"),
    ("logit_bias", {"50256": -100}, "logit_bias"),
])
def test_fields_this_server_does_not_run_are_refused_not_ignored(http, field, value, words):
    body = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, field: value}), 400)
    assert body["param"] == field and f"{words} is not supported by this server" in body["message"]


def test_json_mode_answers_with_a_json_object(live):
    answer = live.client().chat.completions.create(
        model=MODEL, max_tokens=96, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON with keys name and age."}])
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


def test_fields_set_to_off_are_accepted(live):
    answer = live.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, tools=[],
                                                 tool_choice="none", response_format={"type": "text"})
    assert answer.choices[0].message.content is not None


def test_bad_sampling_values_are_400(http):
    body = _error(http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "top_p": 0}), 400)
    assert body["param"] == "top_p"
    body = _error(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert "vocabulary" in body["message"]
