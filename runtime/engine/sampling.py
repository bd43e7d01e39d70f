"""Per-request sampling parameters, named as in vLLM so OpenAI / vLLM requests map one to one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GREEDY_EPSILON = 1e-5  # temperatures below this are greedy: dividing by them overflows the logits
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed


@dataclass(frozen=True)
class StructuredOutputs:
    """What the output must match, as vLLM's `structured_outputs` names it: exactly one of a JSON schema
    (serialized), any JSON object, a regex, a list of choices, or a grammar (Lark or GBNF)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    lenient: bool = False  # json: schema keywords the grammar engine does not implement are ignored, not refused

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured outputs need exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.choice is not None and not self.choice:
            raise ValueError("structured outputs: choice must list at least one string")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, vLLM's spelling) keeps every token
    min_p: float = 0.0
    seed: int | None = None  # set: this request's samples repeat exactly, whatever else is batched with it
    stop: list[str] | str | None = None  # stop strings; the text returned never includes them
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop tokens and stop strings are ignored before this many tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: none; n: the sampled token's logprob and the top n
    structured: StructuredOutputs | None = None  # the output follows a grammar (engine/guidance.py)
    include_stop_str_in_output: bool = False  # vLLM's extra: keep the stop string (or stop token) in the text
    prompt_logprobs: int | None = None  # vLLM's extra: each prompt token's logprob and the top n (no prefix cache)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.top_k == -1:
            self.top_k = 0
        checks = (
            ("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1"),
            ("temperature", self.temperature, self.temperature >= 0.0, ">= 0"),
            ("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0, or -1 for every token"),
            ("min_p", self.min_p, 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("min_tokens", self.min_tokens, 0 <= self.min_tokens <= self.max_tokens,
             f"in [0, max_tokens={self.max_tokens}]"),
            ("presence_penalty", self.presence_penalty, -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", self.frequency_penalty, -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0.0, "> 0"),
        )
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"sampling parameter {name} must be {allowed}, got {value!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"sampling parameter logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"sampling parameter seed must be in [0, 2**64 - 1], got {self.seed!r}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"sampling parameter prompt_logprobs must be in [0, {MAX_LOGPROBS}], "
                             f"got {self.prompt_logprobs!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"sampling parameter stop_token_ids must be token ids >= 0, got {self.stop_token_ids}")

    def for_vocab(self, vocab_size: int) -> SamplingParams:
        """These parameters for a model of `vocab_size` tokens: ValueError naming token ids outside it;
        a top_k of the whole vocabulary or more keeps every token (0), as it means."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"sampling parameter stop_token_ids: ids {bad[:5]} are outside the vocabulary "
                             f"0..{vocab_size - 1}")
        if self.top_k >= vocab_size:
            return dataclasses.replace(self, top_k=0)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def truncates(self) -> bool:
        """Whether top-k / top-p cut the distribution (they need the logits sorted)."""
        return self.top_k > 0 or self.top_p < 1.0
