"""The decode loop: prefill the spliced prompt, then one token at a time until every row stops."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from vl_export.errors import InputError

from .backends.base import DecoderSession
from .sampling import GenerationConfig, Sampler


@dataclass
class Generated:
    token_ids: list[list[int]]  # per row, the new tokens, the stop token included when one was produced
    finish_reasons: list[str]  # "stop" (a stop token), "stop_string", "length" (max_new_tokens or the context)
    prefill_s: float
    decode_s: float


def positions_of(attention_mask: np.ndarray) -> np.ndarray:
    """transformers' generate: position = running count of real tokens - 1; padding gets 1."""
    return np.where(attention_mask == 1, attention_mask.cumsum(-1) - 1, 1).astype(np.int64)


def context_limits(max_context: int, decoder: DecoderSession) -> str:
    """Where the limit comes from, for the refusal: the model's context and the session's own."""
    if decoder.max_positions is None:
        return f"the model's context is {max_context}"
    return f"the model's context is {max_context}, the decoder engine's {decoder.max_positions}"


def generate(*args, **kwargs) -> Generated:
    """Run `generate_steps` to the end."""
    steps = generate_steps(*args, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


def generate_steps(
    decoder: DecoderSession,
    inputs_embeds: np.ndarray,  # (b, s, hidden) float32, left-padded
    attention_mask: np.ndarray,  # (b, s) int64
    embed: Callable[[np.ndarray], np.ndarray],  # token ids (b,) -> embeddings (b, hidden) float32
    config: GenerationConfig,
    stop_ids: frozenset[int],
    pad_id: int,
    max_context: int,
    on_token: Callable[[int, int], bool] | None = None,  # (row, token) -> True to stop that row (a stop string)
) -> Generator[None, None, Generated]:
    """Yields once per generated position (so a caller can stream), returns the Generated at the end."""
    b, s = attention_mask.shape
    limit = max_context if decoder.max_positions is None else min(max_context, decoder.max_positions)
    if s >= limit:
        raise InputError(f"the prompt is {s} tokens and the decoder holds at most {limit} positions "
                         f"({context_limits(max_context, decoder)}); shorten the prompt or use fewer tiles")
    if decoder.max_batch is not None and b > decoder.max_batch:
        raise InputError(f"{b} sequences in one batch, the decoder takes at most {decoder.max_batch}")
    max_new = min(config.max_new_tokens, limit - s)  # finish_reason "length" when the limit cuts it short
    sampler = Sampler(config)
    decoder.reset(b, s + max_new)

    start = time.perf_counter()
    positions = positions_of(attention_mask)
    last = np.full((b, 1), s - 1, np.int64)
    logits = decoder.forward(inputs_embeds, attention_mask, positions, last)[:, -1]  # (b, vocab)
    prefill_s = time.perf_counter() - start

    tokens: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    done = np.zeros(b, bool)
    start = time.perf_counter()
    for step in range(max_new):
        chosen = sampler(logits, tokens)  # (b,)
        for row in np.flatnonzero(~done):
            token = int(chosen[row])
            tokens[row].append(token)
            if token in stop_ids and not config.ignore_eos:
                done[row], reasons[row] = True, "stop"
            elif on_token is not None and on_token(int(row), token):
                done[row], reasons[row] = True, "stop_string"
        yield
        if done.all() or step == max_new - 1:
            break
        # Finished rows keep feeding the pad token, as transformers does; their outputs are never read.
        chosen = np.where(done, pad_id, chosen)
        attention_mask = np.concatenate([attention_mask, np.ones((b, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits = decoder.forward(embed(chosen)[:, None, :], attention_mask, positions, np.zeros((b, 1), np.int64))[:, -1]
    return Generated(tokens, reasons, prefill_s, time.perf_counter() - start)
