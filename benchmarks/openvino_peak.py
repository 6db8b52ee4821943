"""Sustained matmul throughput of OpenVINO's CPU plugin on this machine: the roofline the README's speed section
quotes. A chain of 8 matmuls shaped like InternViT-300M's MLP on one tile (1025 x 1024 x 4096), as int8 Q/DQ
and as float, under the bf16 and f32 inference precisions, 2 threads.

    python benchmarks/openvino_peak.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
from onnx import TensorProto, helper, numpy_helper

TOKENS, WIDTH, HIDDEN, LAYERS = 1025, 1024, 4096, 8  # one tile of InternViT-300M, its MLP


def chain(int8: bool) -> onnx.ModelProto:
    """LAYERS matmuls alternating (WIDTH -> HIDDEN) and (HIDDEN -> WIDTH); int8: Q/DQ activations (one static
    scale) and per-column int8 weights, the shape of the bundle's W8A8 graphs."""
    nodes, weights, x = [], [], "x"
    for i in range(LAYERS):
        k, n = (WIDTH, HIDDEN) if i % 2 == 0 else (HIDDEN, WIDTH)
        w = (np.random.randn(k, n) * 0.02).astype(np.float32)
        if int8:
            scale = np.abs(w).max(0) / 127
            weights += [numpy_helper.from_array(np.clip(np.rint(w / scale), -127, 127).astype(np.int8), f"w{i}"),
                        numpy_helper.from_array(scale.astype(np.float32), f"s{i}"),
                        numpy_helper.from_array(np.array(0.05, np.float32), f"a{i}"),
                        numpy_helper.from_array(np.array(0, np.int8), f"z{i}")]
            nodes += [helper.make_node("QuantizeLinear", [x, f"a{i}", f"z{i}"], [f"xq{i}"]),
                      helper.make_node("DequantizeLinear", [f"xq{i}", f"a{i}", f"z{i}"], [f"xd{i}"]),
                      helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"wd{i}"], axis=1),
                      helper.make_node("MatMul", [f"xd{i}", f"wd{i}"], [f"y{i}"])]
        else:
            weights.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [TOKENS, WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [TOKENS, WIDTH])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main(runs: int = 5) -> None:
    core = ov.Core()
    ops = 2 * TOKENS * WIDTH * HIDDEN * LAYERS
    path = Path(tempfile.mkdtemp(prefix="vl-export-peak-")) / "chain.onnx"
    x = np.random.randn(TOKENS, WIDTH).astype(np.float32)
    for int8, precision in ((True, "bf16"), (True, "f32"), (False, "bf16"), (False, "f32")):
        onnx.save(chain(int8), path)
        compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        for _ in range(2):  # warm-up: weight packing
            request.infer({"x": x})
        start = time.perf_counter()
        for _ in range(runs):
            request.infer({"x": x})
        seconds = (time.perf_counter() - start) / runs
        print(f"{'int8 Q/DQ' if int8 else 'float'}, precision hint {precision}: {ops / seconds / 1e9:.0f} GOPS")


if __name__ == "__main__":
    main()
