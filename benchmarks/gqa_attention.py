"""Decode-step attention alone at long context, one layer of Qwen2.5-0.5B's shapes (14 query heads, 2 KV heads,
head size 64, fp32), ONNX Runtime's CPU provider, 2 threads: the GroupQueryAttention contrib operator the ONNX Runtime
decoder variants use (past and present bound to one buffer, as runtime/backends/ort_inplace.py does) against the same
attention as two standard MatMuls over each KV head's stacked query group (q (1, 2, 7, 64) @ K^T (1, 2, 64, past)),
which reads each KV head's cache once instead of once per query head. Measured for #16 (README, "INT4 and the
in-place KV cache"); the stacked form is not a decoder graph yet (no cache update in it).

    python benchmarks/gqa_attention.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper

H, KV, D = 14, 2, 64
G = H // KV


def gqa_model(M):
    n = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"], ["o", "ok", "ov"],
                         domain="com.microsoft", num_heads=H, kv_num_heads=KV, scale=1 / 8.0)
    g = helper.make_graph([n], "g", [helper.make_tensor_value_info("q", T.FLOAT, [1, 1, H * D]),
        helper.make_tensor_value_info("k", T.FLOAT, [1, 1, KV * D]), helper.make_tensor_value_info("v", T.FLOAT, [1, 1, KV * D]),
        helper.make_tensor_value_info("pk", T.FLOAT, [1, KV, M, D]), helper.make_tensor_value_info("pv", T.FLOAT, [1, KV, M, D]),
        helper.make_tensor_value_info("seqlens_k", T.INT32, [1]), helper.make_tensor_value_info("total", T.INT32, [])],
        [helper.make_tensor_value_info("o", T.FLOAT, [1, 1, H * D]), helper.make_tensor_value_info("ok", T.FLOAT, [1, KV, M, D]),
         helper.make_tensor_value_info("ov", T.FLOAT, [1, KV, M, D])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def stacked_model():
    # q (1, KV, G, D) @ k^T (1, KV, D, P) -> softmax -> @ v (1, KV, P, D)
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["s2"]),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", T.FLOAT, [1, KV, G, D]),
        helper.make_tensor_value_info("kt", T.FLOAT, [1, KV, D, "P"]), helper.make_tensor_value_info("v", T.FLOAT, [1, KV, "P", D])],
        [helper.make_tensor_value_info("o", T.FLOAT, [1, KV, G, D])], [helper.make_tensor("scale", T.FLOAT, [], [1 / 8.0])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def timeit(sess, feed, reps=200):
    for _ in range(10):
        sess.run(None, feed)
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feed)
    return (time.perf_counter() - t) / reps * 1e3


o = ort.SessionOptions()
o.intra_op_num_threads = 2
rng = np.random.default_rng(0)
M = 4096
gq = ort.InferenceSession(gqa_model(M).SerializeToString(), o, providers=["CPUExecutionProvider"])
st = ort.InferenceSession(stacked_model().SerializeToString(), o, providers=["CPUExecutionProvider"])
pk = rng.standard_normal((1, KV, M, D)).astype(np.float32)
pv = rng.standard_normal((1, KV, M, D)).astype(np.float32)
for P in (150, 600, 1900):
    feed = {"q": rng.standard_normal((1, 1, H * D)).astype(np.float32), "k": rng.standard_normal((1, 1, KV * D)).astype(np.float32),
            "v": rng.standard_normal((1, 1, KV * D)).astype(np.float32), "pk": pk, "pv": pv,
            "seqlens_k": np.array([P], np.int32), "total": np.array(P + 1, np.int32)}
    # Past and present bound to one buffer per cache tensor, as the runtime binds them.
    b = gq.io_binding()
    for name, value in feed.items():
        if name not in ("pk", "pv"):
            b.bind_cpu_input(name, value)
    b.bind_output("o")
    for past, present, array in (("pk", "ok", pk), ("pv", "ov", pv)):
        buffer = ort.OrtValue.ortvalue_from_numpy(array)
        b.bind_ortvalue_input(past, buffer)
        b.bind_ortvalue_output(present, buffer)
    for _ in range(10):
        gq.run_with_iobinding(b)
    t = time.perf_counter()
    for _ in range(200):
        gq.run_with_iobinding(b)
    gqa_ms = (time.perf_counter() - t) / 200 * 1e3
    sfeed = {"q": rng.standard_normal((1, KV, G, D)).astype(np.float32),
             "kt": np.ascontiguousarray(pk[:, :, :P + 1].transpose(0, 1, 3, 2)), "v": np.ascontiguousarray(pv[:, :, :P + 1])}
    st_ms = timeit(st, sfeed)
    print(f"past {P}: GroupQueryAttention (buffers shared) {gqa_ms:.3f} ms/layer, stacked MatMuls {st_ms:.3f} ms/layer "
          f"-> x24 layers: {24*gqa_ms:.1f} vs {24*st_ms:.1f} ms per token")
