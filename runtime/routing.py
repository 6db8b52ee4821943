"""Cache-affine routing, the pure part: a request's routing key, the replica ranking, and the affinity ledger.

A prompt starts with the system message and the conversation's first turn, and a first turn with images starts
with their tokens (`<image>` markers come before the text). So the first image of the first turn, or else the
system message and the first turn's text, names the part of the prompt that a replica's caches (image
embeddings, KV prefix) can hold. Requests with the same key should meet on the same replica: a conversation's
later rounds, and other questions about the same image.

The key is only a hint for the router, computed from what the client sent; caches themselves are keyed by
content on the replica and never trust it. No Ray here: the Ray router and the ingress call these functions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .prompt import IMAGE_PLACEHOLDER

KEY_HEX_CHARS = 16  # 64 bits: collisions only send two conversations to the same replica


def routing_key(question: str, images: Sequence[bytes], history: Sequence[tuple[str, str]],
                system_message: str | None) -> str:
    """'image:<hash>' when the first turn has images, else 'text:<hash>' of the system message and first turn."""
    first_turn = history[0][0] if history else question
    if images and IMAGE_PLACEHOLDER in first_turn:  # the first turn's images come first in `images`
        return "image:" + hashlib.sha256(images[0]).hexdigest()[:KEY_HEX_CHARS]
    text = f"{system_message or ''}\0{first_turn}".encode()
    return "text:" + hashlib.sha256(text).hexdigest()[:KEY_HEX_CHARS]


def rank_replicas(key: str, replica_ids: Iterable[str]) -> list[str]:
    """Replica ids by preference for `key` (rendezvous hashing): the same key ranks the same replica first on
    every router, and when a replica leaves only its own keys move (each to its next choice)."""
    def score(replica_id: str) -> bytes:
        return hashlib.sha256(f"{key}\0{replica_id}".encode()).digest()

    return sorted(replica_ids, key=score, reverse=True)


class AffinityLedger:
    """Which replica served each routing key last, bounded: tells whether a request met its cache ('hit'),
    went elsewhere ('miss', e.g. its replica was overloaded or gone), or was the key's first ('new')."""

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self._last: OrderedDict[str, str] = OrderedDict()
        self.counts = {"hit": 0, "miss": 0, "new": 0}

    def record(self, key: str, replica_id: str) -> str:
        previous = self._last.pop(key, None)
        outcome = "new" if previous is None else "hit" if previous == replica_id else "miss"
        self._last[key] = replica_id
        if len(self._last) > self.max_keys:
            self._last.popitem(last=False)  # the least recently seen key
        self.counts[outcome] += 1
        return outcome
