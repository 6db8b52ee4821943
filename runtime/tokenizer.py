"""The bundle's tokenizer.json through `tokenizers`, and incremental detokenisation for streaming."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from vl_export.errors import BundleError

from .prompt import BOS, CONTROL, END_OF_TEXT, EOS, IM_END, IMG_CONTEXT


class TextTokenizer:
    def __init__(self, path: Path, special_tokens: dict[str, int]):
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise BundleError(f"cannot read {path}: {exc}") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.plain = Tokenizer.from_file(str(path))
        self.plain.encode_special_tokens = True  # special-token strings in text stay text
        self.special_ids = frozenset(special_tokens.values())
        for token, token_id in special_tokens.items():
            if self.tokenizer.token_to_id(token) != token_id:
                raise BundleError(f"{path.name} maps {token} to {self.tokenizer.token_to_id(token)}, the manifest says {token_id}")
        self.im_end = special_tokens[IM_END]
        # Qwen2 ends text with <|endoftext|>, InternLM2 with </s>; each is also its model's pad token.
        end_of_text = special_tokens.get(END_OF_TEXT, special_tokens.get(EOS))
        if end_of_text is None:
            raise BundleError(f"the manifest names neither {END_OF_TEXT} nor {EOS} among the special tokens")
        self.end_of_text = end_of_text
        self.image_context = special_tokens[IMG_CONTEXT]
        self.pad = self.end_of_text
        self.stop_ids = frozenset((self.im_end, self.end_of_text))
        self.bos = special_tokens.get(BOS)  # InternLM2: chat() encodes every prompt after <s>

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Text as text: `<|im_start|>` typed by a user is the characters, never the control token."""
        ids = self.plain.encode(text, add_special_tokens=False).ids if text else []
        if self.special_ids.intersection(ids):  # a tokenizer that does not mark a control token as special
            raise BundleError("the bundle's tokenizer.json does not mark its control tokens as special; "
                              "text cannot be encoded safely")
        return ids

    def encode_segments(self, segments, parse_special_tokens: bool = False) -> list[int]:
        """A conversation's segments (prompt.conversation) -> ids: control tokens by id, text as plain text.

        parse_special_tokens: the reference's behaviour, the joined string encoded whole (special strings in
        text become control tokens)."""
        ids: list[int] = [] if self.bos is None else [self.bos]  # InternLM2: <s> first, as its tokenizer(query)
        if parse_special_tokens:
            return ids + self.encode("".join(text for _, text in segments))
        pending: list[str] = []
        for kind, text in segments:
            if kind == CONTROL:
                ids += self.encode_plain("".join(pending))
                pending = []
                ids.append(self.tokenizer.token_to_id(text))
            else:
                pending.append(text)
        return ids + self.encode_plain("".join(pending))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDecoder:
    """Text pieces as tokens arrive, never splitting a multi-byte character, holding back a possible stop string.

    Decoding the whole tail each time is what keeps multi-byte characters whole: a character split over two
    byte tokens decodes to U+FFFD until its last byte has arrived, so text ending in U+FFFD is not emitted yet.
    """

    def __init__(self, tokenizer: TextTokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.text = ""  # all text decoded so far, stop strings not yet cut
        self.emitted = 0  # characters of self.text already handed out
        self.stopped_at: int | None = None  # index in self.text where a stop string begins

    def push(self, token_id: int) -> str:
        """Add one token; return the newly safe text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        for stop in self.stop_strings:
            at = self.text.find(stop)
            if at != -1 and (self.stopped_at is None or at < self.stopped_at):
                self.stopped_at = at
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is left once generation ends."""
        self.text = self.tokenizer.decode(self.ids)
        return self._release(final=True)

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def _release(self, final: bool) -> str:
        end = len(self.text) if self.stopped_at is None else self.stopped_at
        if not final and self.stopped_at is None:
            end -= self._held_back()
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return piece

    def _held_back(self) -> int:
        """Characters at the end that could still grow into a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest

    @property
    def final_text(self) -> str:
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]
