"""The bundle's tokenizer.json gives the ids of an independent byte-level BPE read from the slow files."""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache

import pytest
import regex
from tokenizers import Tokenizer

from vl_export.errors import CheckpointError
from vl_export.export.tokenizer import PROOF_CORPUS, prove_same_ids

QWEN2_SPLIT = regex.compile(
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class SlowBPE:
    """The Qwen2 slow tokenizer's algorithm: split out added tokens, NFC, regex pre-split, byte-level BPE."""

    def __init__(self, directory):
        self.vocab = json.loads((directory / "vocab.json").read_text())
        merges = (directory / "merges.txt").read_text().splitlines()
        self.ranks = {tuple(m.split()): i for i, m in enumerate(l for l in merges if l and not l.startswith("#version"))}
        self.added = json.loads((directory / "added_tokens.json").read_text())
        self.byte_map = bytes_to_unicode()
        specials = sorted(self.added, key=len, reverse=True)
        self.special_split = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")

    @lru_cache(maxsize=None)
    def bpe(self, word: str) -> tuple[str, ...]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # merge every occurrence of the pair, left to right
                if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        ids = []
        for chunk in self.special_split.split(text):
            if chunk in self.added:
                ids.append(self.added[chunk])
                continue
            for piece in QWEN2_SPLIT.findall(unicodedata.normalize("NFC", chunk)):
                word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
                ids += [self.vocab[t] for t in self.bpe(word)]
        return ids


def test_converted_tokenizer_matches_an_independent_bpe(tiny, bundle_fp32):
    ours = Tokenizer.from_file(str(bundle_fp32 / "tokenizer.json"))
    reference = SlowBPE(tiny["original"])
    corpus = list(PROOF_CORPUS) + list(reference.added) + [
        "".join(reference.added), "What colour is the  circle?\n\n", "x<IMG_CONTEXT>y<|im_end|>z", "a\u0301 e\u0301",
    ]
    for text in corpus:
        assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text), text
    ids = ours.encode("<img><IMG_CONTEXT></img>", add_special_tokens=False).ids
    assert ids == [tiny["specials"][t] for t in ("<img>", "<IMG_CONTEXT>", "</img>")]


def test_native_checkpoint_tokenizer_json_is_copied(tiny, tmp_path):
    from vl_export.export.tokenizer import write_tokenizer

    specials = write_tokenizer(tiny["native"], tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny["native"] / "tokenizer.json").read_bytes()
    assert specials["<IMG_CONTEXT>"] == tiny["specials"]["<IMG_CONTEXT>"]


def test_a_tokenizer_that_splits_differently_is_refused(tiny, tmp_path):
    data = json.loads((tiny["native"] / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][: len(data["model"]["merges"]) // 2]
    broken = tmp_path / "tokenizer.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="disagrees with the checkpoint's"):
        prove_same_ids(broken, tiny["original"])
