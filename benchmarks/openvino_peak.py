"""Sustained matmul throughput of OpenVINO's CPU plugin on this machine: the roofline the README's speed section
quotes. A chain of 8 matmuls shaped like InternViT-300M's MLP on one tile (1025 x 1024 x 4096), as int8 Q/DQ
and as float, under the bf16 and f32 inference precisions, 2 threads.

    python benchmarks/openvino_peak.py
"""
import time, numpy as np, onnx, openvino as ov
from onnx import helper, numpy_helper, TensorProto
M, K, N, L = 1025, 1024, 4096, 8
def model(q):
    nodes, inits = [], []
    x = "x"
    for i in range(L):
        k, n = (K, N) if i % 2 == 0 else (N, K)
        w = (np.random.randn(k, n) * 0.02).astype(np.float32)
        if q:
            s = np.abs(w).max(0) / 127
            inits += [numpy_helper.from_array(np.clip(np.rint(w / s), -127, 127).astype(np.int8), f"w{i}"),
                      numpy_helper.from_array(s.astype(np.float32), f"s{i}"), numpy_helper.from_array(np.array(0.05, np.float32), f"a{i}"),
                      numpy_helper.from_array(np.array(0, np.int8), f"z{i}")]
            nodes += [helper.make_node("QuantizeLinear", [x, f"a{i}", f"z{i}"], [f"xq{i}"]),
                      helper.make_node("DequantizeLinear", [f"xq{i}", f"a{i}", f"z{i}"], [f"xd{i}"]),
                      helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"wd{i}"], axis=1),
                      helper.make_node("MatMul", [f"xd{i}", f"wd{i}"], [f"y{i}"])]
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [M, K])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
import os, tempfile
core = ov.Core()
path = os.path.join(tempfile.mkdtemp(prefix="vl-export-peak-"), "chain.onnx")
flops = 2 * M * K * N * L
for q, prec in ((True, "bf16"), (True, "f32"), (False, "bf16"), (False, "f32")):
    m = model(q); onnx.save(m, path)
    cm = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": prec, "INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
    r = cm.create_infer_request(); x = np.random.randn(M, K).astype(np.float32)
    for _ in range(2): r.infer({"x": x})
    t = time.time(); n = 5
    for _ in range(n): r.infer({"x": x})
    dt = (time.time() - t) / n
    print(f"{'int8 Q/DQ' if q else 'float'} hint {prec}: {flops / dt / 1e9:.0f} GOPS")
