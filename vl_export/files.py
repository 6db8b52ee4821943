"""Writing bundles safely: a directory staged beside its target and moved in whole; hashes; progress lines."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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


STAGING_MARK = ".partial-"  # staging directories are named .<out>.partial-<pid>-<random>


def check_output(out: Path, overwrite: bool, protect: Sequence[Path] = (), must_hold: str | None = None) -> Path:
    """Refuse, before any work, an output that would destroy what it must not: the input it is made from (equal,
    inside or containing it), a symlink, or (with must_hold) an existing directory that is not one of ours."""
    out = Path(out).expanduser().absolute()
    if out.is_symlink():
        raise VlExportError(f"{out} is a symbolic link; give the real directory to write to")
    real_out = Path(os.path.realpath(out))
    for source in protect:
        real_source = Path(os.path.realpath(Path(source).expanduser()))
        if real_out == real_source or real_source in real_out.parents or real_out in real_source.parents:
            raise VlExportError(f"--out {out} overlaps the checkpoint {source} (equal, inside or containing it); "
                                f"write the bundle somewhere else")
    if out.exists() or os.path.lexists(out):
        if not overwrite:
            raise VlExportError(f"{out} already exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise VlExportError(f"{out} exists and is not a directory")
        if must_hold is not None and not (out / must_hold).is_file():
            raise VlExportError(f"{out} is not a vl-export bundle (it has no {must_hold}); --overwrite only replaces "
                                f"a bundle, never another directory")
    return out


@contextmanager
def staged_directory(out: Path, overwrite: bool, protect: Sequence[Path] = (),
                     must_hold: str | None = None) -> Iterator[Path]:
    """Yield a scratch directory beside `out`; on success it becomes `out`, on failure it disappears.

    The old `out` is swapped out in one atomic rename (renameat2 RENAME_EXCHANGE), so at every instant `out` is
    either the old directory or the new one, whatever interrupts us; staging left by killed runs is removed first.
    """
    out = check_output(out, overwrite, protect, must_hold)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(parent, out.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_MARK}{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise VlExportError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        for path in [staging, *staging.rglob("*")]:  # mkdtemp and onnx's external data files are private
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        check_output(out, overwrite, protect, must_hold)  # it may have changed while we worked
        if out.exists():
            exchange(staging, out)  # staging now holds the old directory, removed below
        else:
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically (Linux renameat2). Where the kernel or filesystem cannot, say so: a
    non-atomic replace is exactly what this refuses to do."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    rename_exchange, at_fdcwd = 2, -100
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise VlExportError(f"cannot replace {b}: {os.strerror(code)}")
    raise VlExportError(f"cannot replace {b} atomically on this filesystem; remove it yourself and run again")


def remove_stale_staging(parent: Path, name: str) -> None:
    """Staging directories of runs that were killed (their process is gone) are removed."""
    for path in parent.glob(f".{name}{STAGING_MARK}*"):
        pid = path.name[len(f".{name}{STAGING_MARK}"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json_with_version(path: Path) -> tuple[dict, object]:
    """A bundle's JSON file and its schema_version; invalid JSON is a BundleError naming the file."""
    import json

    try:
        data = json.loads(Path(path).read_bytes(), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BundleError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data, data.get("schema_version")


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write beside `path` and rename, so a reader (another build sharing a cache, kubectl) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
