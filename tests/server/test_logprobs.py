"""Logprobs carry each token's true bytes (#16): byte-level tokens that hold part of a character
rebuild it, completions' top_logprobs keep one key per token, text_offset counts characters."""

from __future__ import annotations

import pytest

from kvpilot.runtime.engine.sequence import TokenLogprob
from kvpilot.runtime.server.logprobs import TokenBytes, chat_logprobs, completion_logprobs

from .conftest import MODEL

TEXT = "🎉 héllo, 世界"


@pytest.fixture(scope="module")
def names(llm_engine) -> TokenBytes:
    return TokenBytes(llm_engine.tokenizer)


def test_the_bytes_of_split_characters_rebuild_them(llm_engine, names):
    ids = llm_engine.tokenizer.encode(TEXT, add_special_tokens=False)
    assert any(llm_engine.tokenizer.decode([t]) == "\ufffd" for t in ids)  # some tokens hold part of a character
    entries = [TokenLogprob(t, -1.0, []) for t in ids]
    content = chat_logprobs(entries, names)["content"]
    assert b"".join(bytes(item["bytes"]) for item in content).decode() == TEXT
    assert [item["token"] for item in content if item["token"].startswith("bytes:")]  # OpenAI's name for them


def test_completion_top_logprobs_keep_every_alternative_and_offsets_count_characters(llm_engine, names):
    ids = llm_engine.tokenizer.encode(TEXT, add_special_tokens=False)
    partial = [t for t in ids if llm_engine.tokenizer.decode([t]) == "\ufffd"]
    assert len(set(partial)) >= 3
    entries = [TokenLogprob(t, -0.5, [(p, -1.0 - i) for i, p in enumerate(partial[:5])]) for t in ids]
    lp = completion_logprobs(ids, entries, names, start_offset=3)
    assert all(len(top) == len(partial[:5]) for top in lp["top_logprobs"])  # no key collides
    text, expected = "", []
    for _ in ids:  # a character starts where its first byte is, counted as whole characters before it
        expected.append(3 + len(text))
        text = b"".join(names.bytes_of(x) for x in ids[: len(expected)]).decode(errors="ignore")
    assert lp["text_offset"] == expected
    assert lp["text_offset"][-1] - 3 == len(TEXT) - len(llm_engine.tokenizer.decode(ids[-1:]))


def test_live_chat_logprobs_bytes_spell_the_answer(live):
    reply = live.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say: 🎉 fête"}], max_tokens=12, temperature=0,
        logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert b"".join(bytes(item.bytes) for item in content).decode() == reply.choices[0].message.content
    assert all(len({t.token for t in item.top_logprobs}) == 5 for item in content)


def test_echo_and_prompt_logprobs_score_the_prompt_as_generation_scores_its_tokens(live, http):
    """A prompt token's logprob equals the logprob the same token got when it was generated after the
    same prefix; the first prompt token has none."""
    client = live.client()
    prefix = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    generated = client.completions.create(model=MODEL, prompt=prefix, max_tokens=1, temperature=0, logprobs=2)
    token_logprob = generated.choices[0].logprobs.token_logprobs[0]
    token_id = http.post("/tokenize", json={"prompt": generated.choices[0].text,
                                            "add_special_tokens": False}).json()["tokens"][0]
    prompt = [*prefix, token_id]
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, logprobs=2, echo=True,
                                       extra_body={"prompt_logprobs": 3})
    choice = echoed.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(prompt) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(prefix)] == pytest.approx(token_logprob, abs=1e-3)
    assert choice.text.startswith(http.post("/detokenize", json={"tokens": prompt}).json()["prompt"])
    vllm = choice.model_extra["prompt_logprobs"]
    assert len(vllm) == len(prompt) and vllm[0] is None
    assert vllm[len(prefix)][str(token_id)]["logprob"] == pytest.approx(token_logprob, abs=1e-3)
    assert vllm[len(prefix)][str(token_id)]["rank"] == 1  # the greedy choice
    assert all(len(entry) >= 3 for entry in vllm[1:])
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, logprobs=2,
                                         echo=True, stream=True)
    first = next(iter(streamed)).choices[0]
    assert first.logprobs.token_logprobs[len(prefix)] == pytest.approx(token_logprob, abs=1e-3)
    assert "".join([first.text] + [c.choices[0].text for c in streamed if c.choices]) == choice.text
