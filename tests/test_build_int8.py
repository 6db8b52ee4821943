"""`vl-export build`: INT8 and FP16 bundles that run in the runtime and report their accuracy against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

from vl_export.cli import main
from vl_export.errors import VerificationFailed
from vl_export.export.build import BuildConfig, build_bundle
from vl_export.manifest import Manifest
from vl_export.runtime import GenerationConfig, Pipeline

# Thresholds the build's check must meet on the tiny model, vs PyTorch fp32 (the README explains them):
# INT8 vision and projector W8A8 keep cosine >= 0.99; logits >= 0.98 with a weight-only or dynamic INT8 decoder;
# teacher-forced top-1 >= 0.85; at least the first greedy token identical.
INT8_MIN_COSINE = 0.99



BUILD_LINES: list[str] = []  # what the fixture's build printed


@pytest.fixture(scope="module")
def bundle_int8(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "bundle"
    try:
        build_bundle(str(tiny["original"]), out, BuildConfig(precision="int8"), progress=BUILD_LINES.append)
    except VerificationFailed:
        pass  # the bundle is written with its figures; test_int8_bundle_verifies_and_records_its_numbers fails on them
    return out


def stage(manifest, name, metric):
    return next(s for s in manifest.verification["stages"] if s["stage"] == name and s["metric"].startswith(metric))


def test_int8_bundle_verifies_and_records_its_numbers(bundle_int8):
    manifest = Manifest.load(bundle_int8)
    v = manifest.verification
    assert v["passed"] and v["precision"] == "int8" and v["backend"] == "onnxruntime"
    assert stage(manifest, "vision_features", "cosine")["value"] >= INT8_MIN_COSINE
    assert stage(manifest, "image_embeds", "cosine")["value"] >= INT8_MIN_COSINE
    assert stage(manifest, "prefill_logits", "cosine")["value"] >= 0.98
    assert stage(manifest, "teacher_forced_top1", "agreement")["value"] >= 0.85
    assert stage(manifest, "greedy", "match_length")["value"] >= 1
    c = manifest.calibration
    assert c["method"] == "minmax" and c["decoder_recipe"] == "weight-only" and len(c["data_sha256"]) == 64
    assert {(g.role, g.recipe, g.backends) for g in manifest.graphs} == {
        ("vision_encoder", "w8a8-minmax-w7", None), ("projector", "w8a8-minmax-w7", None),
        ("decoder", "weight-only-int8", None), ("vision_encoder", "fused-dynamic-int8-w7", ("onnxruntime",)),
        ("decoder", "matmul-nbits-int8-block128-level4", ("onnxruntime",)),
    }
    assert not (bundle_int8 / "vision_encoder.onnx").exists()  # the fp32 graphs are not shipped


def test_int8_bundle_runs_in_the_runtime(bundle_int8):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (450, 900, 3), dtype=np.uint8))  # 2x1 + thumbnail
    pipe = Pipeline.from_bundle(bundle_int8)
    assert pipe.manifest.graph("decoder", "onnxruntime").file == "decoder.ort-int8.onnx"
    from vl_export.runtime.backends.ort_inplace import OrtStackedDecoder

    assert pipe.manifest.graph("decoder", "onnxruntime").form == "stacked" and isinstance(pipe.decoder, OrtStackedDecoder)
    assert pipe.decoder.kv_dtype == np.float16  # what builds ship (export/decoder_variants.ORT_KV_DTYPE)
    result = pipe.chat("Describe the image.", images=image, generation=GenerationConfig(max_new_tokens=8))
    assert len(result.token_ids) == 8 and result.timings.tiles == 3


def producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_qdq_nodes_sit_exactly_where_the_recipe_says(bundle_int8, tiny):
    layers = tiny["spec"].vision.num_layers
    vision = onnx.load(str(bundle_int8 / "vision_encoder.int8.onnx"))
    weights = {t.name: t for t in vision.graph.initializer}
    made_by = producers(vision)
    ops = [n.op_type for n in vision.graph.node]
    # Per layer: int8 weights behind a DequantizeLinear for q, k, v, proj, fc1, fc2; one activation Q/DQ pair per
    # distinct input (LN1 output shared by q/k/v, attention output, LN2 output, GELU output). The patch conv adds
    # an input pair and weight + bias dequantizers.
    assert ops.count("QuantizeLinear") == 4 * layers + 1
    assert ops.count("DequantizeLinear") == (6 + 4) * layers + 3
    for node in vision.graph.node:
        if node.op_type == "MatMul" and node.input[1] in made_by and made_by[node.input[1]].op_type == "DequantizeLinear":
            dq = made_by[node.input[1]]
            assert weights[dq.input[0]].data_type == onnx.TensorProto.INT8
            assert made_by[node.input[0]].op_type == "DequantizeLinear"  # the activation is quantized too
        if node.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert made_by.get(node.input[0]) is None or made_by[node.input[0]].op_type != "DequantizeLinear"
    attention = [n for n in vision.graph.node if n.op_type == "MatMul" and n.input[1] not in weights
                 and made_by[n.input[1]].op_type != "DequantizeLinear"]
    assert len(attention) == 2 * layers  # QK^T and PV stay float
    for q in (n for n in vision.graph.node if n.op_type == "QuantizeLinear"):
        zero_point = weights.get(q.input[2]) if len(q.input) > 2 else None
        assert zero_point is None or (zero_point.data_type == onnx.TensorProto.INT8 and not any(onnx.numpy_helper.to_array(zero_point).ravel()))

    decoder = onnx.load(str(bundle_int8 / "decoder.int8.onnx"))
    dops = [n.op_type for n in decoder.graph.node]
    text_layers = tiny["spec"].text.num_layers
    assert dops.count("QuantizeLinear") == 0  # weight-only: activations stay float
    assert dops.count("DequantizeLinear") == 7 * text_layers + 1  # q, k, v, o, gate, up, down per layer + lm_head

    projector = [n.op_type for n in onnx.load(str(bundle_int8 / "projector.int8.onnx")).graph.node]
    assert projector.count("QuantizeLinear") == 2 and projector.count("DequantizeLinear") == 4

    ort_vision = [n.op_type for n in onnx.load(str(bundle_int8 / "vision_encoder.ort-int8.onnx")).graph.node]
    assert ort_vision.count("MatMulInteger") == 6 * layers and "QuantizeLinear" not in ort_vision
    assert ort_vision.count("MultiHeadAttention") == layers and ort_vision.count("Gelu") == layers  # fused for ORT


def test_build_reports_time_and_peak_memory_per_step_decoders_last(bundle_int8):
    done = [line for line in BUILD_LINES if ": done in " in line]
    assert len(done) >= 10 and all(" s, peak RSS " in line and line.endswith(" GiB") for line in done)
    exported = [line.split(" (")[0] for line in done if line.startswith(("exporting ", "building the decoder"))]
    # The vision tower's and projector's weights go first; then both decoders from the language model's weights,
    # the calibration-free INT8 ones quantized as they are built.
    assert exported == ["exporting vision_encoder", "exporting projector",
                        "building the decoder with stacked-group attention and an in-place KV cache", "exporting decoder"]
    assert any("matmul-nbits-int8-block128-level4, straight from the weights" in line for line in done)
    assert any(line.startswith("exporting decoder (weight-only-int8, straight from the weights)") for line in done)
    assert any(line.startswith("calibrating: ") and " tiles" in line for line in BUILD_LINES)  # counted progress


def test_rebuild_on_the_same_data_reuses_the_calibration_cache(bundle_int8, tiny, tmp_path):
    lines = []
    build_bundle(str(tiny["original"]), tmp_path / "again", BuildConfig(precision="int8", verify=False), progress=lines.append)
    assert Manifest.load(tmp_path / "again").calibration["cache_reused_for"] == ["vision_encoder", "projector"]
    said = [line.split(":")[0] for line in lines if "activation ranges reused from the calibration cache" in line]
    assert said == ["vision_encoder", "projector"]
    assert not any(line.startswith("calibrating: ") for line in lines)  # no tile ran again
    # Every tile instead of the default cap is other calibration data: nothing is reused, and the step says so.
    lines.clear()
    build_bundle(str(tiny["original"]), tmp_path / "all", BuildConfig(precision="int8", verify=False, calib_tiles=None),
                 progress=lines.append)
    assert Manifest.load(tmp_path / "all").calibration["cache_reused_for"] == []
    capped = next(line for line in BUILD_LINES if line.startswith("calibrating vision_encoder and projector ("))
    full = next(line for line in lines if line.startswith("calibrating vision_encoder and projector ("))
    assert " of " in capped and " of " not in full, (capped, full)


def test_ranges_of_another_graph_are_not_reused(bundle_int8, tiny, tmp_path, monkeypatch):
    """The cache is keyed by the graph its ranges name tensors of: with the vision encoder exported by torch.onnx (as
    vl-export did before it built that graph from the weights: the same values, other tensor names) it is calibrated
    again; the unchanged projector's ranges are reused."""
    from vl_export.export import graphs_portable

    monkeypatch.delitem(graphs_portable.BUILDERS, "vision_encoder")
    lines = []
    build_bundle(str(tiny["original"]), tmp_path / "other", BuildConfig(precision="int8", verify=False),
                 progress=lines.append)
    assert Manifest.load(tmp_path / "other").calibration["cache_reused_for"] == ["projector"]
    assert any(line.startswith("calibrating: ") for line in lines)


def test_fp16_build_verifies(tiny, tmp_path):
    manifest = build_bundle(str(tiny["original"]), tmp_path / "fp16", BuildConfig(precision="fp16"), progress=lambda _: None)
    assert manifest.verification["passed"] and manifest.verification["precision"] == "fp16"
    assert all(g.precision == "fp16" for g in manifest.graphs)
    assert stage(manifest, "prefill_logits", "cosine")["value"] >= 0.999


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        (lambda d: d.mkdir(), ["--calib-images", "{d}"], "holds no images"),
        (lambda d: (d.mkdir(), (d / "broken.png").write_bytes(b"not a png")), ["--calib-images", "{d}"],
         "broken.png cannot be decoded"),
        (lambda d: None, ["--backend", "trt"], "TensorRT"),
    ],
)
def test_bad_build_input_is_one_line_and_leaves_nothing(capsys, tiny, tmp_path, setup, extra, message):
    data = tmp_path / "calib"
    setup(data)
    code = main(["build", "--model", str(tiny["original"]), "--out", str(tmp_path / "bundle"), "--precision", "int8",
                 *[e.format(d=data) for e in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("vl-export: error:") and message in err[-1]
    assert not (tmp_path / "bundle").exists()


def test_ort_fusions_keep_the_vision_encoder_exact(bundle_fp32, tmp_path, tiny):
    import onnxruntime as ort

    from vl_export.calibration.ort_fusions import fuse_for_onnxruntime

    counts = fuse_for_onnxruntime(bundle_fp32 / "vision_encoder.onnx", tmp_path / "fused.onnx")
    layers = tiny["spec"].vision.num_layers
    assert counts == {"MultiHeadAttention": layers, "Gelu": layers}
    px = np.random.default_rng(0).standard_normal((2, 3, 448, 448)).astype(np.float32)
    want = ort.InferenceSession(str(bundle_fp32 / "vision_encoder.onnx")).run(None, {"pixel_values": px})[0]
    got = ort.InferenceSession(str(tmp_path / "fused.onnx")).run(None, {"pixel_values": px})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# --- SmoothQuant (the decoder's `w8a8-smoothquant` recipe) ----------------------------------------------------


@pytest.fixture(scope="module")
def decoder_feeds(bundle_fp32):
    from vl_export.calibration.data import CalibrationSet

    pipe = Pipeline.from_bundle(bundle_fp32, lazy=True)
    data = CalibrationSet.from_paths(None, None)
    feeds = list(data.decoder_feeds(pipe))
    return lambda: iter(feeds)


def logits_of(path, feed) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0].ravel()


def cos(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def with_outlier_channel(src, dst, factor=60.0):
    """The same function with an activation outlier: channel 5 of layer 0's input norm scaled up by `factor`
    and the rows of q/k/v that read it scaled down (as LLM activations have them: a few huge channels)."""
    from onnx import numpy_helper

    from vl_export.calibration.smoothquant import smooth_pairs

    model = onnx.load(str(src))
    pair = smooth_pairs(model)[0]
    inits = {t.name: t for t in model.graph.initializer}
    g = numpy_helper.to_array(inits[pair.scale]).copy()
    g[5] *= factor
    inits[pair.scale].CopyFrom(numpy_helper.from_array(g, pair.scale))
    for name in pair.weights:
        w = numpy_helper.to_array(inits[name]).copy()
        w[5] /= factor
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, str(dst))


def test_smoothquant_finds_qwen2s_norm_linear_pairs(bundle_fp32, tiny):
    from vl_export.calibration.smoothquant import smooth_pairs

    pairs = smooth_pairs(onnx.load(str(bundle_fp32 / "decoder.onnx")))
    layers = Manifest.load(bundle_fp32).model.text.num_layers
    assert [len(p.weights) for p in pairs] == [3, 2] * layers  # input_layernorm -> q,k,v; post_attention -> gate,up
    assert all("layernorm" in p.scale for p in pairs)


def test_smoothing_leaves_the_fp32_decoder_the_same_function(bundle_fp32, decoder_feeds, tmp_path):
    from vl_export.calibration.smoothquant import smooth

    assert smooth(bundle_fp32 / "decoder.onnx", tmp_path / "smoothed.onnx", decoder_feeds) > 0
    feed = next(decoder_feeds())
    want, got = logits_of(bundle_fp32 / "decoder.onnx", feed), logits_of(tmp_path / "smoothed.onnx", feed)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_smoothquant_recovers_what_an_outlier_channel_costs_w8a8(bundle_fp32, decoder_feeds, tmp_path):
    from vl_export.calibration import quantize
    from vl_export.calibration.smoothquant import smooth

    outlier = tmp_path / "outlier.onnx"
    with_outlier_channel(bundle_fp32 / "decoder.onnx", outlier)
    quantize.w8a8(outlier, tmp_path / "plain.onnx", decoder_feeds, "minmax", None)
    smooth(outlier, tmp_path / "smoothed.onnx", decoder_feeds)
    quantize.w8a8(tmp_path / "smoothed.onnx", tmp_path / "sq.onnx", decoder_feeds, "minmax", None)
    feeds = list(decoder_feeds())
    plain = np.mean([cos(logits_of(tmp_path / "plain.onnx", f), logits_of(outlier, f)) for f in feeds])
    smoothed = np.mean([cos(logits_of(tmp_path / "sq.onnx", f), logits_of(outlier, f)) for f in feeds])
    print(f"W8A8 logits cosine to fp32 with an outlier channel: plain {plain:.5f}, SmoothQuant {smoothed:.5f}")
    assert 1 - smoothed <= 0.5 * (1 - plain), (plain, smoothed)


def test_w8a8_smoothquant_build_ships_a_smoothed_portable_decoder(tiny, tmp_path):
    """The build's own check runs on ONNX Runtime, which takes the dynamic-INT8 decoder variant; the smoothed Q/DQ
    decoder is for OpenVINO and TensorRT, so it is checked here on OpenVINO (f32 math, int8 where the graph says)."""
    from vl_export.export.verify import verify_bundle

    out = tmp_path / "b"
    config = BuildConfig(precision="int8", decoder_recipe="w8a8-smoothquant", verify=False)
    manifest = build_bundle(str(tiny["original"]), out, config, progress=lambda _: None)
    assert manifest.graph("decoder", "openvino").recipe == "w8a8-smoothquant-minmax-w7"
    assert manifest.calibration["decoder_recipe"] == "w8a8-smoothquant"
    assert not list(out.glob("*.smoothed.onnx*"))
    report = verify_bundle(out, str(tiny["original"]), backend="openvino", progress=lambda _: None, precision="f32")
    logits = next(s for s in report["stages"] if s["stage"] == "prefill_logits" and s["metric"].startswith("cosine"))
    assert logits["value"] >= 0.99  # measured 0.9993 (weight-only 0.9997, plain W8A8 0.9992)
