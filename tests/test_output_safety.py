"""A user's files are never lost: --out is refused before any work when it would destroy something, and the
replace step swaps atomically, so the target is the old bundle or the new one at every instant."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from test_untrusted_bundle import run_cli
from vl_export import files
from vl_export.errors import VlExportError


@pytest.fixture
def no_work(monkeypatch):
    """Loading the checkpoint is the first piece of work: a refusal must come before it."""
    from vl_export.export import build, bundle

    def forbidden(*_):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(bundle, "load_checkpoint", forbidden)
    monkeypatch.setattr(build, "load_checkpoint", forbidden)


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tiny, tmp_path):
    return shutil.copytree(tiny["original"], tmp_path / "ck")


@pytest.mark.parametrize("command", ["export", "build"])
@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_out_overlapping_the_checkpoint_is_refused_before_any_work(capsys, no_work, checkpoint, command, where):
    out = {"equal": checkpoint, "inside": checkpoint / "bundle", "containing": checkpoint.parent}[where]
    before = snapshot(checkpoint)
    code, err = run_cli(capsys, command, "--model", checkpoint, "--out", out, "--overwrite")
    assert code == 2 and "overlaps the checkpoint" in err
    assert snapshot(checkpoint) == before


def test_overwrite_never_replaces_a_directory_that_is_not_a_bundle(capsys, no_work, checkpoint, tmp_path):
    folder = tmp_path / "my-photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    code, err = run_cli(capsys, "export", "--model", checkpoint, "--out", folder, "--overwrite")
    assert code == 2 and "is not a vl-export bundle (it has no manifest.json)" in err
    assert (folder / "holiday.jpg").read_bytes() == b"precious"


def test_a_symlinked_out_is_refused_before_any_work(capsys, no_work, checkpoint, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for command in ("export", "build"):
        code, err = run_cli(capsys, command, "--model", checkpoint, "--out", tmp_path / "link", "--overwrite")
        assert code == 2 and "is a symbolic link" in err
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real").is_dir()


def make_bundle(path, tag: str):
    path.mkdir()
    for name in ("manifest.json", "a.onnx", "b.onnx"):
        (path / name).write_text(tag)
    return path


def test_overwrite_replaces_a_bundle_and_leaves_nothing_beside_it(tmp_path):
    out = make_bundle(tmp_path / "bundle", "old")
    (out / "stale.txt").write_text("from the old bundle")
    with files.staged_directory(out, overwrite=True, must_hold="manifest.json") as staging:
        (staging / "manifest.json").write_text("new")
    assert snapshot(out) == {"manifest.json": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging and no old copy left beside it


def test_an_interrupt_during_the_replace_leaves_the_old_bundle_whole(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the replace: the old code had deleted part of the target (and then the new bundle)."""
    out = make_bundle(tmp_path / "bundle", "old")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if os.path.realpath(path) == os.path.realpath(out):  # deleting the target in place: half, then Ctrl-C
            (out / "a.onnx").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", interrupted_rmtree)
    # Ctrl-C at the swap itself too (raising=False: the old code had no swap, only the delete above).
    monkeypatch.setattr(files, "exchange", lambda a, b: (_ for _ in ()).throw(KeyboardInterrupt()), raising=False)
    with pytest.raises(KeyboardInterrupt):
        with files.staged_directory(out, overwrite=True, must_hold="manifest.json") as staging:
            make_bundle(staging / "x", "new")
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.onnx", "manifest.json"]
    assert (out / "a.onnx").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_the_swap_is_one_atomic_exchange(tmp_path):
    a, b = make_bundle(tmp_path / "a", "A"), make_bundle(tmp_path / "b", "B")
    try:
        files.exchange(a, b)
    except VlExportError as exc:
        pytest.skip(f"this filesystem has no atomic exchange: {exc}")
    assert (a / "manifest.json").read_text() == "B" and (b / "manifest.json").read_text() == "A"


def test_staging_left_by_a_killed_run_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".bundle.partial-{dead.stdout.strip()}-abc"
    live = tmp_path / f".bundle.partial-{os.getpid()}-def"
    stale.mkdir()
    live.mkdir()
    other = tmp_path / ".other.partial-1-x"
    other.mkdir()
    with files.staged_directory(tmp_path / "bundle", overwrite=False) as staging:
        (staging / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bundle", live.name, other.name])
