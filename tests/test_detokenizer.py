"""Incremental detokenization and stop strings, on the real tokenizer."""

import pytest
from transformers import AutoTokenizer

from chatserver.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "Hello, world! Ça va? 日本語のテキスト — with emoji 🙂🚀 and ünïcödé.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "数学: ∑ x² = ∞ 🧪",
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode_and_never_breaks_characters(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_not_emitted(tokenizer):
    ids = tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add([i]) for i in ids) == "Paris."


def test_stop_string_split_across_deltas_is_cut_and_never_shown():
    m = StopStringMatcher(("END",))
    shown = []
    for piece in ["Hello E", "N", "D and more"]:
        text, hit = m.feed(piece)
        shown.append(text)
        if hit:
            break
    assert "".join(shown) == "Hello " and hit


def test_false_start_of_stop_string_is_released():
    m = StopStringMatcher(("STOP",))
    out = [m.feed("ST")[0], m.feed("ART here")[0]]
    assert "".join(out) + m.flush() == "START here"


def test_no_stops_passes_through():
    m = StopStringMatcher(())
    assert m.feed("abc") == ("abc", False)
