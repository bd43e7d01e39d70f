"""Logprobs as OpenAI reports them, with each token's true bytes.

A byte-level BPE token (GPT-2, Llama 3, SmolLM2) may hold part of a character: decoding it alone
gives U+FFFD, so its text cannot rebuild "🎉". Its vocabulary string maps back, character by
character, to the bytes it stands for (GPT-2's byte-to-unicode table); SentencePiece byte-fallback
tokens (`<0xF0>`) and `▁` spell theirs out. A token whose bytes are not whole UTF-8 shows as
"bytes:\\xf0\\x9f" (OpenAI's spelling), so no two tokens of a step share a name.
"""

from __future__ import annotations

import codecs
import re
from functools import lru_cache
from typing import Any

from kvpilot.runtime.engine.sequence import TokenLogprob

SENTENCEPIECE_SPACE = "\u2581"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
TOKEN_CACHE_SIZE = 1 << 16


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable characters standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """Each token id's bytes and display name, for one tokenizer (cached: logprobs ask per token)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.bytes_of = lru_cache(maxsize=TOKEN_CACHE_SIZE)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.special or not isinstance(piece, str):
            return self.tokenizer.decode([token_id]).encode()
        table = _unicode_to_byte()
        if all(ch in table for ch in piece):  # byte-level BPE
            return bytes(table[ch] for ch in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:  # SentencePiece byte fallback
            return bytes([int(fallback.group(1), 16)])
        if SENTENCEPIECE_SPACE in piece:
            return piece.replace(SENTENCEPIECE_SPACE, " ").encode()
        return self.tokenizer.decode([token_id]).encode()

    def name(self, token_id: int) -> str:
        raw = self.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def chat_logprobs(entries: list[TokenLogprob], names: TokenBytes) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        return {"token": names.name(token_id), "logprob": logprob, "bytes": list(names.bytes_of(token_id))}

    return {"content": [one(e.token_id, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprob | None], names: TokenBytes,
                        start_offset: int = 0) -> dict:
    """`entries[i]` None: a prompt token with no logprob (the first of an echoed prompt). `text_offset`
    counts characters, as indices into the returned text: the whole characters before each token,
    from `start_offset` (a character split over tokens starts where its last byte arrives)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    chars, decoder = start_offset, codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token_id, entry in zip(token_ids, entries, strict=True):
        offsets.append(chars)
        chars += len(decoder.decode(names.bytes_of(token_id)))
        tokens.append(names.name(token_id))
        token_logprobs.append(None if entry is None else entry.logprob)
        if entry is None:
            top_logprobs.append(None)
            continue
        top: dict[str, float] = {}
        for tid, lp in entry.top:
            key = names.name(tid)
            top[key if key not in top else f"token_id:{tid}"] = lp
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def vllm_prompt_logprobs(token_ids: list[int], entries: list[TokenLogprob | None], names: TokenBytes) -> list:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the token itself and the top n."""
    out: list[dict | None] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            out.append(None)
            continue
        ranked = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": names.name(t)}
                  for r, (t, lp) in enumerate(entry.top)}
        ranked.setdefault(str(token_id), {"logprob": entry.logprob, "rank": entry.rank,
                                          "decoded_token": names.name(token_id)})
        out.append(ranked)
    return out
