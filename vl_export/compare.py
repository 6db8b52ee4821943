"""Numbers that say how close two outputs are: max abs diff, relative error, cosine, top-1 agreement, margins."""

from __future__ import annotations

import numpy as np


def max_abs_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max()) if np.size(want) else 0.0


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs diff over the reference's largest magnitude."""
    scale = float(np.abs(want).max()) if np.size(want) else 0.0
    return max_abs_diff(got, want) / scale if scale else max_abs_diff(got, want)


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    a, b = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else float(np.array_equal(a, b))


def top1_agreement(got_logits: np.ndarray, want_tokens: np.ndarray) -> float:
    """Fraction of positions where argmax(got) is the reference's token."""
    got = np.asarray(got_logits).argmax(-1).ravel()
    want = np.asarray(want_tokens).ravel()
    return float((got == want).mean()) if want.size else 1.0


def top2_margin(logits: np.ndarray) -> float:
    """Gap between the best and second-best logit: small means a near-tie, where any rounding may flip the choice."""
    top = np.partition(np.asarray(logits, np.float64).ravel(), -2)[-2:]
    return float(top[1] - top[0])


def first_divergence(got: list[int], want: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts), or None when identical."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


def tensor_stats(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    return {"max_abs_diff": max_abs_diff(got, want), "relative_error": relative_error(got, want), "cosine": cosine(got, want)}
