"""Streaming text: multi-byte characters arrive whole, stop strings are held back and cut."""

from __future__ import annotations

import pytest

from vl_export.manifest import Manifest
from vl_export.runtime.tokenizer import IncrementalDecoder, TextTokenizer


@pytest.fixture(scope="module")
def tokenizer(bundle_fp32):
    manifest = Manifest.load(bundle_fp32)
    return TextTokenizer(bundle_fp32 / manifest.tokenizer, manifest.special_tokens)


TEXT = "猫は可愛い😀👍🏽 café naïve — 这是一只猫。"


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT)  # the small vocabulary spells these characters byte by byte
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it did stream, not just flush at the end


def test_stop_strings_are_held_back_then_cut(tokenizer):
    ids = tokenizer.encode("The answer is red. STOP here and more")
    decoder = IncrementalDecoder(tokenizer, stop_strings=("STOP",))
    pieces = []
    for i in ids:
        pieces.append(decoder.push(i))
        if decoder.stopped:
            break
    pieces.append(decoder.finish())
    assert decoder.stopped
    assert "".join(pieces) == "The answer is red. "
    assert decoder.final_text == "The answer is red. "
    assert not any("S" in p for p in pieces)  # the partial "S", "ST", ... was never released


def test_special_tokens_are_not_printed(tokenizer):
    ids = tokenizer.encode("Hello<|im_end|>")
    assert ids[-1] == tokenizer.im_end
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.finish() == "Hello"
