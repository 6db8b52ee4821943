"""A small Qwen2-style byte-level BPE tokenizer carrying InternVL's special tokens, written as slow files.

Real InternVL tokenizers cannot be downloaded here, so tiny test models, the same-size random model and the demo
model use this one. It has Qwen2's pre-tokenizer, normalizer and decoder and ships only vocab.json, merges.txt
and added_tokens.json, as the original InternVL2.5 checkpoints do, so the slow-to-fast conversion path is the
one exercised.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from vl_export.runtime.prompt import DEFAULT_SYSTEM_MESSAGE

QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# In InternVL2.5-1B's order: Qwen2.5's three chat tokens first, InternVL's image and grounding tokens last.
LEADING_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
INTERNVL_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

DEFAULT_CORPUS = (
    DEFAULT_SYSTEM_MESSAGE,
    "Please describe the image shortly. What is in the image? Describe the two images in detail.",
    "What colour is the shape? How many circles are there? Where is the square? Which digit is drawn?",
    "The image shows a red circle, a green square, a blue triangle and a yellow star on a white background.",
    "There are three objects. The square is at the top left, the circle at the bottom right, the digit 7 in the middle.",
    "Image-1: Image-2: Frame1: Frame2: Frame3: Answer with a single word. yes no left right top bottom centre",
    "red green blue yellow purple orange black white grey pink brown cyan one two three four five six seven eight nine",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14 , . ! ? : ; ' \" ( ) [ ] { } - _ / \\ @ # $ % & * + = < >",
    "你好，世界。这是一张图片。请描述这张图片。图中有什么？",
    "The quick brown fox jumps over the lazy dog. I'm sure it's fine; we'll see, they've gone, you're right.",
)


def train(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 512):
    """A byte-level BPE trained on `corpus`, with Qwen2's normalizer, pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return tokenizer


def _added_tokens_decoder(tokens: dict[str, int]) -> dict[str, dict]:
    """tokenizer_config.json's added_tokens_decoder: every token special, matched as written."""
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {str(i): {"content": t, **flags} for t, i in tokens.items()}


def write_slow_files(
    out_dir: Path,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    first_special_id: int | None = None,
) -> dict[str, int]:
    """Write vocab.json, merges.txt, added_tokens.json and tokenizer_config.json; return the special ids.

    `first_special_id` pads the vocabulary with unreachable entries so that `<|endoftext|>` lands there
    (151643 for a same-size InternVL2.5-1B).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = json.loads(train(corpus, vocab_size).to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    first = first_special_id if first_special_id is not None else len(vocab)
    for i in range(len(vocab), first):
        vocab[f"<unused_{i}>"] = i
    specials = list(LEADING_SPECIALS)
    if first_special_id is not None:  # Qwen2.5 holds 19 more special tokens between <|im_end|> and <img>
        specials += [f"<|reserved_special_{i}|>" for i in range(19)]
    specials += INTERNVL_SPECIALS
    added = {token: first + i for i, token in enumerate(specials)}

    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out_dir / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False, indent=2))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 8192,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "added_tokens_decoder": _added_tokens_decoder(added),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return added


# InternLM2's chat tokens are pieces of its sentencepiece model ([UNUSED_TOKEN_141..146] at 92538..92543 in
# InternLM2.5), renamed by tokenizer_config.json; InternVL's tokens follow the 92544 pieces.
INTERNLM2_CHAT_SPECIALS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")


def write_internlm2_files(out_dir: Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 600,
                          num_pieces: int | None = None) -> dict[str, int]:
    """An InternLM2-style tokenizer: tokenizer.model (sentencepiece BPE with byte fallback, identity normalisation)
    and tokenizer_config.json naming InternLM2Tokenizer with InternVL's added tokens; returns the special ids.

    `num_pieces` pads the model with unused pieces so that the chat tokens land where InternLM2.5 has them
    (92544 pieces for a same-size InternVL2.5-2B)."""
    import io

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    out_dir.mkdir(parents=True, exist_ok=True)
    stream = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 4), model_writer=stream, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(stream.getvalue())
    chat_at = (num_pieces or len(proto.pieces) + len(INTERNLM2_CHAT_SPECIALS)) - len(INTERNLM2_CHAT_SPECIALS)
    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    for i in range(len(proto.pieces), chat_at):
        proto.pieces.append(Piece(piece=f"<unused_{i}>", score=0.0, type=Piece.UNUSED))
    for n in range(len(INTERNLM2_CHAT_SPECIALS)):
        proto.pieces.append(Piece(piece=f"[UNUSED_TOKEN_{141 + n}]", score=0.0, type=Piece.USER_DEFINED))
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    specials.update({t: chat_at + i for i, t in enumerate(INTERNLM2_CHAT_SPECIALS)})
    specials.update({t: len(proto.pieces) + i for i, t in enumerate(INTERNVL_SPECIALS)})
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "model_max_length": 8192,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": _added_tokens_decoder(specials),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return specials
