"""JSON mode (`response_format: {"type": "json_object"}`): the output is one JSON object.

`JsonState` is a pushdown automaton over characters: `feed(state, text)` returns the state after
`text`, or None when no JSON object starts with what was fed. The sampler walks each guided row's
candidates best first (for a sampled row, the exponential race's order, so the pick is a true
sample of the distribution restricted to valid tokens) and takes the first one this accepts; stop
tokens are valid only once the object is closed. Pure functions on a frozen state: trying a
candidate costs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

WHITESPACE = " \t\n\r"
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
HEX = "0123456789abcdefABCDEF"
ESCAPES = '"\\/bfnrtu'
DIGITS = "0123456789"
# Number states: those from which the number may end (the next character then closes it).
NUMBER_ENDS = {"zero", "int", "frac", "exp"}


@dataclass(frozen=True)
class JsonState:
    mode: str = "start"  # start | value | key_or_end | key | colon | value_or_end | after | string | escape
    #                      | unicode | literal | minus | zero | int | frac0 | frac | exp0 | expsign | exp | done
    stack: str = ""  # open containers, innermost last: "{" or "["
    pending: str = ""  # literal: its characters still due; unicode: one "x" per hex digit still due
    in_key: bool = False  # the string being read is an object key

    @property
    def complete(self) -> bool:
        return self.mode == "done"


START = JsonState()


def feed(state: JsonState | None, text: str) -> JsonState | None:
    for char in text:
        if state is None:
            return None
        state = _step(state, char)
    return state


def _step(s: JsonState, c: str) -> JsonState | None:
    mode = s.mode
    if mode == "string":
        if c == '"':
            return replace(s, mode="colon" if s.in_key else "after", in_key=False)
        if c == "\\":
            return replace(s, mode="escape")
        return s if c >= " " else None  # control characters must be escaped
    if mode == "escape":
        if c not in ESCAPES:
            return None
        return replace(s, mode="unicode", pending="xxxx") if c == "u" else replace(s, mode="string")
    if mode == "unicode":
        if c not in HEX:
            return None
        rest = s.pending[1:]
        return replace(s, mode="unicode" if rest else "string", pending=rest)
    if mode == "literal":
        if c != s.pending[0]:
            return None
        rest = s.pending[1:]
        return replace(s, mode="literal" if rest else "after", pending=rest)
    if mode in ("minus", "zero", "int", "frac0", "frac", "exp0", "expsign", "exp"):
        number = _number(mode, c)
        if number is not None:
            return replace(s, mode=number)
        if mode not in NUMBER_ENDS:
            return None
        return _step(replace(s, mode="after"), c)  # the number ended: this character comes after it
    if c in WHITESPACE:
        return s
    if mode == "start":
        return replace(s, mode="key_or_end", stack="{") if c == "{" else None
    if mode == "done":
        return None
    if mode in ("key_or_end", "key"):
        if c == '"':
            return replace(s, mode="string", in_key=True)
        return _close(s, c) if mode == "key_or_end" and c == "}" else None
    if mode == "colon":
        return replace(s, mode="value") if c == ":" else None
    if mode == "value_or_end" and c == "]":
        return _close(s, c)
    if mode in ("value", "value_or_end"):
        return _value(s, c)
    if mode == "after":
        if c == ",":
            return replace(s, mode="key" if s.stack[-1] == "{" else "value")
        return _close(s, c) if c in "}]" else None
    return None


def _value(s: JsonState, c: str) -> JsonState | None:
    if c == "{":
        return replace(s, mode="key_or_end", stack=s.stack + "{")
    if c == "[":
        return replace(s, mode="value_or_end", stack=s.stack + "[")
    if c == '"':
        return replace(s, mode="string", in_key=False)
    if c in LITERALS:
        return replace(s, mode="literal", pending=LITERALS[c])
    if c == "-":
        return replace(s, mode="minus")
    if c in DIGITS:
        return replace(s, mode="zero" if c == "0" else "int")
    return None


def _close(s: JsonState, c: str) -> JsonState | None:
    if not s.stack or s.stack[-1] != {"}": "{", "]": "["}[c]:
        return None
    stack = s.stack[:-1]
    return replace(s, mode="after" if stack else "done", stack=stack)


def _number(mode: str, c: str) -> str | None:
    """The number state after `c`, or None when `c` is not part of the number."""
    if c in DIGITS:
        return {"minus": "zero" if c == "0" else "int", "int": "int", "frac0": "frac", "frac": "frac",
                "exp0": "exp", "expsign": "exp", "exp": "exp"}.get(mode)
    if c == "." and mode in ("zero", "int"):
        return "frac0"
    if c in "eE" and mode in ("zero", "int", "frac"):
        return "exp0"
    if c in "+-" and mode == "exp0":
        return "expsign"
    return None


def token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """Each token id's text on its own ("" for ids past the tokenizer: padding rows of the embedding)."""
    known = len(tokenizer)
    return [tokenizer.decode([i]) if i < known else "" for i in range(vocab_size)]
