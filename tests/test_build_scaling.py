"""A build that scales: one calibration pass gives ONNX Runtime's own ranges, memory is measured per step, long
steps report counted progress, and a rebuild says what it reused."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from vl_export.runtime import Pipeline


def ranges_of(path):
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {name: np.asarray(t.range_value, np.float64).ravel() for name, t in load_tensors_data(path).data.items()}


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_one_pass_ranges_equal_onnxruntimes_graph_by_graph_calibration(bundle_fp32, tmp_path, method):
    from vl_export.calibration import quantize
    from vl_export.calibration.data import CalibrationSet
    from vl_export.calibration.ranges import VisionCalibration, calibrate_vision_and_projector

    pipe = Pipeline.from_bundle(bundle_fp32, lazy=True)
    data = CalibrationSet.from_paths(None, None)
    data.images = data.images[:3]  # 7 + 3 + 1 tiles: every tiling shape, a short test
    ops = ("MatMul", "Gemm", "Conv")
    # Graph by graph, as the build did before: the projector's features from a second vision pass.
    quantize.calibrate(bundle_fp32 / "vision_encoder.onnx", lambda: data.vision_feeds(pipe), method, tmp_path / "v0.json", ops)
    quantize.calibrate(bundle_fp32 / "projector.onnx", lambda: data.projector_feeds(pipe), method, tmp_path / "p0.json", ops)
    job = VisionCalibration(bundle_fp32 / "vision_encoder.onnx", bundle_fp32 / "projector.onnx",
                            tmp_path / "v1.json", tmp_path / "p1.json")
    tiles = data.tiles(pipe)
    assert len(tiles) == len(list(tiles)) == 11  # counted from the tiling rule, made lazily
    assert calibrate_vision_and_projector(job, tiles, method, lambda _: None) == []
    for before, after in (("v0.json", "v1.json"), ("p0.json", "p1.json")):
        want, got = ranges_of(tmp_path / before), ranges_of(tmp_path / after)
        assert want.keys() == got.keys() and len(want) >= 4
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_lean_calibration_session_gives_onnxruntimes_untouched_ranges(bundle_fp32, tmp_path):
    """quantize.lean_session (priority order, no memory pattern: an eighth of the peak RSS) changes
    allocation and order, not ranges: the same tiles through ONNX Runtime's calibrator exactly as ONNX Runtime sets
    it up give the same ranges."""
    import onnxruntime as ort

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from vl_export.calibration import quantize
    from vl_export.calibration.data import CalibrationSet

    pipe = Pipeline.from_bundle(bundle_fp32, lazy=True)
    data = CalibrationSet.from_paths(None, None)
    data.images = data.images[:2]
    ops = ("MatMul", "Gemm", "Conv")
    src = bundle_fp32 / "vision_encoder.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(list(data.vision_feeds(pipe)))

        def get_next(self):
            return next(self.feeds, None)

    import onnx

    untouched = create_calibrator(src, list(ops), augmented_model_path=str(tmp_path / "augmented.onnx"),
                                  calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
    assert untouched.infer_session.get_session_options().enable_mem_pattern  # ONNX Runtime's own defaults
    untouched.collect_data(Reader())
    save_tensors_data(untouched.compute_data(), tmp_path / "ort.json")
    quantize.lean_session(untouched)  # what quantize.calibrate and ranges.GraphRanges do to theirs
    options = untouched.infer_session.get_session_options()
    assert not options.enable_mem_pattern
    assert options.execution_order == ort.ExecutionOrder.PRIORITY_BASED
    quantize.calibrate(src, lambda: data.vision_feeds(pipe), "minmax", tmp_path / "lean.json", ops)
    # The build's large graphs keep their weights in external data, which the lean calibrator never loads itself.
    external = tmp_path / "external" / "vision_encoder.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(external), save_as_external_data=True, location=external.name + ".data",
                    size_threshold=256)  # as the exporter's onnx_ir.save: shape constants stay inline
    quantize.calibrate(external, lambda: data.vision_feeds(pipe), "minmax", tmp_path / "external.json", ops)
    assert sorted(p.name for p in external.parent.iterdir()) == ["vision_encoder.onnx", "vision_encoder.onnx.data"]
    want = ranges_of(tmp_path / "ort.json")
    for got in (ranges_of(tmp_path / "lean.json"), ranges_of(tmp_path / "external.json")):
        assert want.keys() == got.keys() and len(want) >= 4
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_one_pass_reuses_a_cached_graph_and_calibrates_only_the_other(bundle_fp32, tmp_path):
    from vl_export.calibration.data import CalibrationSet
    from vl_export.calibration.ranges import VisionCalibration, calibrate_vision_and_projector

    pipe = Pipeline.from_bundle(bundle_fp32, lazy=True)
    data = CalibrationSet.from_paths(None, None)
    tiles = list(data.tiles(pipe))[:4]
    job = VisionCalibration(bundle_fp32 / "vision_encoder.onnx", bundle_fp32 / "projector.onnx",
                            tmp_path / "v.json", tmp_path / "p.json")
    calibrate_vision_and_projector(job, tiles, "minmax", lambda _: None)
    projector_ranges = ranges_of(tmp_path / "p.json")
    (tmp_path / "p.json").unlink()  # as if the build had crashed between the two graphs
    stamp = (tmp_path / "v.json").stat().st_mtime_ns
    assert calibrate_vision_and_projector(job, tiles, "minmax", lambda _: None) == ["vision_encoder"]
    assert (tmp_path / "v.json").stat().st_mtime_ns == stamp  # not recomputed
    again = ranges_of(tmp_path / "p.json")
    assert again.keys() == projector_ranges.keys()
    for name in again:
        np.testing.assert_allclose(again[name], projector_ranges[name], rtol=1e-6)


def test_peak_window_sees_an_allocation_and_nested_windows_keep_the_outer_peak():
    from vl_export.memory import PeakWindow, release, reset_peak

    if not reset_peak():
        pytest.skip("this platform cannot reset the peak RSS counter (/proc/self/clear_refs)")
    release()
    size = 300 * 2**20
    with PeakWindow() as outer:
        block = np.ones(size // 8)  # touched: resident
        del block
        release()
        with PeakWindow() as inner:
            small = np.ones(2**20)
        del small
    assert outer.peak >= size
    assert inner.peak < outer.peak - size // 2  # the inner window began after the large block was freed


def test_counted_progress_prints_counts_and_an_estimate_when_not_a_terminal(monkeypatch):
    from vl_export import progress_bar

    lines = []
    monkeypatch.setattr(progress_bar, "PLAIN_EVERY_S", 0.0)
    assert list(progress_bar.counted([1, 2, 3], lines.append, "calibrating", "tiles")) == [1, 2, 3]
    assert [line.split(",")[0] for line in lines] == ["calibrating: 1/3 tiles", "calibrating: 2/3 tiles",
                                                      "calibrating: 3/3 tiles"]
    assert "s left" in lines[0] and "s left" not in lines[-1]


def test_checkpoint_reads_safetensors_without_a_memory_map_and_refuses_a_truncated_file(tmp_path):
    """Regression: load_file's memory map kept the whole bf16 checkpoint resident while it was upcast (5.6 GiB peak
    loading the 1B instead of about 3.6)."""
    import torch
    from safetensors.torch import load_file, save_file

    from vl_export.errors import CheckpointError
    from vl_export.export.checkpoint import read_safetensors

    state = {"w": torch.randn(3, 4).to(torch.bfloat16), "b": torch.randn(5), "scalar": torch.tensor(3.0),
             "empty": torch.zeros(0, 4), "ids": torch.arange(7), "half": torch.randn(2, 2).half()}
    save_file(state, tmp_path / "m.safetensors")
    want, got = load_file(tmp_path / "m.safetensors"), read_safetensors(tmp_path / "m.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_a_graphs_torch_weights_are_freed_once_it_is_exported(tiny, tmp_path):
    """After the decoder's export with release_weights, nothing keeps its parameters alive: onnxscript's rewrite
    rules used to hold the last graph they matched, and through its initializers every torch weight of it."""
    import gc
    import weakref

    from vl_export.export.bundle import load_checkpoint
    from vl_export.export.onnx_export import export_graph

    ck = load_checkpoint(str(tiny["original"]), lambda _: None)
    layer = ck.model.model.language_model.layers[0]
    weights = [weakref.ref(layer.mlp.up_proj.weight), weakref.ref(layer.self_attn.q_proj.weight),
               weakref.ref(ck.model.lm_head.weight)]
    kept = weakref.ref(next(ck.model.model.vision_tower.parameters()))  # another graph's
    del layer
    export_graph("decoder", ck.model, ck.spec, "fp32", tmp_path, release_weights=True)
    gc.collect()
    assert [w() is None for w in weights] == [True, True, True]
    assert kept() is not None and kept().device.type == "cpu"


def _graph_parts(path):
    import onnx
    from onnx import numpy_helper

    from vl_export.calibration.quantize import count_ops

    return count_ops(path), {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("role", ["decoder", "vision_encoder (fused for onnxruntime)"])
def test_streamed_dynamic_int8_writes_onnxruntimes_quantize_dynamic_graph(bundle_fp32, tmp_path, role):
    """calibration/dynamic.py (weight by weight, the build's dynamic INT8) against ONNX Runtime's quantize_dynamic
    with the settings it replaces: the same nodes, the same int8 weights and scales under the same names, and the
    same outputs to the bit. The source is read from external data, as the build's large graphs are."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vl_export.calibration import dynamic
    from vl_export.calibration.ort_fusions import fuse_for_onnxruntime
    from vl_export.export.onnx_export import example_inputs, graph_io
    from vl_export.manifest import Manifest

    name = role.split()[0]
    src = tmp_path / "src.onnx"
    if name == "vision_encoder":
        fuse_for_onnxruntime(bundle_fp32 / "vision_encoder.onnx", tmp_path / "fused.onnx")
        model = onnx.load(str(tmp_path / "fused.onnx"))
    else:
        model = onnx.load(str(bundle_fp32 / "decoder.onnx"))
    onnx.save_model(model, str(src), save_as_external_data=True, location="src.onnx.data", size_threshold=0)
    assert (tmp_path / "src.onnx.data").stat().st_size > 100_000

    quantize_dynamic(str(src), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})
    count = dynamic.dynamic_int8(src, tmp_path / "ours.onnx")

    want_ops, want_init = _graph_parts(tmp_path / "ort.onnx")
    got_ops, got_init = _graph_parts(tmp_path / "ours.onnx")
    assert count == want_ops["MatMulInteger"] >= 4
    assert got_ops == want_ops
    assert got_init.keys() == want_init.keys()
    for key, want in want_init.items():
        assert got_init[key].dtype == want.dtype and np.array_equal(got_init[key], want), key
    spec = Manifest.load(bundle_fp32).model
    feeds = example_inputs(graph_io(name, spec, "fp32")[0], seed=3)
    runs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feeds)
            for f in ("ort.onnx", "ours.onnx")]
    for want, got in zip(*runs):
        assert np.array_equal(got, want)


def test_the_fused_vision_variant_reads_the_weights_from_its_sources_data(bundle_fp32, tmp_path):
    """The ONNX Runtime vision variant of a graph whose weights are in external data (as the build's vision encoder
    is) fuses the graph alone, pointing into the source's data file, and quantizes weight by weight: the same graph
    and outputs to the bit as from the same graph held whole, and nothing of the fused fp32 graph is left behind."""
    import onnx
    import onnxruntime as ort

    from vl_export.calibration import quantize
    from vl_export.calibration.ort_fusions import fuse_for_onnxruntime
    from vl_export.export.onnx_export import example_inputs, graph_io
    from vl_export.manifest import Manifest

    staging = tmp_path / "staging"
    staging.mkdir()
    src = staging / "vision_encoder.onnx"
    model = onnx.load(str(bundle_fp32 / "vision_encoder.onnx"))
    onnx.save_model(model, str(src), save_as_external_data=True, location=src.name + ".data", size_threshold=0)
    quantize.fused_dynamic_int8(bundle_fp32 / "vision_encoder.onnx", tmp_path / "whole.onnx")
    quantize.fused_dynamic_int8(src, staging / "streamed.onnx")
    assert sorted(p.name for p in staging.iterdir()) == ["streamed.onnx", "vision_encoder.onnx", "vision_encoder.onnx.data"]
    elsewhere = tmp_path / "elsewhere" / "fused.onnx"  # a fused graph written away from its source takes the weights
    elsewhere.parent.mkdir()
    assert fuse_for_onnxruntime(src, elsewhere)["MultiHeadAttention"] >= 1
    want_ops, want_init = _graph_parts(tmp_path / "whole.onnx")
    got_ops, got_init = _graph_parts(staging / "streamed.onnx")
    assert got_ops == want_ops and got_ops["MultiHeadAttention"] >= 1 and got_ops["MatMulInteger"] >= 4
    assert got_init.keys() == want_init.keys()
    for key, want in want_init.items():
        assert np.array_equal(got_init[key], want), key
    feeds = example_inputs(graph_io("vision_encoder", Manifest.load(bundle_fp32).model, "fp32")[0], seed=3)
    runs = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds)
            for f in (tmp_path / "whole.onnx", staging / "streamed.onnx", elsewhere)]
    assert np.array_equal(runs[1][0], runs[0][0])
    plain = ort.InferenceSession(str(bundle_fp32 / "vision_encoder.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(runs[2][0], plain[0], rtol=1e-4, atol=1e-4)  # the fused fp32 graph computes the same


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_embedding_table_is_written_in_chunks_to_the_file_np_save_writes(tiny, tmp_path, monkeypatch, precision):
    """write_embeddings converts and writes a chunk of rows at a time (no whole fp32 and converted copies beside the
    model): byte for byte the .npy np.save writes from the whole table, chunks not dividing the vocabulary."""
    from vl_export.export import bundle

    ck = bundle.load_checkpoint(str(tiny["original"]), lambda _: None, stored_dtype=True)
    monkeypatch.setattr(bundle, "EMBED_CHUNK_ROWS", 7)
    entry = bundle.write_embeddings(ck.model, tmp_path, precision)
    weight = ck.model.model.language_model.embed_tokens.weight.detach()
    want = weight.float().numpy().astype(np.float32 if precision == "fp32" else np.float16)
    assert weight.shape[0] % 7 != 0
    np.save(tmp_path / "want.npy", want)
    assert (tmp_path / entry["file"]).read_bytes() == (tmp_path / "want.npy").read_bytes()
    assert entry == {"file": entry["file"], "dtype": str(want.dtype), "shape": list(want.shape)}


@pytest.mark.parametrize("layout", ["original", "native"])
def test_a_bf16_checkpoint_is_held_in_bf16_and_exports_the_graphs_of_its_fp32_load(tiny, tmp_path, layout, monkeypatch):
    """The exporter keeps a bf16 checkpoint in bf16 and upcasts each graph's weights just before its export: the
    graphs (every initializer, to the bit) are those exported from the same checkpoint loaded whole in fp32. Graphs
    over EXTERNAL_DATA_BYTES (lowered here so the tiny ones cross it) go to external data and pass the checker."""
    import onnx
    from onnx import numpy_helper

    from tiny_models import original_state_dict, write_original
    from vl_export.export import checkpoint, onnx_export
    from vl_export.export.onnx_export import export_graph

    model = tiny["model"]
    if layout == "original":
        state = {k: v.to(torch.bfloat16) for k, v in original_state_dict(model).items()}
        path = write_original(model, json.loads((tiny["original"] / "config.json").read_text()),
                              tiny["original"].parent / "tokenizer", tmp_path / "ck", state=state)
    else:
        path = tmp_path / "ck"
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)  # the session's tiny model stays fp32
        for file in tiny["native"].iterdir():
            if not file.name.startswith(("model", "config")):
                shutil.copy(file, path / file.name)
    held = checkpoint.load(path, stored_dtype=True)
    assert {p.dtype for p in held.model.parameters()} == {torch.bfloat16}
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 10_000)
    whole = checkpoint.load(path)
    for role in ("decoder", "vision_encoder", "projector"):
        graphs = {}
        for name, ck in (("held", held), ("whole", whole)):
            out = tmp_path / name
            out.mkdir(exist_ok=True)
            entry = export_graph(role, ck.model, ck.spec, "fp32", out, release_weights=True)
            assert (out / (entry.file + ".data")).is_file()
            graphs[name] = {t.name: numpy_helper.to_array(t, base_dir=str(out))
                            for t in onnx.load(str(out / entry.file), load_external_data=False).graph.initializer}
        assert graphs["held"].keys() == graphs["whole"].keys() and graphs["held"]
        for key, want in graphs["whole"].items():
            assert graphs["held"][key].dtype == want.dtype, key
            assert np.array_equal(graphs["held"][key], want), (role, key)


def test_tile_cap_sees_every_image_whole_first_then_crops_spread_in_turns():
    from vl_export.calibration.data import chosen_tiles

    crops, thumbs = [6, 2, 1, 3], [True, True, False, True]  # a 3x2 photo, a 1x2, a single tile, a 3x1
    assert chosen_tiles(crops, thumbs, None) == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2], [0], [0, 1, 2, 3]]
    assert chosen_tiles(crops, thumbs, 100) == chosen_tiles(crops, thumbs, None)
    assert chosen_tiles(crops, thumbs, 2) == [[6], [2], [], []]  # whole views (thumbnails are last) before any crop
    assert chosen_tiles(crops, thumbs, 4) == [[6], [2], [0], [3]]
    assert chosen_tiles(crops, thumbs, 7) == [[3, 6], [1, 2], [0], [1, 3]]  # then one crop each, the centre one
    assert chosen_tiles(crops, thumbs, 9) == [[1, 4, 6], [0, 1, 2], [0], [1, 3]]  # crops spread over the grid
    assert chosen_tiles([4], [False], 2) == [[1, 3]]  # no thumbnail (use_thumbnail off): crops only


def test_capped_calibration_tiles_are_the_runtimes_own_tiles(bundle_fp32):
    from vl_export.calibration.data import CalibrationSet, chosen_tiles

    pipe = Pipeline.from_bundle(bundle_fp32, lazy=True)
    data = CalibrationSet.from_paths(None, None, max_tiles=5)
    data.images = data.images[:3]  # 7 + 3 + 1 tiles
    tiles = data.tiles(pipe)
    got = list(tiles)
    assert len(tiles) == len(got) == 5 and tiles.total == 11
    want = [pipe.prepare("", images=[image]).pixel_values[i : i + 1]
            for image, chosen in zip(data.images, chosen_tiles([6, 2, 1], [True, True, False], 5)) for i in chosen]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    # Another cap calibrates on other tiles: it is another calibration data set, with another cache key.
    assert CalibrationSet(max_tiles=5).sha256() != CalibrationSet(max_tiles=None).sha256()


def test_calib_tiles_must_be_a_count_or_all(capsys, tmp_path):
    from vl_export.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["build", "--model", "random:tiny", "--out", str(tmp_path / "b"), "--precision", "int8", "--calib-tiles", "0"])
    assert exit_.value.code == 2 and "expected a number of tiles >= 1 or 'all'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("how", ["weight_only_int8", "dynamic_int8"])
def test_quantized_weights_streamed_to_external_data_are_the_inline_graph(bundle_fp32, tmp_path, monkeypatch, how):
    """Above quantize.STREAM_BYTES of int8 weights (the 1B's decoders), each weight goes to the graph's external data
    as it is made: the same graph and values as written inline, page-aligned, and ONNX Runtime runs it the same."""
    import onnx
    import onnxruntime as ort

    from vl_export.calibration import quantize

    src = bundle_fp32 / "decoder.onnx"
    getattr(quantize, how)(src, tmp_path / "inline.onnx")
    monkeypatch.setattr(quantize, "STREAM_BYTES", 0)
    (tmp_path / "streamed").mkdir()
    getattr(quantize, how)(src, tmp_path / "streamed" / "q.onnx")
    data = tmp_path / "streamed" / "q.onnx.data"
    header = onnx.load(str(tmp_path / "streamed" / "q.onnx"), load_external_data=False)
    external = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert len(external) >= 7 * layers_of(bundle_fp32) and all(o % 4096 == 0 for o in offsets)
    assert data.stat().st_size >= sum(int(np.prod(t.dims)) for t in external)
    inline, streamed = onnx.load(str(tmp_path / "inline.onnx")), onnx.load(str(tmp_path / "streamed" / "q.onnx"))
    assert [n.SerializeToString() for n in inline.graph.node] == [n.SerializeToString() for n in streamed.graph.node]
    want = {t.name: onnx.numpy_helper.to_array(t) for t in inline.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in streamed.graph.initializer}
    assert want.keys() == got.keys() and all(np.array_equal(want[n], got[n]) for n in want)
    feed = feeds_of(bundle_fp32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]  # noqa: E731
    np.testing.assert_array_equal(run(tmp_path / "streamed" / "q.onnx"), run(tmp_path / "inline.onnx"))


def layers_of(bundle) -> int:
    from vl_export.manifest import Manifest

    return Manifest.load(bundle).model.text.num_layers


def feeds_of(bundle) -> dict[str, np.ndarray]:
    """A 3-token prefill feed for the bundle's fp32 decoder."""
    from vl_export.manifest import Manifest

    spec = Manifest.load(bundle).model.text
    feed = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, 3, spec.hidden_size)).astype(np.float32),
            "attention_mask": np.ones((1, 3), np.int64), "position_ids": np.arange(3, dtype=np.int64)[None],
            "logits_positions": np.array([[2]], np.int64)}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    return feed
