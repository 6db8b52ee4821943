"""A bundle is untrusted input: files confined to it, graphs checked against their hashes, every number bounded.

Each test edits a copy of the tiny fp32 bundle the way a hostile or careless person would and expects one line,
exit 2, naming what is wrong; before these checks each of them answered, hung or raised a traceback.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from vl_export import integrity
from vl_export.cli import main
from vl_export.errors import BundleError, InputError
from vl_export.manifest import Manifest
from vl_export.runtime import Pipeline
from vl_export.runtime.preprocess import TilingConfig, preprocess, target_grids


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and stderr; a traceback or more than one error line fails the test."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("vl-export: error:")]
    assert len(errors) == (1 if code else 0), err
    return code, errors[0] if errors else ""


def ask(capsys, bundle, *extra) -> tuple[int, str]:
    return run_cli(capsys, "run", "--bundle", bundle, "--prompt", "Hello", "--max-new-tokens", "2", "--threads", "1", *extra)


@pytest.fixture
def copy(bundle_fp32, tmp_path):
    """A fresh copy of the tiny bundle in tmp/bundle, and a second whole copy in tmp/outside (a genuine bundle's
    files a hostile manifest might point at)."""
    shutil.copytree(bundle_fp32, tmp_path / "bundle")
    shutil.copytree(bundle_fp32, tmp_path / "outside")
    return tmp_path / "bundle"


def edit_manifest(bundle, edit) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- 1. paths out of the bundle -------------------------------------------------------------------------------


@pytest.mark.parametrize("field, edit", [
    ("tokenizer", lambda d, out: d.update(tokenizer="../outside/tokenizer.json")),
    ("tokenizer", lambda d, out: d.update(tokenizer="/etc/passwd")),
    ("tokenizer", lambda d, out: d.update(tokenizer=str(out / "tokenizer.json"))),
    ("embed_tokens.file", lambda d, out: d["embed_tokens"].update(file="../outside/embed_tokens.npy")),
    ("graphs[2].file", lambda d, out: d["graphs"][2].update(file="../outside/decoder.onnx")),
    ("graphs[0].file", lambda d, out: d["graphs"][0].update(file="sub/../../outside/vision_encoder.onnx")),
])
def test_manifest_paths_out_of_the_bundle_are_refused_by_field(capsys, copy, field, edit):
    edit_manifest(copy, lambda d: edit(d, copy.parent / "outside"))
    code, err = ask(capsys, copy)
    assert code == 2 and f"manifest field {field}" in err and ("outside the bundle" in err or "relative path" in err)


@pytest.mark.parametrize("name, field", [("tokenizer.json", "tokenizer"), ("decoder.onnx", "graphs[2].file"),
                                         ("embed_tokens.npy", "embed_tokens.file"), ("manifest.json", "manifest.json")])
def test_symlinks_to_files_outside_the_bundle_are_refused(capsys, copy, name, field):
    (copy / name).unlink()
    (copy / name).symlink_to(copy.parent / "outside" / name)
    code, err = ask(capsys, copy)
    assert code == 2 and f"manifest field {field}" in err and "outside the bundle" in err


def test_a_symlink_inside_the_bundle_is_fine(capsys, copy):
    (copy / "graphs").mkdir()
    shutil.move(copy / "decoder.onnx", copy / "graphs" / "decoder.onnx")
    (copy / "decoder.onnx").symlink_to("graphs/decoder.onnx")
    code, _ = ask(capsys, copy)
    assert code == 0


# --- 2. hashes and the OpenVINO IR cache ------------------------------------------------------------------------


@pytest.mark.parametrize("sha", ["../../../../tmp/evil", "A" * 64, "0" * 63, None, 7])
def test_a_sha256_that_is_not_64_lowercase_hex_is_refused(copy, sha):
    edit_manifest(copy, lambda d: d["graphs"][1].update(sha256=sha))
    with pytest.raises(BundleError, match=r"manifest field graphs\[1\].sha256 must be 64 lowercase hex"):
        Manifest.load(copy)


def test_openvino_ir_names_come_from_the_verified_hash_and_stay_in_the_cache(copy, tmp_path):
    pytest.importorskip("openvino")
    from vl_export.runtime.backends import ov_cache

    manifest = Manifest.load(copy)
    entry = manifest.graph("projector")
    name = ov_cache.ir_name(copy, entry, "2026.4.1-1-abc")
    assert name == f"projector.{entry.sha256[:16]}.ov2026.4.1-1.xml"
    # A claim that is not the file's content is refused, so it can never name (or poison) a cache entry.
    import dataclasses

    forged = dataclasses.replace(entry, sha256="0" * 64)
    with pytest.raises(BundleError, match="projector.onnx does not match the sha256"):
        ov_cache.ir_name(copy, forged, "2026.4.1-1-abc")
    with pytest.raises(BundleError, match="outside"):
        ov_cache.cache_path(tmp_path / "cache", "../escape.xml")


def test_a_hostile_bundle_cannot_poison_the_openvino_cache_of_a_genuine_one(capsys, copy, tmp_path):
    """The hostile bundle claims the genuine projector's hash for its own projector: refused before any IR is written."""
    pytest.importorskip("openvino")
    hostile = tmp_path / "outside"
    genuine_sha = json.loads((copy / "manifest.json").read_text())["graphs"][1]["sha256"]
    shutil.copy(hostile / "vision_encoder.onnx", hostile / "projector.onnx")  # some other graph
    edit_manifest(hostile, lambda d: d["graphs"][1].update(sha256=genuine_sha))
    cache = tmp_path / "shared-cache"
    code, err = ask(capsys, hostile, "--backend", "openvino", "--option", f"cache_dir={cache}")
    assert code == 2 and "projector.onnx does not match the sha256" in err
    assert not list(cache.glob("projector.*.xml"))


# --- 5. integrity at load ---------------------------------------------------------------------------------------


def test_a_modified_graph_is_refused_naming_the_file(capsys, copy):
    data = bytearray((copy / "decoder.onnx").read_bytes())
    data[-1] ^= 0x01  # one bit of the last initializer
    (copy / "decoder.onnx").write_bytes(bytes(data))
    code, err = ask(capsys, copy)
    assert code == 2 and "decoder.onnx does not match the sha256 in the manifest" in err


def test_verified_files_are_remembered_by_identity_not_rehashed(copy, monkeypatch):
    hashed = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    monkeypatch.setattr(integrity, "_memo", {})
    Pipeline.from_bundle(copy, threads=1)
    assert sorted(hashed) == ["decoder.onnx", "projector.onnx", "vision_encoder.onnx"]
    integrity._memo.clear()  # a new process: the identity file in the user cache remembers them
    Pipeline.from_bundle(copy, threads=1)
    assert len(hashed) == 3
    stat = os.stat(copy / "projector.onnx")
    os.utime(copy / "projector.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: checked again
    Pipeline.from_bundle(copy, threads=1)
    assert hashed[3:] == ["projector.onnx"]


def test_the_embedding_table_is_checked_against_the_manifest_and_the_tokenizer(copy):
    table = np.load(copy / "embed_tokens.npy")
    np.save(copy / "embed_tokens.npy", table.astype(np.float16))
    with pytest.raises(BundleError, match=r"embed_tokens.npy holds float16 \[524, 64\] but the manifest says float32"):
        Pipeline.from_bundle(copy, threads=1)
    np.save(copy / "embed_tokens.npy", table[:520])
    edit_manifest(copy, lambda d: d["embed_tokens"].update(shape=[520, 64]))
    with pytest.raises(BundleError, match="the tokenizer has 524 tokens but embed_tokens.npy only 520 rows"):
        Pipeline.from_bundle(copy, threads=1)


# --- 6 and 8. numbers and shapes in the manifest ----------------------------------------------------------------


def swap_roles(d):
    d["graphs"][0]["role"], d["graphs"][1]["role"] = d["graphs"][1]["role"], d["graphs"][0]["role"]


def kv(d, key, value):
    d["graphs"][2]["inputs"][4][key] = value


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["preprocessing"].update(max_tiles=10**9), "preprocessing.max_tiles must be in [1, 256]"),
    (lambda d: d.update(max_context=10**12), "max_context must be in [2, 1048576]"),
    (lambda d: d["preprocessing"].update(image_size=0), "preprocessing.image_size must be in [1, 4096]"),
    (lambda d: d["preprocessing"].update(min_tiles="1"), "preprocessing.min_tiles must be an integer, got '1'"),
    (lambda d: d["preprocessing"].update(use_thumbnail=1), "preprocessing.use_thumbnail must be true or false"),
    (lambda d: d["preprocessing"].update(std=[0.2, 0.0, 0.2]), "preprocessing.std must be three finite numbers"),
    (lambda d: d["special_tokens"].pop("<|im_end|>"), "special_tokens lacks <|im_end|>"),
    (lambda d: d["special_tokens"].update({"<img>": 10**6}), "special_tokens.<img> is 1000000, beyond the embedding"),
    (lambda d: d["embed_tokens"].update(shape=[524, 65]), "embed_tokens.shape has width 65 but the decoder's hidden size is 64"),
    (swap_roles, "graphs[0].inputs lacks vision_features (is this the projector graph?)"),
    (lambda d: kv(d, "shape", ["batch", 3, "past", 16]), "must be [batch, "),
    (lambda d: kv(d, "dtype", "int64"), "dtype must be float32 or float16, got 'int64'"),
    (lambda d: d["graphs"][2]["inputs"].pop(4), "past_key_values tensors, the model's"),
    (lambda d: d["model"]["text"].update(num_layers=-1), "model.text.num_layers must be in [1,"),
    (lambda d: d.update(graphs={}), "graphs must be a list"),
    (lambda d: d.update(template="llama"), "template 'llama' is not supported"),
    (lambda d: d["graphs"].pop(0), "graphs has no vision_encoder graph"),
])
def test_malformed_manifests_are_refused_with_one_line_naming_the_field(capsys, copy, edit, message):
    edit_manifest(copy, edit)
    code, err = ask(capsys, copy)
    assert code == 2 and message in err


def test_swapped_graph_files_fail_their_hashes(capsys, copy):
    def swap(d):
        d["graphs"][0]["file"], d["graphs"][1]["file"] = d["graphs"][1]["file"], d["graphs"][0]["file"]

    edit_manifest(copy, swap)
    code, err = ask(capsys, copy)
    assert code == 2 and "does not match the sha256" in err


def test_manifest_json_that_is_not_json_or_nested_too_deeply(capsys, copy):
    (copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = ask(capsys, copy)
    assert code == 2 and "nested too deeply" in err
    (copy / "manifest.json").write_bytes(b"\xff\xfe{")
    code, err = ask(capsys, copy)
    assert code == 2 and "not valid JSON" in err


def reference_grids(min_num, max_num):
    """InternVL2.5's dynamic_preprocess target ratios, verbatim."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def test_the_tiling_grid_search_is_the_reference_order_and_fast():
    for low in range(1, 13):
        for high in range(low, 41):
            assert target_grids(low, high) == reference_grids(low, high), (low, high)
    start = time.perf_counter()
    grids = target_grids(1, 256)
    assert time.perf_counter() - start < 0.5 and len(grids) == sum(256 // i for i in range(1, 257))
    with pytest.raises(InputError, match="not a valid range"):
        target_grids(1, 10**9)


# --- 6 and 8. images, videos, flags in run and chat -------------------------------------------------------------


def bomb_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, "PNG")  # a few kB on disk, side x side pixels decoded
    return out.getvalue()


def test_run_refuses_a_decompression_bomb_from_its_header(capsys, bundle_fp32, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(12_000))  # 144 megapixels
    code, err = ask(capsys, bundle_fp32, "--image", tmp_path / "bomb.png")
    assert code == 2 and "12000x12000 = 144000000 pixels, over the limit of 64000000" in err
    (tmp_path / "bigger.png").write_bytes(bomb_png(20_000))  # PIL's own bomb error without the check
    code, err = ask(capsys, bundle_fp32, "--image", tmp_path / "bigger.png")
    assert code == 2 and "over the limit of 64000000" in err


def test_chat_survives_a_decompression_bomb(bundle_fp32, tmp_path):
    from vl_export.runtime import GenerationConfig
    from vl_export.runtime.interactive import chat_loop

    (tmp_path / "bomb.png").write_bytes(bomb_png(12_000))
    out = io.StringIO()
    code = chat_loop(Pipeline.from_bundle(bundle_fp32, threads=1), GenerationConfig(max_new_tokens=2),
                     stdin=io.StringIO(f"/image {tmp_path / 'bomb.png'}\nHello\n/exit\n"), stdout=out)
    assert code == 0 and "over the limit of 64000000" in out.getvalue()
    assert out.getvalue().count("> ") == 3  # the conversation went on to the question and the exit


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--seed", "-1"], "seed must be in [0, 2**63)"),
    (["--video", "clip.mp4", "--frames", "0"], "number of video frames must be in [1, 1024], got 0"),
    (["--video", "clip.mp4", "--frames", "-3"], "got -3"),
    (["--max-tiles", "1000000000", "--image", "x.png"], None),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--prompt", "caf\udce9"], "text is not valid UTF-8"),
])
def test_bad_flags_are_one_line_and_exit_2(capsys, bundle_fp32, tmp_path, flags, message):
    if "x.png" in flags:
        Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
        flags = [str(tmp_path / "x.png") if f == "x.png" else f for f in flags]
        message = "not a valid range"
    code, err = ask(capsys, bundle_fp32, *flags)
    assert code == 2 and message in err


def test_video_keeps_only_the_sampled_frames(monkeypatch, tmp_path):
    av = pytest.importorskip("av")
    from vl_export.runtime import preprocess as pre

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 4, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    kept = []
    real = pre.read_video_frames
    monkeypatch.setattr(pre, "read_video_frames", lambda video, keep=None: kept.append(real(video, keep)) or kept[-1])
    pixel_values, tiles = pre.preprocess_video(path, 4, TilingConfig(image_size=28))
    assert tiles == [1, 1, 1, 1] and pixel_values.shape == (4, 3, 28, 28)
    assert sorted(kept[0]) == pre.frame_indices(60, 10.0, 4)  # 4 decoded frames held, not 60


def test_preprocess_refuses_tile_limits_beyond_the_bound():
    with pytest.raises(InputError, match="not a valid range"):
        preprocess(Image.new("RGB", (32, 32)), TilingConfig(max_tiles=10**9))


def test_tensorrt_plans_named_outside_the_bundle_are_refused(tmp_path):
    from test_tensorrt import engines_for

    from vl_export.engines import ENGINES_DIR, Engines

    engines_for(tmp_path)
    path = tmp_path / ENGINES_DIR / "engines.json"
    data = json.loads(path.read_text())
    (tmp_path.parent / "elsewhere.plan").write_bytes(b"plan")
    data["engines"]["decoder"]["file"] = "../../elsewhere.plan"
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"engines.json engines.decoder.file 'engines/../../elsewhere.plan' points outside the bundle"):
        Engines.load(tmp_path)
