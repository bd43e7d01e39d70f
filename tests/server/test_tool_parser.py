"""The tool-call parser on its own: any split of the text into stream pieces gives the whole answer's
calls and content; Hermes and Llama-3.1 JSON formats; the tool grammars compile; tool turns render."""

from __future__ import annotations

import json

import pytest

from kvpilot.runtime.engine.guidance import check
from kvpilot.runtime.server.tool_parser import ToolCallParser
from kvpilot.runtime.server.tools import HERMES, LLAMA3_JSON, Tool, conversation, tool_format, tool_grammar

HERMES_TEXT = ('Let me check <b>.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", '
               '"days": [1, {"a": 2}]}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n')
LLAMA_TEXT = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "now", "parameters": {}}'
EXPECTED = [("get_weather", None), ("now", "{}")]


def _streamed(fmt, text: str, size: int) -> tuple[str, list[tuple[str, str]]]:
    parser, content, calls = ToolCallParser(fmt), "", {}
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    for i, piece in enumerate(pieces):
        got, deltas = parser.feed(piece, finished=i == len(pieces) - 1)
        content += got
        for d in deltas:
            if "id" in d:
                calls[d["index"]] = [d["function"]["name"], ""]
            else:
                calls[d["index"]][1] += d["function"]["arguments"]
    return content, [tuple(c) for c in calls.values()]


@pytest.mark.parametrize(("fmt", "text", "content", "first_args"), [
    (HERMES, HERMES_TEXT, "Let me check <b>.\n", {"city": 'Pa"ris}', "days": [1, {"a": 2}]}),
    (LLAMA3_JSON, LLAMA_TEXT, "", {"city": "Paris"}),
])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_any_stream_split_gives_the_whole_answer(fmt, text, content, first_args, size):
    whole = ToolCallParser(fmt)
    assert whole.feed(text, finished=True)[0] == content
    calls = [(c.name, c.arguments) for c in whole.calls]
    assert [n for n, _ in calls] == ["get_weather", "now"]
    assert json.loads(calls[0][1]) == first_args and calls[1][1] == "{}"
    assert _streamed(fmt, text, size) == (content, calls)


@pytest.mark.parametrize("text", ["Hello there.", "a <tool b", "<tool_call> not a call", "x < y and y > z"])
def test_text_without_calls_is_all_content(text):
    for size in (1, 4, 100):
        assert _streamed(HERMES, text, size) == (text, [])


def test_format_follows_the_chat_template():
    assert tool_format(None) is HERMES
    assert tool_format("{{ '<tool_call>' }}") is HERMES
    assert tool_format("{{- '<|python_tag|>' + tool_call.name }}") is LLAMA3_JSON


TOOLS = [Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}},
                                  "required": ["city"]}), Tool("now", "", {"type": "object", "properties": {}})]


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON])
@pytest.mark.parametrize(("choice", "parallel"), [("required", True), ("required", False), ("now", False),
                                                  ("auto", True)])
def test_tool_grammars_compile(fmt, choice, parallel):
    spec = tool_grammar(TOOLS, choice, parallel, fmt)
    if choice == "auto" and fmt is LLAMA3_JSON:
        assert spec is None  # no opening tag to trigger on: parsed, not constrained
        return
    check(spec)
    assert tool_grammar(TOOLS, "none", parallel, fmt) is None


def test_tool_turns_render_in_hermes_layout_for_templates_without_tools():
    messages = [{"role": "user", "content": "Weather?", "tool_calls": None, "tool_call_id": None},
                {"role": "assistant", "content": "", "tool_call_id": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": "21 C", "tool_call_id": "call_1", "tool_calls": None}]
    conv = conversation(messages, TOOLS, native=False, fmt=HERMES)
    assert conv[0]["role"] == "system" and '"name": "get_weather"' in conv[0]["content"]
    assert conv[2] == {"role": "assistant", "content":
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert conv[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}
    native = conversation(messages, TOOLS, native=True, fmt=HERMES)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # HF templates take a dict
    assert native[2]["role"] == "tool" and native[2]["tool_call_id"] == "call_1"
