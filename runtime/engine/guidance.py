"""Structured output on llguidance: every guided sequence carries an `LLMatcher`; each step the
matchers of the batch fill one token bitmask together (in llguidance's threads), the sampler masks
the logits with it before greedy or sampled picks, and each matcher then consumes its row's token.

Grammars are compiled once per spec (an LRU of matchers, each request gets a deep copy). The
llguidance tokenizer (about a second to build from the HF one, several on a busy machine) is made
with the engine, at start-up: built on the first guided request, it stalled the step thread and every
request running in it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence as Seq
from typing import Any

import llguidance
import llguidance.hf
import torch
from llguidance import LLMatcher
from llguidance.torch import fill_next_token_bitmask_par

from kvpilot.runtime.engine.sampling import StructuredOutputs

logger = logging.getLogger("kvpilot.runtime.engine.guidance")
COMPILED_CACHE_SIZE = 256  # distinct schemas kept compiled; a server sees a handful again and again
# Compact JSON with a space after ',' and ':', as the model writes it: flexible whitespace lets a small
# model pad an answer with newlines until max_tokens instead of closing it.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled; the message names the problem."""


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar for one spec (no tokenizer needed)."""
    if spec.json is not None or spec.json_object:
        schema = spec.json if spec.json is not None else ANY_OBJECT_SCHEMA
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults={**JSON_OPTIONS, "lenient": spec.lenient})
        except ValueError as err:
            raise GrammarError(f"the JSON schema is not a JSON object: {err}") from None
    if spec.regex is not None:
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    try:
        return llguidance.grammar_from("grammar", spec.grammar or "")
    except ValueError as err:
        raise GrammarError(str(err)) from None


def check(spec: StructuredOutputs) -> None:
    """Raise `GrammarError` naming what is wrong with a spec's schema, regex or grammar."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar_text(spec))
    if is_error:
        raise GrammarError(_first_lines(messages[0]))


def _first_lines(error: str, limit: int = 6) -> str:
    return "\n".join(error.strip().splitlines()[:limit])


class Guidance:
    """One engine's grammar engine: its tokenizer view, compiled grammars, and the batch bitmask."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Seq[int]) -> None:
        self.vocab_size = vocab_size
        started = time.perf_counter()
        self.tokenizer: llguidance.LLTokenizer | None = None
        self.unavailable = ""  # why structured output cannot run with this tokenizer, when it cannot
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                          eos_token=list(eos_token_ids))
            logger.info("grammar tokenizer ready in %.1f s", time.perf_counter() - started)
        except ValueError as err:  # llguidance reads HF fast tokenizers only
            self.unavailable = f"structured output is not available for this model's tokenizer ({err})"
            logger.warning("%s", self.unavailable)
        self._compiled: OrderedDict[StructuredOutputs, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # the server thread compiles (admission) while the step thread masks
        self._executor = llguidance.LLExecutor()

    def matcher(self, spec: StructuredOutputs) -> LLMatcher:
        """A fresh matcher for one request; `GrammarError` if the spec does not compile."""
        if self.tokenizer is None:
            raise GrammarError(self.unavailable)
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is None:
                compiled = LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
                if compiled.is_error():
                    raise GrammarError(_first_lines(compiled.get_error()))
                self._compiled[spec] = compiled
                if len(self._compiled) > COMPILED_CACHE_SIZE:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(spec)
            return compiled.deep_copy()

    def bitmask(self, matchers: Seq[LLMatcher]) -> torch.Tensor:
        """Allowed next tokens of each matcher: int32 [len(matchers), ceil(vocab / 32)], one bit per token."""
        mask = torch.zeros((len(matchers), (self.vocab_size + 31) // 32), dtype=torch.int32)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], mask)
        return mask


def apply_bitmask(logits: torch.Tensor, rows: Seq[int], bitmask: torch.Tensor) -> None:
    """Set to -inf, in place, every token of `logits[rows]` whose bit is 0."""
    vocab = logits.shape[1]
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().view(len(rows), -1)[:, :vocab]
    index = torch.tensor(list(rows), device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
