"""The engine's two caches, keyed by content and bounded in bytes with least-recently-used eviction.

- PrefixCache: KV caches of earlier sequences, keyed by their content keys (token ids, with every image token
  replaced by a key from that image's pixel hash, so two different images never match). A new prompt reuses the
  longest common prefix with any entry: the KV at a position depends only on the content up to it.
- ImageCache: image embeddings (projector output), keyed by the hash of the image's tiles (pixels, tile count and
  size: the tiling settings are in the key because they decide the tiles).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MiB = 1 << 20


def pixel_digest(tiles: np.ndarray) -> bytes:
    """A hash of one image's tiles (tiles, 3, h, w): content, shape and dtype."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tiles.shape, str(tiles.dtype))).encode())
    h.update(np.ascontiguousarray(tiles).data)
    return h.digest()


def image_key(digest: bytes) -> int:
    """A negative int64 for an image's token positions; token ids are never negative, so the two never meet."""
    return -1 - (int.from_bytes(digest[:8], "little") >> 1)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class _Lru:
    """An OrderedDict bounded in bytes; the oldest entries go first. Thread-safe (the image cache is filled by the
    encoder thread and read by whoever reports stats)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.entries: OrderedDict = OrderedDict()
        self.sizes: dict = {}
        self.bytes = 0
        self.stats = CacheStats()
        self.lock = threading.Lock()

    def _put(self, key, value, size: int) -> bool:
        if size > self.budget_bytes:
            return False
        if key in self.entries:
            self._drop(key)
        self.entries[key] = value
        self.sizes[key] = size
        self.bytes += size
        while self.bytes > self.budget_bytes:
            self._drop(next(iter(self.entries)))
            self.stats.evictions += 1
        return True

    def _drop(self, key) -> None:
        del self.entries[key]
        self.bytes -= self.sizes.pop(key)

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> dict:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                    "hits": self.stats.hits, "misses": self.stats.misses, "evictions": self.stats.evictions}


class ImageCache(_Lru):
    def get(self, digest: bytes) -> np.ndarray | None:
        with self.lock:
            embeds = self.entries.get(digest)
            if embeds is None:
                self.stats.misses += 1
                return None
            self.entries.move_to_end(digest)
            self.stats.hits += 1
            return embeds

    def put(self, digest: bytes, embeds: np.ndarray) -> None:
        with self.lock:
            self._put(digest, embeds, embeds.nbytes)


@dataclass
class PrefixEntry:
    keys: np.ndarray  # (n,) int64 content keys
    kv: list[np.ndarray]  # graph order, each (kv_heads, n, d)


class PrefixCache(_Lru):
    """Entries are whole sequences; any prefix of one is usable. A stored sequence that extends an entry (the next
    round of a conversation) replaces it, and one already covered by an entry is not stored twice."""

    def lookup(self, keys: np.ndarray, limit: int) -> tuple[int, list[np.ndarray] | None]:
        """The longest cached prefix of `keys`, at most `limit` positions: (length, KV each (1, kv_heads, length, d))."""
        with self.lock:
            best, best_id = 0, None
            for entry_id, entry in self.entries.items():
                n = min(common_prefix(entry.keys, keys), limit)
                if n > best:
                    best, best_id = n, entry_id
            if best_id is None:
                self.stats.misses += 1
                return 0, None
            self.stats.hits += 1
            self.entries.move_to_end(best_id)
            return best, [t[None, :, :best] for t in self.entries[best_id].kv]

    def store(self, keys: np.ndarray, kv: list[np.ndarray]) -> None:
        """keys (n,), kv in graph order each (kv_heads, n, d) (copies: the caller's buffers move on)."""
        size = sum(t.nbytes for t in kv) + len(keys) * 8
        if not len(keys) or size > self.budget_bytes:  # too big for the budget: the entries it extends stay
            return
        with self.lock:
            for entry_id, entry in list(self.entries.items()):
                shared = common_prefix(entry.keys, keys)
                if shared == len(keys):  # covered already: just mark it used
                    self.entries.move_to_end(entry_id)
                    return
                if shared == len(entry.keys):  # the new one extends it
                    self._drop(entry_id)
            entry = PrefixEntry(np.array(keys, np.int64), [np.array(t) for t in kv])
            self._put(id(entry), entry, size)
