"""Per-step cost of the KV cache update alone, at Qwen2.5-0.5B's cache shape after the 7-tile prompt (24 layers x
key/value, (1, 2, 1903 + step, 64) fp32, 47 MB), on ONNX Runtime's CPU provider, 2 threads: Concat into a fresh
`present` (today's decoder.onnx, with the ping-pong buffers runtime/backends/ort.py binds) against ScatterElements
into one buffer bound as both `past` and `present` (the in-place graph, runtime/backends/ort_inplace.py).

    python benchmarks/kv_cache_update.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

TENSORS, PROMPT, STEPS, KV_HEADS, HEAD_DIM = 48, 1903, 64, 2, 64


def session(kind: str):
    nodes, inputs, outputs = [], [], []
    for i in range(TENSORS):
        if kind == "concat":
            nodes.append(helper.make_node("Concat", [f"past{i}", "new"], [f"present{i}"], axis=2))
        else:
            nodes.append(helper.make_node("ScatterElements", [f"past{i}", "slots", "new"], [f"present{i}"], axis=2))
        inputs.append(helper.make_tensor_value_info(f"past{i}", TensorProto.FLOAT, [1, KV_HEADS, "p", HEAD_DIM]))
        outputs.append(helper.make_tensor_value_info(f"present{i}", TensorProto.FLOAT, None))
    inputs.append(helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, KV_HEADS, 1, HEAD_DIM]))
    if kind == "scatter":
        inputs.append(helper.make_tensor_value_info("slots", TensorProto.INT64, [1, KV_HEADS, 1, HEAD_DIM]))
    model = helper.make_model(helper.make_graph(nodes, kind, inputs, outputs), opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def step_ms(kind: str) -> float:
    s = session(kind)
    capacity = PROMPT + STEPS + 1
    buffers = [[np.zeros(KV_HEADS * capacity * HEAD_DIM, np.float32) for _ in range(TENSORS)] for _ in range(2)]
    new = np.ones((1, KV_HEADS, 1, HEAD_DIM), np.float32)
    times = []
    for step in range(STEPS):
        past = PROMPT + step
        binding = s.io_binding()
        binding.bind_cpu_input("new", new)
        if kind == "concat":  # past from one buffer set, present into the other, swapped each step
            src, dst = buffers[step % 2], buffers[1 - step % 2]
            shapes = ([1, KV_HEADS, past, HEAD_DIM], [1, KV_HEADS, past + 1, HEAD_DIM])
        else:  # one buffer set, both roles
            binding.bind_cpu_input("slots", np.full((1, KV_HEADS, 1, HEAD_DIM), past, np.int64))
            src = dst = buffers[0]
            shapes = ([1, KV_HEADS, capacity, HEAD_DIM],) * 2
        for i in range(TENSORS):
            binding.bind_input(f"past{i}", "cpu", 0, np.float32, shapes[0], src[i].ctypes.data)
            binding.bind_output(f"present{i}", "cpu", 0, np.float32, shapes[1], dst[i].ctypes.data)
        start = time.perf_counter()
        s.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return float(np.median(times[4:]) * 1000)  # after both buffer sets have been touched


def main() -> None:
    mb = TENSORS * KV_HEADS * PROMPT * HEAD_DIM * 4 / 1e6
    print(f"cache {mb:.0f} MB: concat {step_ms('concat'):.2f} ms per step, in place {step_ms('scatter'):.2f} ms per step")


if __name__ == "__main__":
    main()
