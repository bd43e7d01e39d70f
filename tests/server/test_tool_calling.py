"""Tool calling through the `openai` client against the live server: named and required choices
always give arguments that parse and match the function's schema, streamed and whole answers agree,
and a call -> tool result -> answer loop runs; bad tools and choices are 400s naming the fault."""

from __future__ import annotations

import json

import jsonschema
import pytest

from .conftest import MODEL

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
QUESTIONS = ["What is the weather in Paris?", "Is it cold in Oslo today?", "Weather for Tokyo in fahrenheit.",
             "Tell me a joke."]


def _check_calls(message, names: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_named_choice_always_gives_valid_arguments(live, temperature):
    for i, question in enumerate(QUESTIONS):
        answer = live.client().chat.completions.create(
            model=MODEL, max_tokens=60, temperature=temperature, seed=i, tools=[WEATHER, ADD],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False, messages=[{"role": "user", "content": question}])
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message, {"get_weather"})


def test_required_choice_calls_one_of_the_tools(live):
    answer = live.client().chat.completions.create(
        model=MODEL, max_tokens=80, temperature=0, tools=[WEATHER, ADD], tool_choice="required",
        messages=[{"role": "user", "content": "What is 12 plus 30?"}])
    assert answer.choices[0].finish_reason == "tool_calls"
    _check_calls(answer.choices[0].message, {"get_weather", "add"})


def test_streamed_and_whole_tool_calls_agree(live):
    request = {"model": MODEL, "max_tokens": 60, "temperature": 0, "tools": [WEATHER, ADD],
               "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
               "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    whole = live.client().chat.completions.create(**request).choices[0]
    calls: dict[int, dict] = {}
    finish, pieces = None, 0
    for chunk in live.client().chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] = (delta.function.name if delta.function else None) or call["name"]
                call["arguments"] += (delta.function.arguments if delta.function else None) or ""
                pieces += 1
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert pieces > 2  # the arguments came in pieces, not in one delta


def test_tool_calling_loop(live, http):
    client = live.client()
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    first = client.chat.completions.create(model=MODEL, max_tokens=60, temperature=0, tools=[WEATHER],
                                           tool_choice="required", messages=messages).choices[0].message
    _check_calls(first, {"get_weather"})
    messages.append(first.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": first.tool_calls[0].id,
                     "content": json.dumps({"temperature": 21, "sky": "sunny"})})
    final = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0, tools=[WEATHER],
                                           tool_choice="none", messages=messages).choices[0]
    assert final.message.content and not final.message.tool_calls
    assert final.finish_reason in ("stop", "length")
    prompt = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    text = live.engine.tokenizer.decode(prompt["tokens"])
    assert "<tool_response>" in text and '"sky": "sunny"' in text and '"name": "get_weather"' in text


def test_auto_choice_without_a_call_is_plain_content(live):
    answer = live.client().chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0, tools=[WEATHER], tool_choice="auto",
        messages=[{"role": "user", "content": "Say hello."}]).choices[0]
    if answer.message.tool_calls:  # the model may call; then the call must be valid
        _check_calls(answer.message, {"get_weather"})
    else:
        assert answer.message.content


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "'nope'"),
    ({"tool_choice": "required"}, None, "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]}, "tools",
     "Invalid type: strin"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot also follow"),
])
def test_bad_tools_are_400(http, extra, param, words):
    body = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}], **extra}), 400)
    assert body["param"] == param and words in body["message"], body
