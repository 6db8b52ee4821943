"""ONNX Runtime's dynamic INT8 (DynamicQuantizeLinear + MatMulInteger), made one weight at a time.

`onnxruntime.quantization.quantize_dynamic` loads the whole fp32 graph, infers its shapes into a second copy and
builds the quantized graph beside both: 6.8 GiB for the same-size 1B's 2 GB decoder and 20.3 GiB for the 2B's
7 GB one, the largest step of either build. This writes the same graph (the same node pattern, initializer names,
int8 weights and scales: a test holds them equal to ONNX Runtime's on the exported graphs) while reading each fp32
weight from the graph's external data only when it is quantized, so the step holds the int8 graph plus one fp32
weight.

The settings are those `quantize.dynamic_int8` has always used: MatMuls whose B is a 2-D fp32 initializer
(MatMulConstBOnly), int8 weights symmetric per output column with 7 of their 8 bits (reduce_range, see
`quantize.dynamic_int8`), uint8 activations quantized per call. ONNX Runtime fuses the pattern into its
DynamicQuantizeMatMul / MatMulIntegerToFloat kernels when it loads the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .static_qdq import channel_scales, quantize_channels

# onnxruntime.quantization's int8 range with reduce_range: [-64, 64] (7 bits), zero point 0.
QMIN, QMAX = -64, 64
# The decoders' lm_head (`head_block`): ONNX Runtime's MatMulNBits at 8 bits, symmetric blocks of this many weights
# along K, accuracy level 4 (int8 compute). Same-size 1B, paired per decode step: 1.0-1.5 ms faster than the
# dynamic-INT8 head (it reads 1.03 instead of 1 byte a weight, but skips quantizing and rescaling 152k columns per
# call), prefill unchanged (the head reads the logits positions only), and closer to fp32 (README #16).
HEAD_BLOCK = 128
HEAD_ACCURACY_LEVEL = 4


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) fp32 -> int8 (K, N) and fp32 scales (N,): ONNX Runtime's symmetric per-channel arithmetic
    (compute_scale_zp + quantize_nparray) for every column at once. `w` is overwritten (the caller's own copy: one
    fp32 weight in memory, not two; lm_head's is 0.54 GB at Qwen2.5-0.5B)."""
    scale = channel_scales(w, 1, QMIN, QMAX)
    return quantize_channels(w, scale, 1), scale


def dynamic_int8(src: Path, dst: Path, head_block: int | None = None) -> int:
    """Write `src` with every MatMul on a 2-D fp32 weight in ONNX Runtime's dynamic INT8 form to `dst` (with
    `head_block`, a decoder's lm_head as 8-bit MatMulNBits with blocks of that size instead: `nbits8_matmul`).
    Returns the number of MatMuls quantized."""
    from .quantize import weights_of

    return dynamic_int8_model(onnx.load(str(src), load_external_data=False), weights_of(src), dst, head_block)


def dynamic_int8_model(model: onnx.ModelProto, read: Callable[[TensorProto], np.ndarray], dst: Path,
                       head_block: int | None = None) -> int:
    """`dynamic_int8` of a graph whose weights `read` gives one at a time (see quantize.weight_only_int8_model)."""
    from .int4 import lm_head_node

    graph = model.graph
    head = lm_head_node(model) if head_block else None
    quantized: dict[str, tuple[str, str, str]] = {}  # weight -> (int8, scale, zero point) names
    activations: dict[str, tuple[str, str, str]] = {}  # input -> DynamicQuantizeLinear outputs

    def rewrite(node: onnx.NodeProto, tensor: onnx.TensorProto, written) -> list[onnx.NodeProto]:
        if node.name == head:
            return [nbits8_matmul(node, tensor, read, graph, written, head_block)]
        new_nodes = []
        x = node.input[0]
        if x not in activations:
            activations[x] = (x + "_quantized", x + "_scale", x + "_zero_point")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(activations[x]),
                                              x + "_QuantizeLinear"))
        if tensor.name not in quantized:
            quantized[tensor.name] = _quantize_initializer(tensor, read, graph, written)
        xq, x_scale, x_zp = activations[x]
        wq, w_scale, w_zp = quantized[tensor.name]
        out = node.output[0]
        name = node.name + "_quant" if node.name else ""
        integer = out + "_output_quantized"
        scales = name + "_scales_mul" if name else x_scale + "_" + w_scale + "_mul"
        return new_nodes + [
            helper.make_node("MatMulInteger", [xq, wq, x_zp, w_zp], [integer], name),
            helper.make_node("Cast", [integer], [integer + "_cast_output"], integer + "_cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, w_scale], [scales + ":0"], scales),
            helper.make_node("Mul", [integer + "_cast_output", scales + ":0"], [out],
                             name + "_output_scale_mul" if name else ""),
        ]

    return _rewrite_weight_matmuls(model, read, dst, rewrite)


def matmul_nbits8_model(model: onnx.ModelProto, read: Callable[[TensorProto], np.ndarray], dst: Path,
                        block: int = HEAD_BLOCK) -> int:
    """Every MatMul on a 2-D fp32 weight as 8-bit MatMulNBits (`nbits8_matmul`), written weight by weight as
    `dynamic_int8_model` writes. Returns the number of MatMuls quantized."""
    return _rewrite_weight_matmuls(model, read, dst, lambda node, tensor, written: [
        nbits8_matmul(node, tensor, read, model.graph, written, block)])


def _rewrite_weight_matmuls(model: onnx.ModelProto, read: Callable[[TensorProto], np.ndarray], dst: Path,
                            rewrite: Callable) -> int:
    """Replace every MatMul on a 2-D fp32 weight (A fp32 too) by `rewrite(node, tensor, written)`'s nodes, drop the
    initializers nothing reads any more, bring in what stayed float and write the graph to `dst` (large weights
    streamed to its external data as they are made). Returns the number of MatMuls replaced."""
    from .quantize import WeightFile, load_the_rest, streamed

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    written = WeightFile(dst, streamed(model))
    new_nodes, count = [], 0
    for node in graph.node:
        tensor = weights.get(node.input[1]) if node.op_type == "MatMul" and not node.domain else None
        if tensor is None or len(tensor.dims) != 2 or tensor.data_type != TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        new_nodes += rewrite(node, tensor, written)
        count += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    load_the_rest(model, read, written)  # what stayed float (norms, biases) comes in whole
    written.save(model)
    return count


def nbits8_matmul(node: onnx.NodeProto, tensor: onnx.TensorProto, read, graph: onnx.GraphProto, written,
                  block: int) -> onnx.NodeProto:
    """`node` (x @ W, W (K, N) fp32) as ONNX Runtime's MatMulNBits with 8-bit symmetric blocks of `block` weights
    along K, made by ONNX Runtime's own blockwise quantizer (what MatMulNBitsQuantizer writes for bits=8, without
    loading the graph). Its fp32 initializer is emptied, as `_quantize_initializer` does."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    w = read(tensor)
    k, n = w.shape
    blocks = -(-k // block)
    if blocks * block != k:
        w = np.pad(w, ((0, blocks * block - k), (0, 0)))
    packed = np.zeros((n, blocks, block), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    quantize_matmul_8bits(packed, np.ascontiguousarray(w), scales, np.zeros((n, blocks), np.uint8), block, n,
                          k, True)
    del w
    names = (tensor.name + "_Q8", tensor.name + "_scales")
    graph.initializer.extend([written.tensor(packed, names[0]), numpy_helper.from_array(scales, names[1])])
    empty(tensor)
    return helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), node.name + "_Q8", domain="com.microsoft",
                            K=k, N=n, bits=8, block_size=block, accuracy_level=HEAD_ACCURACY_LEVEL)


def empty(tensor: onnx.TensorProto) -> None:
    """Drop a quantized weight's fp32 values (the initializer itself goes once nothing reads it)."""
    tensor.ClearField("external_data")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.DEFAULT


def _quantize_initializer(tensor: onnx.TensorProto, read, graph: onnx.GraphProto, written) -> tuple[str, str, str]:
    """Quantize one weight (read now, from wherever it is); its fp32 initializer is emptied (and dropped at the end,
    once nothing reads it)."""
    name = tensor.name
    w = read(tensor)
    q, scale = quantize_columns(w)
    del w
    names = (name + "_quantized", name + "_scale", name + "_zero_point")
    graph.initializer.extend([written.tensor(q, names[0]), numpy_helper.from_array(scale, names[1]),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[2])])
    empty(tensor)
    return names

