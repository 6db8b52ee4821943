"""INT8 graphs for CPUs stay exact on CPUs without int8 dot products.

ONNX Runtime and OpenVINO multiply u8 (or shifted s8) activations by s8 weights with VPMADDUBSW on x86 CPUs without
AVX-512 VNNI / AVX-VNNI; its int16 sum of two products saturates when both are large (255 * 127 * 2 > 32767). CPU
bundles therefore keep their int8 weights within 7 bits. These checks use activations and weights chosen to
saturate (all large, same sign): on an AVX2-only CPU full 8-bit weights give errors of tens of percent here, which
the 7-bit graphs must not show, whatever the CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vl_export.calibration import quantize

K, N = 256, 64


def float_matmul(path, w: np.ndarray) -> None:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def adversarial():
    rng = np.random.default_rng(0)
    w = rng.uniform(0.8, 1.0, (K, N)).astype(np.float32)  # every weight near the top of its channel's range
    x = rng.uniform(0.8, 1.0, (8, K)).astype(np.float32)  # every activation near the top of the calibrated range
    return x, w


def int8_weights(path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    return [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8 and t.dims]


def run_ort(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def run_openvino(path, x):
    import openvino as ov

    core = ov.Core()
    return core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0]


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_dynamic_int8_weights_use_seven_bits_and_stay_exact(tmp_path, adversarial):
    x, w = adversarial
    float_matmul(tmp_path / "f.onnx", w)
    quantize.dynamic_int8(tmp_path / "f.onnx", tmp_path / "q.onnx")
    weights = int8_weights(tmp_path / "q.onnx")
    assert weights and max(int(np.abs(q.astype(np.int16)).max()) for q in weights) <= 64
    # 7-bit weights (step max/64) and 8-bit activations: about 1% error at most, against ~40% when saturating
    assert rel_err(run_ort(tmp_path / "q.onnx", x), x @ w) < 0.02


@pytest.mark.parametrize("runner", [run_ort, run_openvino], ids=["onnxruntime", "openvino"])
def test_cpu_w8a8_weights_use_seven_bits_and_stay_exact(tmp_path, adversarial, runner):
    x, w = adversarial
    float_matmul(tmp_path / "f.onnx", w)
    quantize.w8a8(tmp_path / "f.onnx", tmp_path / "q.onnx", lambda: iter([{"x": x}]), "minmax", None,
                  seven_bit_weights=True)
    weights = int8_weights(tmp_path / "q.onnx")
    assert weights and max(int(np.abs(q.astype(np.int16)).max()) for q in weights) <= 64
    assert rel_err(runner(tmp_path / "q.onnx", x), x @ w) < 0.02


def test_tensorrt_w8a8_keeps_all_eight_bits(tmp_path, adversarial):
    """GPUs accumulate int8 products in int32; TensorRT bundles keep the full weight range."""
    x, w = adversarial
    float_matmul(tmp_path / "f.onnx", w)
    quantize.w8a8(tmp_path / "f.onnx", tmp_path / "q.onnx", lambda: iter([{"x": x}]), "minmax", None)
    assert max(int(np.abs(q.astype(np.int16)).max()) for q in int8_weights(tmp_path / "q.onnx")) == 127


def test_nbits8_lm_head_stays_exact_on_large_same_sign_values(tmp_path, adversarial):
    """ONNX Runtime's INT8 decoder quantizes its lm_head to 8-bit MatMulNBits (full 8-bit blocks, int8 activations
    at accuracy level 4): that kernel must not saturate on the CPU this runs on either."""
    x, w = adversarial
    float_matmul(tmp_path / "f.onnx", w)
    quantize.dynamic_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", head_block=128)
    assert [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node] == ["MatMulNBits"]
    # 8-bit blocks of 128 weights and int8 activations per block: well under 1% here, against ~40% when saturating
    assert rel_err(run_ort(tmp_path / "q.onnx", x), x @ w) < 0.01


@pytest.mark.parametrize("k", [256, 200])  # whole blocks, and a last block padded
def test_nbits8_lm_head_is_what_onnxruntimes_quantizer_writes(tmp_path, k):
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = np.random.default_rng(1).standard_normal((k, N)).astype(np.float32)
    float_matmul(tmp_path / "f.onnx", w)
    quantize.dynamic_int8(tmp_path / "f.onnx", tmp_path / "ours.onnx", head_block=128)
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4, bits=8)
    theirs = MatMulNBitsQuantizer(onnx.load(str(tmp_path / "f.onnx")), algo_config=config)
    theirs.process()
    ours = onnx.load(str(tmp_path / "ours.onnx"))
    (a,), (b,) = ours.graph.node, theirs.model.model.graph.node
    assert (a.op_type, a.domain, list(a.input[:1]), list(a.output)) == (b.op_type, b.domain, list(b.input[:1]), list(b.output))
    assert {x.name: helper.get_attribute_value(x) for x in a.attribute} == {x.name: helper.get_attribute_value(x) for x in b.attribute}
    mine = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    for name in b.input[1:]:
        expected = numpy_helper.to_array(next(t for t in theirs.model.model.graph.initializer if t.name == name))
        np.testing.assert_array_equal(mine[name], expected)
