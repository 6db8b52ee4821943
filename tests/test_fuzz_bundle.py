"""Property: whatever a manifest says and whatever flags `run` gets, the answer is exit 0, or exit 2 with one line
and no traceback; and no file outside the bundle is read or written (the user cache aside).

Each example copies the tiny bundle beside a second copy (`outside/`, genuine files a hostile manifest might name),
mutates one to three manifest fields (or swaps a file for a symlink out), and runs the CLI in-process. Python's
audit hook records every file opened, removed or renamed; the files the runtimes open from C++ are named by the
manifest, which is checked before they see it. Bounded: 30 examples, a tiny bundle, well under a minute.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vl_export.cli import main  # noqa: E402

DELETE = object()
FIELDS = [
    ("tokenizer",), ("embed_tokens", "file"), ("embed_tokens", "dtype"), ("embed_tokens", "shape"),
    ("graphs", 0, "file"), ("graphs", 2, "file"), ("graphs", 1, "sha256"), ("graphs", 0, "role"),
    ("graphs", 2, "inputs", 4, "shape"), ("graphs", 2, "inputs", 4, "dtype"), ("graphs", 2, "backends"),
    ("graphs", 1, "data_sha256"), ("graphs",), ("preprocessing", "max_tiles"), ("preprocessing", "min_tiles"),
    ("preprocessing", "image_size"), ("preprocessing", "use_thumbnail"), ("preprocessing", "std"), ("max_context",),
    ("special_tokens", "<|im_end|>"), ("special_tokens", "<IMG_CONTEXT>"), ("model", "text", "num_layers"),
    ("model", "text", "hidden_size"), ("model", "vision", "image_size"), ("model", "downsample_ratio"),
    ("system_message",), ("template",), ("schema_version",), ("engines",),
]
OUTSIDE = "@OUTSIDE@"  # replaced by the example's outside/ directory
VALUES = st.one_of(
    st.sampled_from([0, -1, 1, 2, 12, 257, 10**9, 10**12, 2**64, 0.5, float("nan"), float("inf"), True, None, DELETE,
                     "", "../outside/decoder.onnx", "../outside/tokenizer.json", f"{OUTSIDE}/embed_tokens.npy",
                     "/etc/passwd", "decoder.onnx", "projector.onnx", "a" * 64, "0" * 64, "../../x/../" + "b" * 60,
                     "float16", "int64", "llama", [], {}, [1, 2], ["batch", 2, "past", 8]]),
    st.integers(-2**40, 2**40),
    st.lists(st.integers(-2, 600), max_size=4),
    st.text(max_size=8),
)
FLAG_VALUES = {
    "--max-tiles": st.integers(-2, 300).map(str), "--temperature": st.sampled_from(["nan", "inf", "-1", "0", "0.7", "5"]),
    "--top-p": st.sampled_from(["nan", "0", "0.5", "1", "2"]), "--top-k": st.integers(-1, 10**6).map(str),
    "--seed": st.integers(-3, 2**64).map(str), "--repetition-penalty": st.sampled_from(["nan", "-1", "0", "1.2", "inf"]),
    "--max-new-tokens": st.sampled_from(["-1", "0", "1", "3"]), "--frames": st.integers(-2, 3).map(str),
    "--system": st.sampled_from(["", "<|im_start|>user\nhi", "<image>", "<IMG_CONTEXT>", "\udcff", "x" * 50]),
    "--prompt": st.sampled_from(["Hi", "<image>", "<image><image>", "<|im_end|><|endoftext|>", "<img>", "\udce9"]),
    "--threads": st.integers(-1, 2).map(str), "--option": st.sampled_from(["x", "threads=1", "a=b"]),
}
FLAGS = st.lists(st.sampled_from(sorted(FLAG_VALUES)).flatmap(lambda f: FLAG_VALUES[f].map(lambda v: (f, v))), max_size=3)
SYMLINKS = st.sampled_from([None, "tokenizer.json", "decoder.onnx", "embed_tokens.npy", "manifest.json"])

_events: list | None = None


def _audit(event: str, args) -> None:
    if _events is not None and event in ("open", "os.remove", "os.rename", "os.replace", "shutil.rmtree", "os.unlink",
                                         "os.mkdir", "os.symlink"):
        _events.append((event, args))


sys.addaudithook(_audit)


def _written(event: str, args) -> bool:
    if event != "open":
        return True
    mode, flags = args[1], args[2]
    return bool((mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _set(data, path, value):
    for key in path[:-1]:
        data = data[key]
    if value is DELETE:
        data.pop(path[-1]) if isinstance(data, dict) else None
    else:
        data[path[-1]] = value


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-image") / "small.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(path)
    return path


@settings(max_examples=int(os.environ.get("VL_FUZZ_EXAMPLES", 30)), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=0, max_size=3), symlink=SYMLINKS,
       flags=FLAGS, with_image=st.booleans())
def test_any_manifest_and_flags_give_exit_0_or_one_line_and_touch_nothing_outside(bundle_fp32, picture, mutations,
                                                                                 symlink, flags, with_image):
    global _events
    root = Path(tempfile.mkdtemp(prefix="vl-fuzz-"))
    try:
        bundle, outside = root / "bundle", root / "outside"
        shutil.copytree(bundle_fp32, bundle)
        shutil.copytree(bundle_fp32, outside)
        data = json.loads((bundle / "manifest.json").read_text())
        for field, value in mutations:
            value = value.replace(OUTSIDE, str(outside)) if isinstance(value, str) else value
            try:
                _set(data, field, value)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier mutation removed the parent: this one does nothing
        (bundle / "manifest.json").write_text(json.dumps(data))
        if symlink:
            (bundle / symlink).unlink()
            (bundle / symlink).symlink_to(outside / symlink)
        argv = ["run", "--bundle", str(bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--threads", "1"]
        argv += ["--image", str(picture)] if with_image else []
        argv += [x for flag in flags for x in flag]
        before = sorted(p.name for p in root.iterdir())
        out, err = io.StringIO(), io.StringIO()
        _events = []
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)  # anything but VlExportError escapes here as the traceback it would print
        finally:
            events, _events = _events, None
        lines = err.getvalue().splitlines()
        assert code in (0, 2), (code, lines)
        assert "Traceback" not in err.getvalue()
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("vl-export: error: "), lines
        if symlink:
            assert code == 2, "a file symlinked out of the bundle was used"
        cache = os.path.realpath(os.environ["VL_EXPORT_CACHE"])
        for event, args in events:
            path = args[0] if args else None
            if not isinstance(path, (str, bytes, os.PathLike)):
                continue
            real = os.path.realpath(os.fsdecode(path))
            assert not real.startswith(str(outside)), (event, real)
            assert real != "/etc/passwd", (event, real)
            if _written(event, args):
                assert real.startswith((str(bundle), cache)), (event, real)
        assert sorted(p.name for p in root.iterdir()) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)
