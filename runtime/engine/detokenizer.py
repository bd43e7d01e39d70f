"""Incremental detokenization and stop strings.

Each new token is decoded together with a few tokens before it, and only the text that grew is
kept (vLLM's prefix/read offsets): tokenizers merge leading spaces and split multi-byte characters
across tokens, so decoding tokens one by one would garble the text. A piece that ends in U+FFFD is
an incomplete character and waits for the next token.

While stop strings are set, the last `longest stop - 1` characters are held back from the stream:
they might be the start of a stop string, and text already sent cannot be taken back.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Protocol

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first outputs, for the leading space
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Seq[int], stop: Seq[str] = (),
                 include_stop: bool = False) -> None:
        """`include_stop`: the text ends with the stop string found instead of before it (nothing is
        held back then: the text up to a stop string is sent either way)."""
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = list(stop)
        self.include_stop = include_stop
        self.holdback = 0 if include_stop else max((len(s) for s in self.stop), default=1) - 1
        self.output_text = ""
        self.num_emitted_chars = 0

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def append(self, token_id: int, check_stop: bool = True) -> bool:
        """Add one token's text; True when it completed a stop string (the text is cut before it)."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return False
        new_text = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.output_text += new_text
        return check_stop and self._cut_at_stop(len(new_text))

    def _cut_at_stop(self, num_new_chars: int) -> bool:
        """Find a stop string that ends in the new text; keep only what comes before it."""
        found, end = -1, -1
        for stop in self.stop:
            start = max(0, len(self.output_text) - num_new_chars - len(stop) + 1)
            index = self.output_text.find(stop, start)
            if index != -1 and (found == -1 or index < found):
                found, end = index, index + len(stop)
        if found == -1:
            return False
        self.output_text = self.output_text[: end if self.include_stop else found]
        return True

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out, minus what could still turn out to be a stop string."""
        end = len(self.output_text) if finished else max(self.num_emitted_chars, len(self.output_text) - self.holdback)
        delta = self.output_text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return delta
