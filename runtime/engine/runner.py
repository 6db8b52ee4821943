"""Runs the decoder session for the engine: the running batch's cache layout, prefill chunks, batched decode steps.

The running batch shares one cache of `width` positions per row; each row's positions are right-aligned (its
newest token is in the last column) and the columns before its first are masked out, so every row can grow by one
position per step in one decoder call. Rows join and leave through `relayout`, which copies the cache out, drops
the rows that left, appends the new ones and trims the columns nobody uses. A prefill runs alone in the same
session: the running rows' cache is set aside (host copy) for its chunk and put back after it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..backends.base import DecoderSession
from .sequence import Sequence

GROW = 256  # positions of headroom per relayout; past it the cache grows by a copy


class Runner:
    def __init__(self, decoder: DecoderSession, embed: Callable[[np.ndarray], np.ndarray], prefill_chunk: int):
        self.decoder = decoder
        self.embed = embed  # token ids (n,) -> (n, hidden) float32
        self.prefill_chunk = prefill_chunk
        self.rows: list[Sequence] = []  # the running batch, in cache row order
        self.capacity = 0

    def prefill(self, seq: Sequence, embeds: np.ndarray, whole: bool) -> np.ndarray | None:
        """Feed seq's prompt from seq.done on: all of it, or up to the next chunk boundary. embeds (prompt - cached,
        hidden) are the positions from seq.cached on. Returns the last position's logits (vocab,) once the prompt
        is complete, else None. Chunk boundaries are multiples of prefill_chunk from position 0, so a prompt is
        split the same way whoever else is running."""
        saved = self.decoder.cache() if self.rows else None
        capacity = seq.prompt_len + min(seq.max_new, GROW)
        try:
            if seq.partial is None:
                self.decoder.reset(1, capacity)
            else:
                self.decoder.load_cache(seq.partial, capacity)
            logits = None
            stop = seq.prompt_len if whole else min(seq.prompt_len, (seq.done // self.prefill_chunk + 1) * self.prefill_chunk)
            while seq.done < stop:
                start = seq.done
                end = min(stop, (start // self.prefill_chunk + 1) * self.prefill_chunk)
                chunk = embeds[start - seq.cached : end - seq.cached][None]  # (1, end - start, hidden)
                positions = np.arange(start, end, dtype=np.int64)[None]
                logits = self.decoder.forward(chunk, np.ones((1, end), np.int64), positions,
                                              np.array([[end - start - 1]], np.int64))[0, -1]
                seq.done = end
            seq.partial = self.decoder.cache()
        finally:
            if saved is not None:
                self.decoder.load_cache(saved, self.capacity)
        return logits if seq.done == seq.prompt_len else None

    def decode(self) -> np.ndarray:
        """One step for every row: feed its last token, return the next logits (rows, vocab)."""
        width = self.decoder.past_len
        if width + 1 > self.capacity:
            self.capacity = width + GROW
            self.decoder.load_cache(self.decoder.cache(), self.capacity)
        lengths = np.array([seq.length for seq in self.rows], np.int64)
        mask = (np.arange(width + 1)[None] >= (width - lengths)[:, None]).astype(np.int64)  # (rows, width + 1)
        tokens = np.array([seq.tokens[-1] for seq in self.rows], np.int64)
        embeds = self.embed(tokens)[:, None, :]  # (rows, 1, hidden)
        logits = self.decoder.forward(embeds, mask, lengths[:, None], np.zeros((len(self.rows), 1), np.int64))
        return logits[:, -1]

    def relayout(self, rows: list[Sequence]) -> dict[Sequence, list[np.ndarray]]:
        """Make `rows` the running batch: rows kept keep their cache, new ones bring theirs (seq.partial).
        Returns the cache of each row that left, in graph order, each (kv_heads, length, d), for the prefix cache."""
        old = self.decoder.cache() if self.rows else []
        width = self.decoder.past_len
        index = {seq: i for i, seq in enumerate(self.rows)}
        left = {seq: [t[i, :, width - seq.length :] for t in old] for seq, i in index.items() if seq not in rows}
        self.rows = list(rows)
        if not rows:
            self.capacity = 0
            return left
        new_width = max(seq.length for seq in rows)
        fresh = None
        for j, seq in enumerate(rows):
            mine = [t[index[seq], :, width - seq.length :] for t in old] if seq in index else [t[0] for t in seq.partial]
            if fresh is None:
                shape = (len(rows), mine[0].shape[0], new_width, mine[0].shape[2])
                fresh = [np.zeros(shape, t.dtype) for t in mine]
            for f, t in zip(fresh, mine):  # right-aligned: the newest position in the last column
                f[j, :, new_width - seq.length :] = t
            if seq not in index:
                seq.partial = None
        self.capacity = new_width + min(max(seq.max_new - len(seq.tokens) for seq in rows), GROW)
        self.decoder.load_cache(fresh, self.capacity)
        return left
