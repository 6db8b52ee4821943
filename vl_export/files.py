"""Writing bundles safely: a directory staged beside its target and moved in whole; hashes; progress lines."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BundleError, VlExportError

Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    print(f"[vl-export] {message}", file=sys.stderr, flush=True)


@contextmanager
def step(progress: Progress, what: str) -> Iterator[None]:
    """Say what starts, then its time and peak resident memory (what earlier steps freed is returned first)."""
    from .memory import PeakWindow, gib, release

    release()
    start = time.perf_counter()
    progress(f"{what} ...")
    with PeakWindow() as window:
        yield
    progress(f"{what}: done in {time.perf_counter() - start:.1f} s, peak RSS {gib(window.peak)}")


@contextmanager
def staged_directory(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a scratch directory beside `out`; on success it becomes `out`, on failure it disappears."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise VlExportError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise VlExportError(f"{out} exists and is not a directory")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as exc:
        raise VlExportError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        for path in [staging, *staging.rglob("*")]:  # mkdtemp and onnx's external data files are private
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_with_version(path: Path) -> tuple[dict, object]:
    """A bundle's JSON file and its schema_version; invalid JSON is a BundleError naming the file."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data, data.get("schema_version")
