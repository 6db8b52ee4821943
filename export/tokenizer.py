"""The bundle's tokenizer.json: copied, or converted from the slow files, and proven to match the checkpoint's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vl_export.errors import CheckpointError
from vl_export.runtime.prompt import BOS, DEFAULT_SYSTEM_MESSAGE, END_OF_TEXT, EOS, SPECIAL_TOKENS

from . import spm_tokenizer

# Text that exercises what a BPE port gets wrong: special tokens inside words, CJK, emoji, NFC, contractions,
# whitespace runs and newlines, digits. Every added token of the tokenizer is appended at check time.
PROOF_CORPUS = (
    DEFAULT_SYSTEM_MESSAGE,
    "<|im_start|>system\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\n<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is in the image?",
    "Image-1: <image>\nImage-2: <image>\nFrame1: <image>\nCompare them.",
    "Hello world! I'M here, don't you'LL see? It's 2024-11-27 at 09:28, 3.14159 and 1,000,000.",
    "  leading spaces\n\n\ttabs\r\nwindows line\u3000ideographic space    trailing   ",
    "中文测试：这是一只猫。日本語のテキスト。한국어 문장.",
    "emoji 😀👍🏽 and café vs cafe\u0301 (NFC), naïve façade, Straße, ΑΒΓ, кириллица",
    "code: def f(x):\n    return x**2  # comment\n{'a': [1, 2]}<|endoftext|>",
    "<|im_end|><|im_start|><|endoftext|></img><img>",
)


def load_fast(path: Path):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer`, converting slow files through transformers."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: {exc}") from None
    if spm_tokenizer.is_spm_checkpoint(path):
        return spm_tokenizer.convert(path)
    return checkpoint_tokenizer(path).backend_tokenizer


def checkpoint_tokenizer(path: Path):
    """The checkpoint's own tokenizer as transformers loads it (no remote code), or, for InternLM2's
    sentencepiece tokenizer (remote code), its encoding rebuilt on the sentencepiece package."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if spm_tokenizer.is_spm_checkpoint(path):
        return spm_tokenizer.SentencePieceReference(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that config.json's model_type is not a tokenizer's; expected here
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def special_token_ids(tokenizer, adds_bos: bool = False) -> dict[str, int]:
    """The template's and InternVL's tokens; end of text is Qwen2's <|endoftext|> or InternLM2's </s>, and
    <s> is recorded only when the checkpoint's tokenizer puts it before every prompt (InternLM2)."""
    required = [t for t in SPECIAL_TOKENS if t != END_OF_TEXT]
    required.append(END_OF_TEXT if tokenizer.token_to_id(END_OF_TEXT) is not None else EOS)
    if adds_bos:
        required.append(BOS)
    ids = {}
    for token in required:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"the tokenizer has no {token} token; not an InternVL2.5 tokenizer")
        ids[token] = token_id
    return ids


def adds_bos(path: Path) -> bool:
    """Whether the checkpoint's tokenizer starts every encoded prompt with <s> (chat() encodes with it)."""
    return spm_tokenizer.is_spm_checkpoint(path) and spm_tokenizer.SentencePieceReference(path).add_bos


def image_token_id_of(path: Path) -> int:
    return special_token_ids(load_fast(path))["<IMG_CONTEXT>"]


def write_tokenizer(path: Path, out_dir: Path) -> dict[str, int]:
    """Write out_dir/tokenizer.json, prove it against the checkpoint's tokenizer, return the special ids."""
    target = out_dir / "tokenizer.json"
    if (path / "tokenizer.json").is_file():
        shutil.copyfile(path / "tokenizer.json", target)
    else:
        load_fast(path).save(str(target))
    prove_same_ids(target, path)
    from tokenizers import Tokenizer

    return special_token_ids(Tokenizer.from_file(str(target)), adds_bos(path))


def prove_same_ids(tokenizer_json: Path, checkpoint: Path) -> int:
    """Encode the proof corpus with both tokenizers; raise on the first string they split differently."""
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tokenizer_json))
    reference = checkpoint_tokenizer(checkpoint)
    added = [t if isinstance(t, str) else t.content for t in reference.added_tokens_decoder.values()]
    corpus = list(PROOF_CORPUS) + added + ["x" + "".join(added) + "y"]
    for text in corpus:
        got = ours.encode(text, add_special_tokens=False).ids
        want = reference.encode(text, add_special_tokens=False)
        if got != want:
            raise CheckpointError(
                f"converted tokenizer disagrees with the checkpoint's on {json.dumps(text[:60], ensure_ascii=False)}: "
                f"{got[:12]} vs {want[:12]}"
            )
    return len(corpus)
