"""InternLM2's tokenizer (a sentencepiece BPE model with byte fallback, plus InternVL's added tokens) as a
`tokenizers.Tokenizer`, and the slow tokenizer's behaviour rebuilt on the `sentencepiece` package to prove it.

The checkpoint ships `tokenizer.model` and a `tokenizer_config.json` naming `InternLM2Tokenizer` (remote code,
never run here). That class splits the text on its added tokens, encodes every other stretch with
`sp_model.encode`, and puts `<s>` first (add_bos_token, default true; InternVL's chat() keeps it). The
conversion follows InternLM2's own InternLM2Converter: the sentencepiece pieces become a BPE vocabulary (merges
recovered from the pieces' ranks), the added tokens take their ids' names, the normalizer prepends '▁' when the
model adds a dummy prefix and turns spaces into '▁', and unknown characters fall back to byte pieces.
Only what this conversion reproduces is accepted (identity normalisation, BPE, byte fallback); the rest is
refused, and whatever is accepted is proven token-for-token by `tokenizer.prove_same_ids`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from vl_export.errors import CheckpointError, UnsupportedConfigError

SPM_FILE = "tokenizer.model"
SPM_TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
BPE = 2  # sentencepiece's ModelType
UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 2, 3, 4, 5, 6  # sentencepiece's SentencePiece.Type


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool
    lstrip: bool = False
    rstrip: bool = False


def is_spm_checkpoint(path: Path) -> bool:
    """A checkpoint whose tokenizer is InternLM2's sentencepiece one (and not already a tokenizer.json)."""
    config = _tokenizer_config(path)
    return (path / SPM_FILE).is_file() and config.get("tokenizer_class") in SPM_TOKENIZER_CLASSES


def _tokenizer_config(path: Path) -> dict:
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from None


def _proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString((path / SPM_FILE).read_bytes())
    except Exception as exc:
        raise CheckpointError(f"cannot read {path / SPM_FILE} as a sentencepiece model: {exc}") from None
    return proto


def _check_supported(proto, path: Path) -> None:
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != BPE:
        problems.append(f"model type {trainer.model_type} (only BPE)")
    if not trainer.byte_fallback:
        problems.append("no byte fallback")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap or norm.normalization_rule_tsv:
        problems.append(f"normalisation {norm.name!r} (only identity)")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not norm.escape_whitespaces:
        problems.append("whitespace not escaped as '▁'")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if problems:
        raise UnsupportedConfigError(f"unsupported sentencepiece tokenizer {path / SPM_FILE}: {'; '.join(problems)}")


def added_tokens(path: Path, num_pieces: int) -> list[AddedToken]:
    """The tokenizer's added tokens (tokenizer_config.json's added_tokens_decoder, plus added_tokens.json)."""
    config = _tokenizer_config(path)
    found: dict[int, AddedToken] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        found[int(key)] = AddedToken(entry["content"], int(key), bool(entry.get("special", True)),
                                     bool(entry.get("lstrip", False)), bool(entry.get("rstrip", False)))
    if (path / "added_tokens.json").is_file():
        for content, token_id in json.loads((path / "added_tokens.json").read_text()).items():
            found.setdefault(int(token_id), AddedToken(content, int(token_id), True))
    ids = sorted(found)
    beyond = [i for i in ids if i >= num_pieces]
    if beyond and beyond != list(range(num_pieces, num_pieces + len(beyond))):
        raise CheckpointError(f"added token ids {beyond} leave gaps after the {num_pieces} sentencepiece pieces")
    return [found[i] for i in ids]


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE vocabulary: every split of a piece into two pieces, ordered by the rank
    of the piece they make (sentencepiece merges the best-scoring pair first; pieces are stored by score)."""
    found = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((rank, vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def convert(path: Path):
    """The checkpoint's tokenizer.model + added tokens as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken as HfAddedToken
    from tokenizers import Tokenizer, decoders, models, normalizers

    proto = _proto(path)
    _check_supported(proto, path)
    pieces = [p.piece for p in proto.pieces]
    added = added_tokens(path, len(pieces))
    names = list(pieces)
    for token in added:  # InternLM2 renames some of its own pieces (e.g. [UNUSED_TOKEN_146] -> <|im_start|>)
        if token.id < len(names):
            names[token.id] = token.content
    # Byte pieces and unused ones never come out of a merge; user-defined pieces are matched whole, as added tokens.
    vocab = {name: i for i, name in enumerate(names)}
    mergeable = {names[i]: i for i, p in enumerate(proto.pieces) if p.type not in (BYTE, UNUSED, USER_DEFINED, UNKNOWN, CONTROL)}
    merges = _merges(mergeable)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=pieces[proto.trainer_spec.unk_id], fuse_unk=True,
                                     byte_fallback=True))
    steps = []
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if proto.normalizer_spec.add_dummy_prefix else [])
    )
    user_defined = [AddedToken(p.piece, i, False) for i, p in enumerate(proto.pieces)
                    if p.type == USER_DEFINED and i not in {t.id for t in added}]
    for token in added + user_defined:
        if token.id >= len(names):
            names.append(token.content)
        tokenizer.add_tokens([HfAddedToken(token.content, special=token.special, normalized=False,
                                           lstrip=token.lstrip, rstrip=token.rstrip, single_word=False)])
        if tokenizer.token_to_id(token.content) != token.id:
            raise CheckpointError(f"added token {token.content!r} landed on id {tokenizer.token_to_id(token.content)}, "
                                  f"the checkpoint says {token.id}")
    return tokenizer


class SentencePieceReference:
    """The slow InternLM2Tokenizer's encoding, on the `sentencepiece` package: the duck type `prove_same_ids`
    and the verify reference use (encode, added_tokens_decoder, convert_tokens_to_ids)."""

    def __init__(self, path: Path):
        import sentencepiece

        _check_supported(_proto(path), path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / SPM_FILE))
        self.added = added_tokens(path, self.sp.get_piece_size())
        self.added_tokens_decoder = {t.id: t.content for t in self.added}
        self.add_bos = bool(_tokenizer_config(path).get("add_bos_token", True))
        longest_first = sorted((t.content for t in self.added), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
        self._ids = {t.content: t.id for t in self.added}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        if token in self._ids:
            return self._ids[token]
        piece_id = self.sp.piece_to_id(token)
        return None if piece_id == self.sp.unk_id() and token != self.sp.id_to_piece(piece_id) else piece_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.sp.bos_id()] if add_special_tokens and self.add_bos else []
        for chunk in self._split.split(text) if self._split else [text]:
            if chunk in self._ids:
                ids.append(self._ids[chunk])
            elif chunk:
                ids += self.sp.encode(chunk)
        return ids
