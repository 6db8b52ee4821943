"""Choosing the next token: repetition penalty, temperature, top-k, top-p, in transformers' order.

Greedy is sampling with top-k 1; it takes the first index among equal maxima, as torch.argmax does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vl_export.errors import InputError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_k: int = 1  # 1 is greedy, the reference's default; 0 means no top-k limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # user stop strings, besides <|im_end|> and <|endoftext|>
    ignore_eos: bool = False  # keep going past the stop tokens (benchmarks want exactly max_new_tokens)

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):  # NaN passes every comparison below
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0

    @classmethod
    def sampling(cls, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0, **kwargs) -> GenerationConfig:
        return cls(temperature=temperature, top_p=top_p, top_k=top_k, **kwargs)


class Sampler:
    """Holds the random generator of one request, so a seed reproduces the whole generation."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, generated: list[list[int]]) -> np.ndarray:
        """logits (b, vocab) float32, the tokens generated so far per row -> next token per row (b,) int64."""
        logits = np.array(logits, dtype=np.float32)
        if self.config.repetition_penalty != 1.0:
            for row, seen in zip(logits, generated):
                penalize(row, seen, self.config.repetition_penalty)
        if self.config.greedy:
            return logits.argmax(axis=-1).astype(np.int64)
        return np.array([self._sample(row) for row in logits], dtype=np.int64)

    def _sample(self, row: np.ndarray) -> int:
        row = row / self.config.temperature
        order = np.argsort(-row, kind="stable")  # (vocab,) best first, ties by lower id
        if self.config.top_k:
            order = order[: self.config.top_k]
        probs = softmax(row[order])
        if self.config.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (at least one token), as transformers does.
            keep = int(np.searchsorted(np.cumsum(probs), self.config.top_p) + 1)
            order, probs = order[:keep], softmax(row[order[:keep]])
        return int(order[self.rng.choice(len(order), p=probs)])


def penalize(row: np.ndarray, seen: list[int], penalty: float) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor: divide positive logits of seen tokens, multiply negative ones."""
    if not seen:
        return
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    scores = row[ids]
    row[ids] = np.where(scores < 0, scores * penalty, scores / penalty)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
