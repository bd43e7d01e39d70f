"""Request checks that the field types alone cannot say: every value a request carries is refused
here, with a 400 naming it, or is safe for the engine step that samples it together with others.

Kept apart from protocol.py (the fields) so that each check reads on its own and is tested alone."""

from __future__ import annotations

from typing import Any

from kvpilot.runtime.engine.sampling import MAX_SEED

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_CHOICES = 128  # prompts x n in one completions request: each is an engine request


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a decoded JSON body a string holds a lone surrogate ("a\\ud800b" is valid JSON but not
    valid Unicode: no tokenizer can encode it, no response can carry it); None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and lone_surrogate_path(key) is not None:
            return path or "body"
        found = lone_surrogate_path(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def refuse_lone_surrogates(data: Any) -> Any:
    found = lone_surrogate_path(data)
    if found is not None:
        raise ValueError(f"{found}: the text holds a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode")
    return data


def check_seed(seed: int | None, n: int) -> None:
    """Choice i samples with seed + i: the last one must be a seed too."""
    if seed is not None and seed + n - 1 > MAX_SEED:
        raise ValueError(f"seed: {seed} + n - 1 = {seed + n - 1} exceeds 2**64 - 1, the largest seed "
                         "(choice i samples with seed + i)")


def check_min_tokens(min_tokens: int, max_tokens: int | None, name: str = "max_tokens") -> None:
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens: {min_tokens} is more than {name} ({max_tokens})")


def check_stream_options(stream: bool, stream_options: Any) -> None:
    if stream_options is not None and not stream:
        raise ValueError("stream_options: only allowed when stream is true")


def check_batch(num_prompts: int, n: int) -> None:
    if num_prompts * n > MAX_CHOICES:
        raise ValueError(f"prompt: {num_prompts} prompts x n={n} = {num_prompts * n} choices; at most "
                         f"{MAX_CHOICES} in one request")
