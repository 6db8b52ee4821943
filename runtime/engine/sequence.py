"""One request's state inside the engine: its prompt and content keys, how much of it is cached, what it generated."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from ..sampling import GenerationConfig, Sampler
from ..tokenizer import IncrementalDecoder


class Status(Enum):
    WAITING = "waiting"  # no slot yet
    ENCODING = "encoding"  # holds a slot; its images go through the vision encoder (another thread)
    PREFILLING = "prefilling"  # its prompt goes into the decoder, one chunk per step while others decode
    RUNNING = "running"  # a row of the running batch
    FINISHED = "finished"


@dataclass
class ImageSpan:
    """One image of a prompt: where its <IMG_CONTEXT> tokens are and what its pixels hash to."""

    start: int  # first <IMG_CONTEXT> position in the prompt
    end: int  # one past the last
    tiles: int
    digest: bytes  # blake2b of the image's tiles, shape and dtype (so it covers the tiling settings too)
    first_tile: int  # index of its first tile in the request's pixel_values


@dataclass(eq=False)  # compared and hashed by identity: the engine keeps sequences in lists and dicts
class Sequence:
    id: int
    ids: np.ndarray  # (prompt,) int64 token ids
    keys: np.ndarray  # (prompt,) int64: the ids, each image's tokens replaced by a negative key from its pixel hash
    images: list[ImageSpan]
    pixel_values: np.ndarray  # (tiles, 3, 448, 448)
    generation: GenerationConfig
    max_new: int  # max_new_tokens, clipped to the context
    detok: IncrementalDecoder
    sampler: Sampler
    added: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    cached: int = 0  # prompt positions taken from the prefix cache
    done: int = 0  # prompt positions in the KV cache so far (cached ones included)
    partial: list[np.ndarray] | None = None  # its own KV cache (host) while it prefills, each (1, kv_heads, done, d)
    embeds: np.ndarray | None = None  # (prompt - cached, hidden) while it prefills
    encoding: Future | None = None
    image_embeds: dict[int, np.ndarray] = field(default_factory=dict)  # image index -> (tiles, tokens, hidden)
    tokens: list[int] = field(default_factory=list)  # generated, the stop token included
    text: list[str] = field(default_factory=list)  # decoded pieces not yet taken by the caller
    finish_reason: str | None = None  # stop, stop_string, length, cancelled, timed_out, error
    error: BaseException | None = None
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        """Positions of this sequence in the KV cache: the prompt, then every generated token fed back so far."""
        return self.prompt_len + len(self.tokens) - 1 if self.tokens else self.done

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def fed_keys(self) -> np.ndarray:
        """Content keys of the positions in its KV cache: prompt keys, then the generated tokens fed back."""
        return np.concatenate([self.keys, np.asarray(self.tokens[: self.length - self.prompt_len], np.int64)])

    def take_text(self) -> str:
        out, self.text = "".join(self.text), []
        return out
