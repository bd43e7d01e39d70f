"""JSON mode: the grammar automaton against Python's json module, and the engine's output under it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpilot.runtime.engine.json_mode import START, feed
from kvpilot.runtime.engine.llm import LLM
from kvpilot.runtime.engine.sampling import SamplingParams

scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=8) | st.floats(
    allow_nan=False, allow_infinity=False)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3), max_leaves=8)
objects = st.dictionaries(st.text(max_size=6), values, max_size=4)
layouts = st.sampled_from([{}, {"indent": 2}, {"separators": (",", ":")}, {"ensure_ascii": False}])


@settings(max_examples=300, deadline=None)
@given(objects, layouts)
def test_every_prefix_of_an_object_is_accepted_and_only_the_whole_is_complete(obj, layout):
    text = " " + json.dumps(obj, **layout) + "\n"
    state = START
    closed_at = None
    for i, char in enumerate(text):
        state = feed(state, char)
        assert state is not None, (text, i)
        if state.complete and closed_at is None:
            closed_at = i
    assert state.complete and text[: closed_at + 1].strip() == text.strip()


@pytest.mark.parametrize("text", [
    "[1]", '"a"', "1", '{"a":}', "{,}", '{"a" 1}', '{"a":01}', '{"a":1.}', '{"a":tru}', '{"a":1]', '{"a":[1}',
    '{"a":"\x01"}', '{"a":"\\x"}', '{"a":"\\u12g4"}', '{"a":1}}', '{"a":1} x', "{'a':1}", '{"a":-}', '{"a":1e}',
    '{"a":.5}', '{a:1}', '{"a":1,}', '{"a":[1,]}',
])
def test_what_is_not_a_json_object_is_refused(text):
    try:
        is_object = isinstance(json.loads(text), dict)
    except ValueError:
        is_object = False
    assert not is_object
    state = feed(START, text)
    assert state is None or not state.complete


@pytest.fixture
def chat(make_llm):
    llm: LLM = make_llm(max_num_batched_tokens=64)
    return llm, lambda question: llm.apply_chat_template([{"role": "user", "content": question}])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_mode_outputs_parse_as_objects(chat, temperature):
    llm, prompt = chat
    questions = ["Describe a cat as JSON with keys name and age.", "Give me a JSON object of three fruits.",
                 "What is the capital of France? Reply in JSON.", "List two colours."]
    params = SamplingParams(max_tokens=96, temperature=temperature, seed=1, json_object=True)
    outputs = llm.generate([prompt(q) for q in questions], params)
    finished = [o for o in outputs if o.finish_reason == "stop"]
    assert finished, [o.text for o in outputs]  # at least one closes its object within 96 tokens
    for out in finished:
        assert isinstance(json.loads(out.text), dict), out.text
        assert out.text.endswith("}"), out.text  # stopped as the object closed, not padded with whitespace
    for out in outputs:  # the ones cut by max_tokens are still a valid start of an object
        state = feed(START, out.text)
        assert state is not None, out.text
