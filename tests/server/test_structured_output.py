"""Structured output through the `openai` client against the live server: json_schema answers parse
and validate for 20 schemas (enums, nested objects, arrays, required fields), `parse()` with a
pydantic model, vLLM's guided_* extras and `structured_outputs`, and bad specs as 400s naming the fault."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from pydantic import BaseModel, Field

from .conftest import MODEL


def _str(n: int = 24) -> dict:
    return {"type": "string", "maxLength": n}


def _obj(required: list[str] | None = None, **props) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCHEMAS = [
    ("Describe a cat.", _obj(name=_str(), age=AGE)),
    ("What colour is the sky?", _obj(colour={"enum": ["red", "green", "blue", "grey"]})),
    ("Is Paris in France?", _obj(answer={"type": "boolean"}, reason=_str(40))),
    ("Give three fruits.", _obj(fruits={"type": "array", "items": _str(12), "minItems": 3, "maxItems": 3})),
    ("Describe a book.", _obj(title=_str(), author=_str(), year={"type": "integer", "minimum": 1000, "maximum": 2100})),
    ("Describe a city.", _obj(city=_str(), country=_str(), location=_obj(lat={"type": "number", "minimum": -90,
                                                                              "maximum": 90},
                                                                         lon={"type": "number", "minimum": -180,
                                                                              "maximum": 180}))),
    ("A person and their address.", _obj(person=_obj(name=_str(), address=_obj(street=_str(), zip=_str(8))))),
    ("Rate this movie from 1 to 5.", _obj(stars={"type": "integer", "enum": [1, 2, 3, 4, 5]})),
    ("Classify: 'I love it!'", _obj(sentiment={"enum": ["positive", "negative", "neutral"]},
                                    confidence={"type": "number", "minimum": 0, "maximum": 1})),
    ("List two planets with their order.", _obj(planets={"type": "array", "minItems": 1, "maxItems": 2,
                                                         "items": _obj(name=_str(12), order=AGE)})),
    ("A to-do item.", _obj(["task"], task=_str(30), done={"type": "boolean"}, priority={"enum": ["low", "high"]})),
    ("Describe a dog, maybe with a nickname.", _obj(["breed"], breed=_str(), nickname={"anyOf": [_str(), {"type":
                                                                                                        "null"}]})),
    ("What is 2+2?", _obj(question=_str(), answer={"type": "integer", "minimum": 0, "maximum": 100})),
    ("Give a greeting in two languages.", _obj(greetings={"type": "array", "minItems": 2, "maxItems": 2,
                                                          "items": _obj(language=_str(12), text=_str(20))})),
    ("Describe a car.", _obj(make=_str(), model=_str(), electric={"type": "boolean"},
                             doors={"type": "integer", "enum": [2, 3, 4, 5]})),
    ("Pick a weekday.", {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"]}),
    ("A user profile with tags.", _obj(user=_obj(id={"type": "integer", "minimum": 1, "maximum": 9999},
                                                 tags={"type": "array", "items": _str(10), "maxItems": 3}))),
    ("An HTTP response status.", _obj(code={"type": "integer", "enum": [200, 404, 500]}, message=_str(30))),
    ("A recipe.", _obj(name=_str(), ingredients={"type": "array", "items": _obj(item=_str(16),
                                                                                grams={"type": "integer",
                                                                                       "minimum": 1,
                                                                                       "maximum": 999}),
                                                  "minItems": 1, "maxItems": 3})),
    ("A date.", _obj(date={"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"})),
]


def _ask(client, question: str, schema: dict, strict: bool):
    return client.chat.completions.create(
        model=MODEL, max_tokens=120, temperature=0, messages=[{"role": "user", "content": question}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                "strict": strict}})


def test_every_json_schema_answer_parses_and_validates(live):
    client = live.client()
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # batched together: one bitmask per step for all rows
        answers = list(pool.map(lambda i: _ask(client, *SCHEMAS[i], strict=i % 2 == 0), range(len(SCHEMAS))))
    for (question, schema), answer in zip(SCHEMAS, answers, strict=True):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (question, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


class Cat(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=30)
    indoor: bool


def test_parse_with_a_pydantic_model(live):
    completion = live.client().chat.completions.parse(
        model=MODEL, max_tokens=80, temperature=0, response_format=Cat,
        messages=[{"role": "user", "content": "Describe my cat Tom, who is 3 and lives indoors."}])
    cat = completion.choices[0].message.parsed
    assert isinstance(cat, Cat), completion.choices[0].message.content


def test_vllm_guided_extras_and_structured_outputs(live):
    client = live.client()

    def ask(**extra):
        return client.chat.completions.create(
            model=MODEL, max_tokens=40, temperature=0, extra_body=extra,
            messages=[{"role": "user", "content": "Is the earth round? Give a code."}]).choices[0].message.content

    assert ask(guided_choice=["yes", "no"]) in ("yes", "no")
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", ask(guided_regex="[A-Z]{3}-[0-9]{2}"))
    assert re.fullmatch(r"(yes|no)!", ask(guided_grammar='root ::= ("yes" | "no") "!"'))  # GBNF
    assert isinstance(json.loads(ask(guided_json=_obj(round={"type": "boolean"})))["round"], bool)
    assert ask(structured_outputs={"choice": ["up", "down"]}) in ("up", "down")


def test_streamed_json_schema_answer_matches_the_whole_one(live):
    question, schema = SCHEMAS[0]
    whole = _ask(live.client(), question, schema, strict=True).choices[0].message.content
    stream = live.client().chat.completions.create(
        model=MODEL, max_tokens=120, temperature=0, stream=True, messages=[{"role": "user", "content": question}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "Invalid type: strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}}}},
     "response_format", "unclosed character class"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format", "name"),
    ({"response_format": {"type": "xml"}}, "response_format", "'xml' is not supported"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "(a"}, "guided_regex", "cannot be compiled"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag not supported"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, None, "send only one"),
])
def test_bad_specs_are_400_naming_the_problem(http, extra, param, words):
    body = _error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}], **extra}), 400)
    assert body["param"] == param and words in body["message"], body
