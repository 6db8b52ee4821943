"""INT4 weight-only decoders (calibration/int4.py) on the tiny model: ONNX Runtime's MatMulNBits form and the portable
blocked Q/DQ form (opset 21) both stay close to fp32, and OpenVINO reads the portable form to the same logits as
ONNX Runtime (both dequantize the same 4-bit weights). The INT4 bundle's task accuracy is in test_demo_shipped.py."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

from vl_export.calibration import int4
from vl_export.errors import InputError
from vl_export.export.onnx_export import example_inputs
from vl_export.manifest import Manifest


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def decoder_fp32(bundle_fp32):
    entry = Manifest.load(bundle_fp32).graph("decoder")
    return bundle_fp32 / entry.file, entry


def ort_logits(path, feeds) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


@pytest.fixture(scope="module")
def feeds(decoder_fp32):
    _, entry = decoder_fp32
    return example_inputs(entry.inputs, seed=3)


def test_matmul_nbits_decoder_is_4_bit_and_close_to_fp32(decoder_fp32, feeds, tmp_path):
    src, _ = decoder_fp32
    want = ort_logits(src, feeds)
    for lm_head in ("int4", "int8"):
        dst = tmp_path / f"decoder.{lm_head}.onnx"
        int4.matmul_nbits(src, dst, block_size=32, accuracy_level=4, lm_head=lm_head)
        ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
        weight_matmuls = 1 + 7 * Manifest.load(src.parent).model.text.num_layers  # q k v o gate up down + lm_head
        assert ops.count("MatMulNBits") == weight_matmuls - (lm_head == "int8")
        assert ops.count("MatMulInteger") == (lm_head == "int8")
        if lm_head == "int8":  # 7-bit weights: no int16 saturation without int8 dot products (test_int8_saturation)
            int8 = [numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer
                    if t.data_type == onnx.TensorProto.INT8 and t.dims]
            assert int8 and max(int(np.abs(w.astype(np.int16)).max()) for w in int8) <= 64
        got = ort_logits(dst, feeds)
        assert cosine(got, want) > 0.98, lm_head  # random tiny weights: measured 0.989 (int4 head), 0.992 (int8)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.5  # 4 positions; measured 0.75 and 1.0
        nbits = [{a.name: a.i for a in n.attribute} for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits"]
        assert all((a["bits"], a["block_size"], a["accuracy_level"]) == (4, 32, 4) for a in nbits)


def test_blocked_qdq_is_opset_21_int4_and_openvino_reads_it(decoder_fp32, feeds, tmp_path):
    ov = pytest.importorskip("openvino")
    src, _ = decoder_fp32
    dst = tmp_path / "decoder.int4.onnx"
    int4.blocked_qdq(src, dst, block_size=32)
    model = onnx.load(str(dst))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    weights = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(weights[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)
    assert all({a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in dq)
    ort_q = ort_logits(dst, feeds)
    assert cosine(ort_q, ort_logits(src, feeds)) > 0.98  # measured 0.989
    compiled = ov.Core().compile_model(str(dst), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_q = compiled(feeds)[compiled.output("logits")]
    # The same 4-bit weights: measured cosine 0.99993 between the two runtimes (OpenVINO's decompression kernels
    # round differently; max abs diff 0.04 on logits of magnitude ~2), against 0.989 for either to fp32.
    assert cosine(ov_q, ort_q) > 0.9995
    assert (ov_q.argmax(-1) == ort_q.argmax(-1)).mean() >= 0.75


@pytest.mark.parametrize("form", ["matmul_nbits int4 head", "matmul_nbits int8 head", "blocked_qdq"])
def test_int4_of_a_graph_in_external_data_reads_it_weight_by_weight_to_the_same_graph(decoder_fp32, feeds, tmp_path, form):
    """The build's decoders keep their weights in external data, which the INT4 quantizers read one weight at a time
    (no whole fp32 decoder in memory): the same initializers, to the bit, and the same logits as from the graph held
    whole, and the source's data file is left as it was."""
    src, _ = decoder_fp32
    external = tmp_path / "src" / "decoder.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(external), save_as_external_data=True, location="decoder.onnx.data",
                    size_threshold=256)  # as the exporter's onnx_ir.save
    data = (external.parent / "decoder.onnx.data").read_bytes()
    if form == "blocked_qdq":
        make = lambda s, d: int4.blocked_qdq(s, d, block_size=32)
    else:
        make = lambda s, d: int4.matmul_nbits(s, d, block_size=32, accuracy_level=4, lm_head=form.split()[1])
    make(src, tmp_path / "whole.onnx")
    make(external, tmp_path / "streamed.onnx")
    assert (external.parent / "decoder.onnx.data").read_bytes() == data
    assert sorted(p.name for p in external.parent.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    whole, streamed = (onnx.load(str(tmp_path / f)) for f in ("whole.onnx", "streamed.onnx"))
    assert [n.op_type for n in streamed.graph.node] == [n.op_type for n in whole.graph.node]
    want = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in streamed.graph.initializer}
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert np.array_equal(ort_logits(tmp_path / "streamed.onnx", feeds), ort_logits(tmp_path / "whole.onnx", feeds))


def test_int4_settings_out_of_range_are_user_errors(decoder_fp32, tmp_path):
    src, _ = decoder_fp32
    with pytest.raises(InputError, match="block size 48"):
        int4.matmul_nbits(src, tmp_path / "x.onnx", block_size=48)
    with pytest.raises(InputError, match="lm_head precision"):
        int4.matmul_nbits(src, tmp_path / "x.onnx", lm_head="int2")
    assert not (tmp_path / "x.onnx").exists()


def test_int4_build_refuses_what_it_does_not_make():
    from vl_export.export.build import BuildConfig

    with pytest.raises(InputError, match="not built for TensorRT"):
        BuildConfig(precision="int4", backend="trt")
    with pytest.raises(InputError, match="weight-only"):
        BuildConfig(precision="int4", decoder_recipe="w8a8")
    for head in ("int4", "int8"):
        with pytest.raises(InputError, match="applies to --precision int4"):
            BuildConfig(precision="int8", int4_lm_head=head)
    with pytest.raises(InputError, match="--int4-lm-head 'int2'"):
        BuildConfig(precision="int4", int4_lm_head="int2")
    for precision, backend in (("int4", "ort"), ("int8", "trt"), ("fp32", "ort")):
        with pytest.raises(InputError, match="--ort-int8-decoder applies to --precision int8 --backend ort"):
            BuildConfig(precision=precision, backend=backend, ort_int8_decoder="matmul-nbits")
    with pytest.raises(InputError, match="--ort-int8-decoder 'int4'"):
        BuildConfig(precision="int8", ort_int8_decoder="int4")
    assert BuildConfig(precision="int4").precision == "int4"
