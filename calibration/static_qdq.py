"""Static W8A8 as Q/DQ from calibrated ranges: the graph ONNX Runtime's quantize_static writes, one weight at a time.

`onnxruntime.quantization.quantize_static` (QDQ format, per-channel weights) loads the whole fp32 graph and
quantizes each weight one output channel at a time in Python: 222,208 channels and 20 of its 23 s on the same-size
InternViT-300M, and the build's last step that held a whole fp32 graph. This writes the same graph (the same nodes,
names, int8 weights, scales and int32 biases: a test holds it equal to ONNX Runtime's, value for value) with each
weight's channels quantized at once, reading the weight from the graph's external data only when it is written.

The settings are those `quantize.w8a8` has always asked ONNX Runtime for: symmetric int8 activations (zero point 0)
from the calibration cache, symmetric per-channel int8 weights (MatMul: per output column; Conv: per output
channel), optionally in 7 bits (reduce_range), Conv biases in int32 at input scale x weight scale (the weight's
scale raised where that bias scale would overflow int32, as ONNX Runtime does), Q/DQ on the inputs of the
quantized nodes only, and one Q/DQ pair per activation that every consumer of the activation reads.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ACTIVATION_QMAX = 127  # symmetric int8: [-127, 127]
INT32_RANGE = float(np.iinfo(np.int32).max) - float(np.iinfo(np.int32).min + 1)


def weight_range(reduce_range: bool) -> tuple[int, int]:
    """onnxruntime.quantization's symmetric int8 weight range: 7 bits [-64, 64] with reduce_range, else [-127, 127]."""
    return (-64, 64) if reduce_range else (-127, 127)


def channel_scales(w: np.ndarray, axis: int, qmin: int, qmax: int) -> np.ndarray:
    """Symmetric per-channel scales along `axis`, ONNX Runtime's arithmetic (compute_scale_zp): fp32 ranges widened
    to include 0, (2 * absmax) / (qmax - qmin) in float64, stored as fp32; an all-zero channel gets scale 1."""
    others = tuple(i for i in range(w.ndim) if i != axis)
    absmax = np.maximum(-np.minimum(w.min(axis=others), 0), np.maximum(w.max(axis=others), 0))
    scale64 = (absmax.astype(np.float64) * 2.0) / (qmax - qmin)
    scale = scale64.astype(np.float32)
    scale[scale64 < np.finfo(np.float32).tiny] = 1.0
    return scale


def quantize_channels(w: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """fp32 / scale per channel, rounded half to even, clipped to int8 (ONNX Runtime's quantize_nparray). `w` (the
    caller's own copy) is overwritten."""
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.divide(w, scale.reshape(shape), out=w)
    np.clip(np.rint(q, out=q), -128, 127, out=q)
    return q.astype(np.int8)


def activation_scale(lowest: np.ndarray, highest: np.ndarray) -> np.float32:
    """A calibrated range -> the symmetric int8 scale (compute_scale_zp with [-127, 127])."""
    rmin = np.minimum(np.asarray(lowest, np.float32).reshape(()), np.float32(0))
    rmax = np.maximum(np.asarray(highest, np.float32).reshape(()), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    scale64 = float(absmax) * 2.0 / (2 * ACTIVATION_QMAX)
    return np.float32(1.0) if scale64 < np.finfo(np.float32).tiny else np.float32(scale64)


def widen_for_int32_bias(weight_scale: np.ndarray, input_scale: np.float32, bias: np.ndarray) -> np.ndarray:
    """ONNX Runtime's per-channel weight-scale adjustment: where input_scale * weight_scale would put the bias
    outside int32, the weight's scale grows just enough (by 1.0001 x the ratio)."""
    candidate = np.float64(input_scale) * weight_scale.astype(np.float64)
    smallest = 1.0001 * (2.0 * np.abs(bias.astype(np.float64))) / INT32_RANGE
    grow = (candidate < smallest) & (candidate > 0.0)
    if not grow.any():
        return weight_scale
    widened = weight_scale.copy()
    widened[grow] = (weight_scale[grow].astype(np.float64) * (smallest[grow] / candidate[grow])).astype(np.float32)
    return widened


def activations_of(node: onnx.NodeProto, weights: Collection[str]) -> list[str]:
    """The inputs of a quantized node that get an activation Q/DQ pair: a MatMul's inputs that are not weights
    (both, for attention's activation x activation products), a Conv's data input."""
    inputs = node.input[:2] if node.op_type == "MatMul" else node.input[:1]
    return [x for x in inputs if x not in weights]


def write_w8a8(src: Path, dst: Path, ranges: dict[str, tuple[np.ndarray, np.ndarray]], op_types: Collection[str],
               exclude: Collection[str] = (), reduce_range: bool = False) -> int:
    """Write `src` with its MatMul/Conv nodes in `op_types` (bar those named in `exclude`) quantized W8A8 as Q/DQ to
    `dst`, activation scales from `ranges` ({tensor: (lowest, highest)}). Returns the number of nodes quantized."""
    from onnx.external_data_helper import load_external_data_for_model

    from .quantize import save, weights_of

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    read_tensor = weights_of(src)
    read = lambda name: read_tensor(weights[name])  # noqa: E731
    qmin, qmax = weight_range(reduce_range)
    chosen = [n for n in graph.node if n.op_type in op_types and n.name not in exclude and not n.domain]
    for node in chosen:
        if node.op_type not in ("MatMul", "Conv"):
            raise NotImplementedError(f"static Q/DQ for {node.op_type} ({node.name}) is not written by vl-export")

    # Activation params first: a Conv's bias scale (and with it its weight's scale) depends on its input's scale.
    act_scale: dict[str, np.float32] = {}
    for node in chosen:
        if node.input[0] in weights:
            raise NotImplementedError(f"{node.name}: a constant first input is not written by vl-export")
        for x in activations_of(node, weights):
            if x not in ranges:
                raise ValueError(f"no calibrated range for {x!r}, an input of {node.name}: the ranges are of another graph")
            act_scale[x] = activation_scale(*ranges[x])

    before: dict[int, list[onnx.NodeProto]] = {}  # Q/DQ nodes to insert before the node at this index
    new_inits: list[TensorProto] = []
    done_weights: set[str] = set()
    done_acts: set[str] = set()
    renamed: dict[str, str] = {}  # tensor -> the DequantizeLinear output every consumer reads instead
    first_use = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            first_use.setdefault(name, i)
    for node in chosen:
        x, w_name = node.input[0], node.input[1]
        for a in activations_of(node, weights):
            if a in done_acts:
                continue
            done_acts.add(a)
            scale, zp = f"{a}_scale", f"{a}_zero_point"
            new_inits += [numpy_helper.from_array(np.array(act_scale[a], np.float32), scale),
                          helper.make_tensor(zp, TensorProto.INT8, [], [0])]
            q_out, dq_out = f"{a}_QuantizeLinear_Output", f"{a}_DequantizeLinear_Output"
            before.setdefault(first_use[a], []).extend([
                helper.make_node("QuantizeLinear", [a, scale, zp], [q_out], name=f"{a}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [q_out, scale, zp], [dq_out], name=f"{a}_DequantizeLinear"),
            ])
            renamed[a] = dq_out
        if w_name in done_weights or w_name not in weights or weights[w_name].data_type != TensorProto.FLOAT:
            continue
        done_weights.add(w_name)
        w = read(w_name)
        axis = 1 if node.op_type == "MatMul" else 0
        if node.op_type == "MatMul" and w.ndim != 2:
            raise NotImplementedError(f"{node.name}: a {w.ndim}-D MatMul weight is not written by vl-export")
        scale = channel_scales(w, axis, qmin, qmax)
        bias = node.input[2] if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            b = read(bias)
            scale = widen_for_int32_bias(scale, act_scale[x], b)
            b_scale = act_scale[x] * scale  # fp32 x fp32, as ONNX Runtime multiplies them
            b_q = np.clip((b.astype(np.float64) / b_scale.astype(np.float64)).round(),
                          np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
            new_inits += [numpy_helper.from_array(b_q.reshape(b.shape), f"{bias}_quantized"),
                          numpy_helper.from_array(b_scale.astype(np.float32).reshape(-1), f"{bias}_quantized_scale"),
                          numpy_helper.from_array(np.zeros(b_scale.size, np.int32), f"{bias}_quantized_zero_point")]
            before.setdefault(first_use[bias], []).append(helper.make_node(
                "DequantizeLinear", [f"{bias}_quantized", f"{bias}_quantized_scale", f"{bias}_quantized_zero_point"],
                [bias], name=f"{bias}_DequantizeLinear", axis=0))
            weights.pop(bias)
        q = quantize_channels(w, scale, axis)
        del w
        new_inits += [numpy_helper.from_array(q, f"{w_name}_quantized"),
                      numpy_helper.from_array(scale, f"{w_name}_scale"),
                      helper.make_tensor(f"{w_name}_zero_point", TensorProto.INT8, [scale.size], [0] * scale.size)]
        dq_out = f"{w_name}_DequantizeLinear_Output"
        before.setdefault(first_use[w_name], []).append(helper.make_node(
            "DequantizeLinear", [f"{w_name}_quantized", f"{w_name}_scale", f"{w_name}_zero_point"], [dq_out],
            name=f"{w_name}_DequantizeLinear", axis=axis))
        renamed[w_name] = dq_out
        weights.pop(w_name)

    nodes = []
    for i, node in enumerate(graph.node):
        nodes += before.get(i, [])
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        nodes.append(node)
    kept = [t for t in graph.initializer if t.name in weights]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + new_inits)
    load_external_data_for_model(model, str(src.parent))  # what stayed float (norms, biases) comes in whole
    save(model, dst)
    return len(chosen)
