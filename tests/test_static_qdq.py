"""The static W8A8 writer (`calibration/static_qdq.py`) against ONNX Runtime's quantize_static, which it replaces:
the same graph, value for value, on the tiny model's three graphs and on a Conv whose bias forces ONNX Runtime to
widen its weight scale."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vl_export.calibration import quantize
from vl_export.calibration.static_qdq import write_w8a8

OP_TYPES = ("MatMul", "Gemm", "Conv")


def ort_quantize_static(src, dst, ranges, reduce_range: bool, exclude) -> None:
    """ONNX Runtime's own writer, with the settings `quantize.w8a8` passed it before vl-export wrote the graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(OP_TYPES), nodes_to_exclude=list(exclude), calibration_cache_path=ranges,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       "OpTypesToExcludeOutputQuantization": list(OP_TYPES)},
    )


def assert_same_graph(ours, theirs) -> None:
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))

    def nodes(model):
        return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output),
                       tuple(x.SerializeToString() for x in n.attribute)) for n in model.graph.node)

    assert nodes(a) == nodes(b)
    mine = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ort = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert mine.keys() == ort.keys()
    differ = [n for n in mine if mine[n].dtype != ort[n].dtype or not np.array_equal(mine[n], ort[n])]
    assert not differ, differ[:5]


def feeds_for(path, rng, n: int = 2) -> list[dict[str, np.ndarray]]:
    """Random inputs of the graph's own shapes (symbolic axes: 1 for batch-like, 5 for the rest, 0 for a past)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for _ in range(n):
        feed = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else (0 if "past" in i.name and k == 2 else 1 if k == 0 else 5)
                     for k, d in enumerate(i.shape)]
            if "int64" in i.type:
                feed[i.name] = (np.ones(shape, np.int64) if "mask" in i.name
                                else np.broadcast_to(np.arange(shape[-1]), shape).astype(np.int64).copy())
            else:
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(feed)
    return out


@pytest.mark.parametrize("role", ["vision_encoder", "projector", "decoder"])
@pytest.mark.parametrize("reduce_range", [True, False], ids=["7-bit", "8-bit"])
def test_writes_the_graph_onnxruntimes_quantize_static_writes(bundle_fp32, tmp_path, role, reduce_range):
    src = bundle_fp32 / f"{role}.onnx"
    feeds = feeds_for(src, np.random.default_rng(0))
    ranges = tmp_path / "ranges.json"
    quantize.calibrate(src, lambda: iter(feeds), "minmax", ranges, OP_TYPES)
    exclude = quantize.activation_matmuls(src)
    count = write_w8a8(src, tmp_path / "ours.onnx", quantize.read_ranges(ranges), OP_TYPES, exclude, reduce_range)
    ort_quantize_static(src, tmp_path / "ort.onnx", ranges, reduce_range, exclude)
    assert count > 0
    assert_same_graph(tmp_path / "ours.onnx", tmp_path / "ort.onnx")


def test_activation_by_activation_matmuls_get_both_inputs_quantized_as_onnxruntime_does(bundle_fp32, tmp_path):
    src = bundle_fp32 / "vision_encoder.onnx"
    feeds = feeds_for(src, np.random.default_rng(1), n=1)
    ranges = tmp_path / "ranges.json"
    quantize.calibrate(src, lambda: iter(feeds), "minmax", ranges, OP_TYPES)
    write_w8a8(src, tmp_path / "ours.onnx", quantize.read_ranges(ranges), OP_TYPES, (), True)
    ort_quantize_static(src, tmp_path / "ort.onnx", ranges, True, ())
    assert_same_graph(tmp_path / "ours.onnx", tmp_path / "ort.onnx")
    assert len(quantize.activation_matmuls(src)) > 0  # attention's QK^T and PV were quantized too


def conv_with_a_large_bias(path) -> None:
    """A patch-embedding Conv whose bias is too large for int32 at input scale x weight scale in some channels."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((4, 3, 2, 2)) * 1e-4).astype(np.float32)
    b = np.array([1e-3, 5e3, -2e4, 0.1], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[2, 2], strides=[2, 2])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_a_conv_bias_beyond_int32_widens_the_weight_scale_as_onnxruntime_does(tmp_path):
    src = tmp_path / "conv.onnx"
    conv_with_a_large_bias(src)
    x = np.random.default_rng(3).standard_normal((1, 3, 4, 4)).astype(np.float32) * 1e-3
    ranges = tmp_path / "ranges.json"
    quantize.calibrate(src, lambda: iter([{"x": x}]), "minmax", ranges, OP_TYPES)
    write_w8a8(src, tmp_path / "ours.onnx", quantize.read_ranges(ranges), OP_TYPES, (), False)
    ort_quantize_static(src, tmp_path / "ort.onnx", ranges, False, ())
    assert_same_graph(tmp_path / "ours.onnx", tmp_path / "ort.onnx")
    scale = numpy_helper.to_array(next(t for t in onnx.load(str(tmp_path / "ours.onnx")).graph.initializer
                                       if t.name == "w_scale"))
    plain = np.abs(numpy_helper.to_array(onnx.load(str(src)).graph.initializer[0])).reshape(4, -1).max(axis=1) / 127
    assert scale[2] > 10 * plain[2] and scale[0] == np.float32(plain[0])  # widened only where the bias needs it


def test_ranges_of_another_graph_are_refused(bundle_fp32, tmp_path):
    src = bundle_fp32 / "projector.onnx"
    with pytest.raises(ValueError, match="no calibrated range"):
        write_w8a8(src, tmp_path / "q.onnx", {"some_other_tensor": (np.float32(-1), np.float32(1))}, OP_TYPES)
