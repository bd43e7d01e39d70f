"""Incremental detokenization with the real SmolLM2 tokenizer: the pieces add up to the whole text,
multi-byte characters are never split, and stop strings never reach the stream."""

from __future__ import annotations

import pytest

from kvpilot.runtime.engine.detokenizer import IncrementalDetokenizer

TEXT = "Héllo wörld! Ünïcode ✓ and emoji 🚀🎉 mixed with code: `x = [1, 2]` — done."


def stream(tokenizer, text: str, stop: list[str] = (), prompt: str = "Say:",
           ) -> tuple[str, bool, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), stop)
    pieces, stopped = [], False
    for token_id in tokenizer.encode(text):
        stopped = detok.append(token_id)
        pieces.append(detok.take_delta(finished=stopped))
        if stopped:
            break
    pieces.append(detok.take_delta(finished=True))
    return "".join(pieces), stopped, detok


def test_pieces_add_up_to_the_decoded_text(tokenizer):
    text, stopped, _ = stream(tokenizer, TEXT)
    assert not stopped
    assert text == tokenizer.decode(tokenizer.encode(TEXT), skip_special_tokens=True) == TEXT


def test_no_piece_holds_half_a_character(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"))
    for token_id in tokenizer.encode("🚀🎉"):
        detok.append(token_id)
        assert "\ufffd" not in detok.take_delta(finished=False)
    assert detok.output_text == "🚀🎉"


@pytest.mark.parametrize("stop", ["wörld", "emoji 🚀", "[1, 2]", "done."])
def test_stop_strings_cut_the_text_before_them(tokenizer, stop):
    text, stopped, detok = stream(tokenizer, TEXT, [stop, "never appears"])
    assert stopped and text == TEXT[: TEXT.index(stop)] == detok.output_text


def test_text_that_might_start_a_stop_string_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["Hello there"])
    for token_id in tokenizer.encode("Hi. Hello th"):
        assert not detok.append(token_id)
    # the last len("Hello there") - 1 = 10 characters could still become the stop string
    assert detok.take_delta(finished=False) == "Hi"
    assert detok.take_delta(finished=True) == ". Hello th"


def test_special_tokens_are_not_text(tokenizer):
    text, _, _ = stream(tokenizer, "<|im_end|>plain")
    assert text == "plain"
