"""Tool calling: the request's tools and tool_choice, the prompt that shows the tools to the model,
the grammar that holds a required or named call to the function's JSON schema, and the model's
tool-call text parsed back into OpenAI `tool_calls`, streamed or whole (tool_parser.py).

Two formats, chosen from the model's chat template: Hermes (`<tool_call>{"name", "arguments"}
</tool_call>`, as Qwen2.5 and SmolLM are trained to write) and Llama-3.1 JSON (`{"name",
"parameters"}`, calls separated by ';'). A template that renders tools itself gets them through
`apply_chat_template(tools=...)`; one that does not (SmolLM2's) gets them in the system prompt in the
Hermes layout Qwen2.5's template uses, with calls and results written back the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llguidance import StructTag
from pydantic import BaseModel, field_validator, model_validator

from kvpilot.runtime.engine.sampling import StructuredOutputs
from kvpilot.runtime.server.structured import checked

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    open: str  # text before each call ("" : calls stand at the start of the answer)
    close: str  # text after each call
    args_key: str  # the key holding the arguments
    separator: str  # between parallel calls


# Hermes calls follow one another directly: after '</tool_call>' a newline is so likely that a small model
# offered one before the next call never stops calling; with none, the end of the turn wins.
HERMES = ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", "")
LLAMA3_JSON = ToolFormat("llama3_json", "", "", "parameters", "; ")


def tool_format(chat_template: str | None) -> ToolFormat:
    """Llama-3.1's template answers tools in `ipython` turns with `<|python_tag|>`; the rest use Hermes tags."""
    return LLAMA3_JSON if chat_template and "<|python_tag|>" in chat_template else HERMES


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def parse_tools(value: Any) -> list[Tool]:
    """OpenAI `tools` -> Tool list; ValueError naming the faulty tool. Each schema must compile."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("must be a list of {type: function, function: {...}} objects")
    tools = []
    for i, item in enumerate(value):
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        parameters = function.get("parameters") or EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise ValueError(f"[{i}].function.parameters must be a JSON schema object")
        try:
            checked(StructuredOutputs(json=json.dumps(parameters)))
        except ValueError as err:
            raise ValueError(f"[{i}].function.parameters ({name}): {err}") from None
        tools.append(Tool(name, str(function.get("description") or ""), parameters))
    if len({t.name for t in tools}) != len(tools):
        raise ValueError("function names must be unique")
    return tools


def parse_tool_choice(value: Any, tools: list[Tool]) -> str:
    """'none', 'auto', 'required' or the name of the one function to call; ValueError when it cannot be."""
    if value is None:
        return "auto" if tools else "none"
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise ValueError("'required' needs tools to call")
        return value
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(name, str):
        raise ValueError("must be 'none', 'auto', 'required' or "
                         '{"type": "function", "function": {"name": ...}}')
    if name not in {t.name for t in tools}:
        raise ValueError(f"names function {name!r}, which is not among the tools")
    return name


def call_schema(tools: list[Tool], fmt: ToolFormat) -> dict[str, Any]:
    """One call's JSON: {"name": <a tool's name>, <args_key>: <that tool's arguments>}."""
    options = [{"type": "object", "properties": {"name": {"const": t.name}, fmt.args_key: t.parameters},
                "required": ["name", fmt.args_key], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_grammar(tools: list[Tool], choice: str, parallel: bool, fmt: ToolFormat) -> StructuredOutputs | None:
    """The grammar for `choice`: required or named -> only calls (one, or several when parallel), each
    matching its function's schema; auto -> free text in which a call, once opened, must match."""
    if choice == "none" or not tools:
        return None
    if choice == "auto":
        if not fmt.open:  # Llama JSON calls have no opening tag to trigger on: left unconstrained
            return None
        tag = StructTag(trigger=fmt.open.strip(), begin=fmt.open, grammar=call_schema(tools, fmt), end=fmt.close)
        return StructuredOutputs(grammar=StructTag.to_grammar([tag], assume_special=False))
    chosen = tools if choice == "required" else [t for t in tools if t.name == choice]
    call = " ".join(p for p in (_literal(fmt.open), "%json " + json.dumps(call_schema(chosen, fmt)),
                                _literal(fmt.close)) if p)
    more = " (" + " ".join(p for p in (_literal(fmt.separator), "call") if p) + ")*" if parallel else ""
    return StructuredOutputs(grammar=f"start: call{more}\ncall: {call}\n")


def _literal(text: str) -> str:
    """A Lark string literal (JSON's escapes), or nothing for empty text."""
    return json.dumps(text) if text else ""


def tools_system_prompt(tools: list[Tool]) -> str:
    """The tool list as Qwen2.5's template writes it, for templates that do not render tools."""
    listed = "\n".join(json.dumps(t.spec()) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{listed}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def conversation(messages: list[dict[str, Any]], tools: list[Tool], native: bool,
                 fmt: ToolFormat) -> list[dict[str, Any]]:
    """OpenAI messages (text content, assistant tool_calls, tool results) as the chat template takes them.
    `native`: the template renders tools, calls and `tool` turns itself (HF's conventions)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = [c["function"] for c in m.get("tool_calls") or [] if isinstance(c.get("function"), dict)]
        if native:
            message = {"role": m["role"], "content": m["content"]}
            if calls:
                message["tool_calls"] = [{"type": "function", "function": {
                    "name": c.get("name"), "arguments": _arguments(c.get("arguments"))}} for c in calls]
            if m.get("tool_call_id"):
                message["tool_call_id"] = m["tool_call_id"]
            out.append(message)
        elif m["role"] == "tool":
            result = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + result  # results of parallel calls share one turn, as Qwen2.5's do
            else:
                out.append({"role": "user", "content": result})
        else:
            text = fmt.separator.join(fmt.open + json.dumps({"name": c.get("name"),
                                                             fmt.args_key: _arguments(c.get("arguments"))})
                                      + fmt.close for c in calls)
            out.append({"role": m["role"], "content": "\n".join(p for p in (m["content"], text) if p)})
    if tools and not native:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[Tool]) -> list[int]:
    """Token ids of the conversation in the model's own chat template, tools included."""
    template = getattr(tokenizer, "chat_template", None) or ""
    native = "tools" in template
    fmt = tool_format(template)
    conv = conversation(messages, tools, native, fmt)
    extra = {"tools": [t.spec() for t in tools]} if native and tools else {}
    return list(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              **extra))


class ToolRequest(BaseModel):
    """The chat request fields of tool calling, checked as the request is validated."""

    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        parse_tools(value)
        return value

    @model_validator(mode="after")
    def _tool_choice(self) -> ToolRequest:
        try:
            parse_tool_choice(self.tool_choice, parse_tools(self.tools))
        except ValueError as err:
            raise ValueError(f"tool_choice: {err}") from None
        return self

    def parsed_tools(self) -> tuple[list[Tool], str]:
        tools = parse_tools(self.tools)
        return tools, parse_tool_choice(self.tool_choice, tools)
