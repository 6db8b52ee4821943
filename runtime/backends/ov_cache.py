"""Where the OpenVINO backend keeps the IR it converts from a bundle's ONNX graphs, and how a cached IR is named.

The design: each ONNX graph is converted once to OpenVINO IR (xml + bin, weights kept exactly, fp32 stays fp32)
and saved under a name keyed by the graph's verified content hash and the OpenVINO version, so a rebuilt graph or another
OpenVINO never reads a stale file. The IR is independent of the options (precision, threads, device), so one
copy serves every configuration; compiling stays per process. The cache lives beside the graphs in
`<bundle>/openvino/` when the bundle is writable, else in the user cache ($VL_EXPORT_CACHE or ~/.cache/vl-export,
then `openvino/`): a read-only bundle is never written to. Files appear by atomic rename, so a concurrent or
interrupted writer leaves either a whole IR or none.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path

from vl_export import integrity
from vl_export.errors import BundleError
from vl_export.manifest import GraphEntry

SUBDIR = "openvino"
OFF = ("off", "none", "no", "0")


def user_cache() -> Path:
    """The same root the rest of vl-export uses for its caches (random checkpoints, calibration statistics)."""
    return Path(os.environ.get("VL_EXPORT_CACHE", Path.home() / ".cache" / "vl-export")) / SUBDIR


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def choose_dir(bundle: Path, requested: str | os.PathLike | None) -> Path | None:
    """requested None: beside the graphs if the bundle is writable, else the user cache; "off": no cache."""
    if requested is not None:
        if str(requested).lower() in OFF:
            return None
        path = Path(requested).expanduser()
        return path if _writable_dir(path) else None
    beside = Path(bundle) / SUBDIR
    if beside.is_dir() and os.access(beside, os.W_OK | os.X_OK):
        return beside
    if os.access(bundle, os.W_OK | os.X_OK) and _writable_dir(beside):
        return beside
    fallback = user_cache()
    return fallback if _writable_dir(fallback) else None


def version_tag(version: str) -> str:
    """'2026.4.1-22982-e213a147257-releases/2026/4' -> 'ov2026.4.1-22982': release and build, safe in a file name."""
    return "ov" + re.sub(r"[^0-9A-Za-z.-]+", "_", "-".join(version.split("-")[:2]))


def ir_name(bundle: Path, entry: GraphEntry, version: str) -> str:
    """Keyed by the verified content hash (the graph and its external data), never by the manifest's claim."""
    key = integrity.graph_key(Path(bundle), entry)
    stem = re.sub(r"[^0-9A-Za-z_-]+", "_", Path(entry.file).stem)[:64]  # a plain file name, whatever the manifest says
    return f"{stem}.{key[:16]}.{version_tag(version)}.xml"


def cache_path(cache_dir: Path, name: str) -> Path:
    """`name` inside `cache_dir`, checked: nothing a bundle says may place a cached file elsewhere."""
    path = Path(cache_dir) / name
    if Path(os.path.realpath(path)).parent != Path(os.path.realpath(cache_dir)):
        raise BundleError(f"OpenVINO cache file {name!r} would land outside {cache_dir}")
    return path


def read_model(ov, core, bundle: Path, entry: GraphEntry, cache_dir: Path | None):
    """(ov.Model, files its weights are mapped from): from the cached IR when there is one, else from the ONNX
    (then cached)."""
    onnx = Path(bundle) / entry.file
    onnx_files = [onnx, *onnx.parent.glob(onnx.name + ".data")]  # external data is memory-mapped too
    if cache_dir is None:
        return core.read_model(str(onnx)), onnx_files
    xml = cache_path(cache_dir, ir_name(bundle, entry, ov.get_version()))
    if not (xml.is_file() and xml.with_suffix(".bin").is_file()):
        model = core.read_model(str(onnx))
        try:
            _save_atomically(ov, model, xml)
        except OSError as exc:  # a full disk or a directory made read-only since: run uncached, say so once
            warnings.warn(f"OpenVINO IR cache not written to {cache_dir}: {exc.strerror or exc}", stacklevel=3)
            return model, onnx_files
        del model  # compile from the saved IR instead: memory-mapped weights, not a parsed protobuf's copy
    return core.read_model(str(xml)), [xml.with_suffix(".bin")]


def _save_atomically(ov, model, xml: Path) -> None:
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=xml.parent))
    try:
        # compress_to_fp16=False: save_model halves float weights by default, which would break fp32 parity.
        ov.save_model(model, str(scratch / xml.name), compress_to_fp16=False)
        os.replace(scratch / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(scratch / xml.name, xml)  # last: the xml's presence means the pair is whole
    finally:
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()

