"""The model's tool-call text back into OpenAI tool calls, piece by piece as the text streams.

`ToolCallParser.feed(text)` takes the next piece of the answer and returns what it adds: content
text and `delta.tool_calls` entries (the first for a call carries its id and name, the next ones
pieces of its arguments, exactly as generated). A whole answer is the same parser fed once, so a
streamed and a non-streamed answer cannot disagree. Text that might still turn into a call's
opening tag is held back until it is known not to.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from kvpilot.runtime.engine.sampling import StructuredOutputs
from kvpilot.runtime.server.tools import Tool, ToolFormat, ToolRequest, tool_format, tool_grammar

STRING = r'"((?:[^"\\]|\\.)*)"'


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _ValueScanner:
    """Where a JSON value ends, one character at a time (strings and escapes respected)."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False

    def feed(self, char: str) -> bool:
        """True when `char` closes the value."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                return self.depth == 0
            return False
        if char in " \t\r\n" and not self.started:
            return False
        self.started = True
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


@dataclass
class ToolCallParser:
    fmt: ToolFormat
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""  # content text handed out so far
    _buffer: str = ""  # the whole answer so far
    _pos: int = 0  # characters of _buffer consumed
    _state: str = "text"  # text | head | args | tail
    _scanner: _ValueScanner = field(default_factory=_ValueScanner)
    _held_space: str = ""  # whitespace after a call: content only if more text follows it

    def __post_init__(self) -> None:
        args = re.escape(json.dumps(self.fmt.args_key))
        self._head_re = re.compile(r'\s*\{\s*"name"\s*:\s*' + STRING + r"\s*,\s*" + args + r"\s*:\s*")
        self._tail_re = re.compile(r"\s*\}" + (r"\s*" + re.escape(self.fmt.close.strip()) if self.fmt.close else ""))
        self._open = self.fmt.open.strip()

    def feed(self, text: str, finished: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """The content and tool-call deltas that `text` (the answer's next piece) completes."""
        self._buffer += text
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        step = {"text": self._on_text, "head": self._on_head, "args": self._on_args, "tail": self._on_tail}
        while True:
            before = (self._state, self._pos)
            step[self._state](content, deltas, finished)
            if (self._state, self._pos) == before:
                break
        if finished and self._state == "head":  # an opening tag and no call after it: it was text
            self._emit_content(content, self._buffer[self._call_start:])
        if finished:
            self._pos = len(self._buffer)
        piece = "".join(content)
        self.content += piece
        return piece, deltas

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Whatever was held back, once the answer is complete."""
        return self.feed("", finished=True)

    def _emit_content(self, content: list[str], text: str) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            self._held_space += text
            return
        content.append(self._held_space + text)
        self._held_space = ""

    def _opening(self, rest: str) -> int:
        """Where the next call opens in the unread text (at its first character), or -1."""
        if self._open:
            return rest.find(self._open)
        # Llama JSON: calls only at the very start of the answer, or right after another call
        stripped = rest.lstrip()
        if not self.content.strip() and stripped.startswith("{"):
            return len(rest) - len(stripped)
        return -1

    def _held_back(self, rest: str) -> int:
        """How many trailing characters of `rest` could still become a call's opening."""
        if not self._open:
            return len(rest) if not rest.strip() and not self.content.strip() else 0
        for n in range(min(len(self._open) - 1, len(rest)), 0, -1):
            if self._open.startswith(rest[-n:]):
                return n
        return 0

    def _on_text(self, content: list[str], deltas: list, finished: bool) -> None:
        rest = self._buffer[self._pos:]
        at = self._opening(rest)
        if at >= 0:
            self._emit_content(content, rest[:at])
            self._call_start = self._pos + at
            self._pos += at + len(self._open)
            self._state = "head"
            return
        keep = 0 if finished else self._held_back(rest)
        self._emit_content(content, rest[: len(rest) - keep])
        self._pos += len(rest) - keep

    def _on_head(self, content: list[str], deltas: list, finished: bool) -> None:
        match = self._head_re.match(self._buffer, self._pos)
        if match is None or match.end() == len(self._buffer):  # whitespace may still come before the arguments
            return
        call = ToolCall(_call_id(), json.loads(f'"{match.group(1)}"'))
        self.calls.append(call)
        deltas.append({"index": len(self.calls) - 1, "id": call.id, "type": "function",
                       "function": {"name": call.name, "arguments": ""}})
        self._pos, self._state, self._scanner = match.end(), "args", _ValueScanner()

    def _on_args(self, content: list[str], deltas: list, finished: bool) -> None:
        rest = self._buffer[self._pos:]
        end = len(rest)
        for i, char in enumerate(rest):
            if self._scanner.feed(char):
                end, self._state = i + 1, "tail"
                break
        piece = rest[:end]
        if piece:
            self.calls[-1].arguments += piece
            deltas.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
            self._pos += end

    def _on_tail(self, content: list[str], deltas: list, finished: bool) -> None:
        match = self._tail_re.match(self._buffer, self._pos)
        if match is None:
            return
        after, separator = match.end(), self.fmt.separator.strip()
        if separator:  # Llama JSON: '; ' and the next call; wait until it is known whether one comes
            rest = self._buffer[after:]
            if not rest.strip() and not finished:
                return
            more = re.match(r"\s*" + re.escape(separator), rest)
            after += more.end() if more else 0
        self._pos, self._state = after, "text"


@dataclass
class ChatTools:
    """One chat request's tool calling: what the prompt shows, what the grammar holds, how the answer parses."""

    tools: list[Tool]  # shown to the model (none when tool_choice is 'none')
    choice: str
    fmt: ToolFormat
    structured: StructuredOutputs | None  # the request's output constraint: the tools' grammar or its own
    _parsers: dict[int, ToolCallParser] = field(default_factory=dict)

    @staticmethod
    def none() -> ChatTools:
        """No tools: the answer is content only."""
        return ChatTools([], "none", tool_format(None), None)

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a whole answer, and its finish reason ('tool_calls' when it called)."""
        if not self.tools:
            return {"role": "assistant", "content": text}, finish_reason
        parser = ToolCallParser(self.fmt)
        parser.feed(text, finished=True)
        if not parser.calls:
            return {"role": "assistant", "content": parser.content}, finish_reason
        message = {"role": "assistant", "content": parser.content if parser.content.strip() else None,
                   "tool_calls": [c.message() for c in parser.calls]}
        return message, "tool_calls" if finish_reason == "stop" else finish_reason

    def delta(self, index: int, new_text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The stream's delta for choice `index`'s next piece of text, and its finish reason."""
        if not self.tools:
            return ({"content": new_text} if new_text else {}), finish_reason
        parser = self._parsers.setdefault(index, ToolCallParser(self.fmt))
        content, calls = parser.feed(new_text, finished=finish_reason is not None)
        delta: dict[str, Any] = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = calls
        if parser.calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return delta, finish_reason


def chat_tools(request: ToolRequest, structured: StructuredOutputs | None, chat_template: str | None) -> ChatTools:
    """The tool calling of one request; ValueError when tool_choice and another constraint collide."""
    tools, choice = request.parsed_tools()
    fmt = tool_format(chat_template)
    grammar = tool_grammar(tools, choice, request.parallel_tool_calls, fmt)
    if structured is not None and choice not in ("none", "auto"):
        raise ValueError(f"tool_choice {choice!r} makes the answer tool calls: it cannot also follow "
                         "response_format or a guided_* constraint")
    shown = [] if choice == "none" else tools
    return ChatTools(shown, choice, fmt, structured if structured is not None else grammar)
