"""Every client mistake is a 4xx in OpenAI's error shape (#16): out-of-range values, values that do
not fit together, invalid Unicode, ambiguous framing; and the fields that were ignored now run."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from kvpilot.runtime.server.app import ServerConfig

from .conftest import MAX_MODEL_LEN, MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
VOCAB = 49152  # SmolLM2's


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status
    return body


def _post(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    # json.dumps spells inf as Infinity, which Python's JSON reader (the server's) takes
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _chat(http: httpx.Client, **fields) -> httpx.Response:
    return _post(http, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 4} | fields)


def _completion(http: httpx.Client, **fields) -> httpx.Response:
    return _post(http, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4} | fields)


@pytest.mark.parametrize(("fields", "words"), [
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**64 - 1, "n": 2}, "exceeds 2**64 - 1"),
    ({"seed": -1}, "seed"),
    ({"stop_token_ids": [VOCAB], "min_tokens": 2}, "outside the vocabulary"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens: 5 is more than max_tokens (4)"),
    ({"min_tokens": MAX_MODEL_LEN, "max_tokens": None}, "min_tokens"),  # more than the room left
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options: only allowed when stream is true"),
    ({"temperature": float("inf")}, "temperature"),
])
def test_out_of_range_and_inconsistent_values_are_400(http, fields, words):
    for send in (_chat, _completion):
        body = _error(send(http, **fields))
        assert words in body["message"], body


def test_top_logprobs_needs_logprobs(http):
    body = _error(_chat(http, top_logprobs=2))
    assert "top_logprobs: only allowed when logprobs is true" in body["message"]
    assert _chat(http, top_logprobs=2, logprobs=True).status_code == 200


def test_the_largest_seeds_and_top_k_run(http):
    assert _chat(http, seed=2**64 - 1).status_code == 200
    assert _chat(http, seed=2**64 - 2, n=2).status_code == 200
    huge = _completion(http, top_k=2**63, temperature=1.0, seed=7, max_tokens=6).json()
    every = _completion(http, top_k=-1, temperature=1.0, seed=7, max_tokens=6).json()
    assert huge["choices"][0]["text"] == every["choices"][0]["text"]  # top_k >= vocabulary: every token


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", '{"model": "smollm2", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/completions", '{"model": "smollm2", "prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/completions", '{"model": "smollm2", "prompt": ["ok", "a\\udfffb"], "max_tokens": 2}'),
    ("/tokenize", '{"prompt": "a\\ud800b"}'),
    ("/tokenize", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'),
])
def test_a_lone_surrogate_is_400(http, path, body):
    error = _error(http.post(path, content=body.encode(), headers={"content-type": "application/json"}))
    assert "lone UTF-16 surrogate" in error["message"]


def _raw_http(url: str, head: str, body: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):  # Connection: close: the server ends the reply
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


def test_content_length_with_chunked_is_400_and_the_bytes_read_count(serve):
    small = serve(ServerConfig(MODEL, max_body_bytes=2000))
    payload = json.dumps({"model": MODEL, "prompt": "x " * 5000, "max_tokens": 1}).encode()
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    status, reply = _raw_http(small.url, head + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 400 and b"Content-Length and Transfer-Encoding" in reply
    status, reply = _raw_http(small.url, head + "Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 413


def test_include_stop_str_in_output(live):
    client = live.client()
    whole = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0].text
    stop = whole.split()[2]
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop])
    kept = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert cut.choices[0].text == whole[: whole.index(stop)]
    assert kept.choices[0].text == whole[: whole.index(stop) + len(stop)]
    assert kept.choices[0].finish_reason == "stop"


def test_a_batch_of_prompts_and_token_id_lists(live, http):
    client = live.client()
    prompts = ["The sky is", "Once upon a time"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0) for p in prompts]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    ids = [http.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [a.choices[0].text for a in alone]
    streamed = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [a.choices[0].text for a in alone]


def test_echo_puts_the_prompt_before_the_completion(live):
    client = live.client()
    plain = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
