"""Bundle files checked against the manifest's sha256 at load, remembered by file identity so reloads do not re-hash.

A verified file is remembered by (real path, device, inode, size, mtime in ns): in this process, and across
processes in a small JSON file in the user cache ($VL_EXPORT_CACHE or ~/.cache/vl-export, `verified-files.json`).
Replacing or editing a file changes its inode, size or mtime, so it is hashed again. Hashing runs at the disk's
or SHA-256's speed, whichever is slower (README: the cost for the 1B decoder); tiny bundles take milliseconds.
Caches built from a graph (OpenVINO IR) are keyed by `graph_key`, the verified content hash, never by a claim.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from .errors import BundleError
from .files import file_sha256
from .manifest import GraphEntry

CACHE_FILE = "verified-files.json"
MAX_REMEMBERED = 512  # files; the oldest are forgotten first
_memo: dict[tuple, str] = {}
_lock = threading.Lock()


def cache_file() -> Path:
    return Path(os.environ.get("VL_EXPORT_CACHE", Path.home() / ".cache" / "vl-export")) / CACHE_FILE


def _identity(real: str) -> tuple:
    st = os.stat(real)
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(identity: tuple, sha: str) -> None:
    _memo[identity] = sha
    path = cache_file()
    data = _read_cache()
    data.pop(identity[0], None)
    data[identity[0]] = [*identity[1:], sha]
    while len(data) > MAX_REMEMBERED:
        data.pop(next(iter(data)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(prefix=".verified-", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out)
        os.replace(scratch, path)
    except OSError:  # a read-only home: remembered for this process only
        pass


def content_sha256(path: Path) -> str:
    """The file's sha256, hashed only when its identity (path, inode, size, mtime) is not remembered."""
    real = os.path.realpath(path)
    identity = _identity(real)
    with _lock:
        if identity in _memo:
            return _memo[identity]
        stored = _read_cache().get(real)
        if isinstance(stored, list) and tuple(stored[:-1]) == identity[1:]:
            _memo[identity] = stored[-1]
            return stored[-1]
    sha = file_sha256(real)
    if _identity(real) == identity:  # unchanged while we read it: safe to remember
        with _lock:
            _remember(identity, sha)
    return sha


def check_file(path: Path, expected: str | None, what: str) -> str:
    sha = content_sha256(path)
    if sha != expected:
        raise BundleError(f"{what} does not match the sha256 in the manifest (it was changed or is corrupt): "
                          f"{sha[:16]}... is not {str(expected)[:16]}...")
    return sha


def graph_key(bundle: Path, entry: GraphEntry) -> str:
    """Check a graph (and its external data) against the manifest; the verified content hash, for cache keys."""
    sha = check_file(Path(bundle) / entry.file, entry.sha256, entry.file)
    data = Path(bundle) / (entry.file + ".data")
    if not data.exists():
        return sha
    data_sha = check_file(data, entry.data_sha256, data.name)
    return hashlib.sha256(f"{sha}:{data_sha}".encode()).hexdigest()


def load_embed_table(path: Path, embed: dict, vocab_size: int):
    """The memory-mapped embedding table, checked against the manifest's dtype and shape and the tokenizer's size."""
    import numpy as np

    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)  # (vocab, hidden)
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{path.name} is not a readable .npy array: {exc}") from None
    if str(table.dtype) != embed["dtype"] or list(table.shape) != list(embed["shape"]):
        raise BundleError(f"{path.name} holds {table.dtype} {list(table.shape)} but the manifest says "
                          f"{embed['dtype']} {list(embed['shape'])}")
    if vocab_size > table.shape[0]:
        raise BundleError(f"the tokenizer has {vocab_size} tokens but {path.name} only {table.shape[0]} rows")
    return table
