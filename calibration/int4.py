"""INT4 weight-only decoders: block-wise 4-bit weights (symmetric, one fp32 scale a block along K), activations float.

Two forms of the same 4-bit weights:
- `matmul_nbits`: ONNX Runtime's MatMulNBits contrib operator (ORT-only). Its accuracy_level 4 runs the matmul on
  int8-quantized activations with the CPU's int8 dot-product kernels; the other levels dequantize to float.
- `blocked_qdq`: the portable form, int4 weights behind a blocked DequantizeLinear (opset 21, `block_size` along K)
  feeding a plain MatMul, which OpenVINO and TensorRT read.

The weights are quantized here (`quantize_blocks`), weight by weight as the INT8 quantizers do
(dynamic._rewrite_weight_matmuls): round to nearest with ONNX Runtime's symmetric scale (the block's largest weight
to -8; to the bit what its MatMulNBitsQuantizer writes, tests/test_int4.py) or, with `search` (the default), each
block's scale chosen among SCALE_FACTORS of that one for the least squared error of the block's weights, a clip
search as AWQ's and llama.cpp's quantizers make without calibration data. It costs nothing at run time and brings
block 128 to about block 64's error (README, "INT4 blocks of 128").

`lm_head`: "int4" quantizes it like the other weights; "int8" makes it 8-bit MatMulNBits, as the INT8 decoder's
head (calibration/dynamic.py): the vocabulary projection is where 4-bit rounding errors reach the logits directly.
(It was dynamic INT8, MatMulInteger, until ONNX Runtime 1.32's fast 8-bit MatMulNBits kernel.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vl_export.errors import InputError

BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
LM_HEAD_BITS = ("int4", "int8")
# The block scales `search` tries, as fractions of round-to-nearest's (the block's largest weight to -8): a smaller
# scale clips that weight and rounds the others finer. 0.7-1.0 in 13 steps; 26 steps over 0.6-1.1 lowered the error
# by another 1% only (measured on the demo model's and random Gaussian weights).
SCALE_FACTORS = np.linspace(0.7, 1.0, 13, dtype=np.float32)
_COLUMNS = 4096  # output channels quantized at once: bounds the search's temporaries to a few MB


def _check(block_size: int, accuracy_level: int, lm_head: str) -> None:
    if block_size not in BLOCK_SIZES:
        raise InputError(f"INT4 block size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise InputError(f"MatMulNBits accuracy level {accuracy_level} is not one of 0-4")
    if lm_head not in LM_HEAD_BITS:
        raise InputError(f"lm_head precision {lm_head!r} is not one of {', '.join(LM_HEAD_BITS)}")


def lm_head_node(model: onnx.ModelProto) -> str:
    """The MatMul producing the logits: the one whose weight's output size is the vocabulary (the graph's logits)."""
    vocab = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    weights = {t.name: t for t in model.graph.initializer}
    found = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
             and weights[n.input[1]].dims[-1] == vocab]
    if len(found) != 1:
        raise InputError(f"cannot tell the decoder's lm_head MatMul apart ({len(found)} MatMuls of width {vocab})")
    return found[0]


def quantize_blocks(w: np.ndarray, block: int, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) fp32, K a whole number of blocks (block_along) -> q (N, K / block, block) int8 in [-8, 7] and scales
    (N, K / block) fp32, so that w[k, n] ~ q[n, k // block, k % block] * scales[n, k // block]."""
    k, n = w.shape
    q = np.empty((n, k // block, block), np.int8)
    scales = np.empty((n, k // block), np.float32)
    for first in range(0, n, _COLUMNS):
        cols = slice(first, min(first + _COLUMNS, n))
        wt = np.ascontiguousarray(w[:, cols].T, np.float32).reshape(-1, k // block, block)
        largest = np.take_along_axis(wt, np.abs(wt).argmax(-1)[..., None], -1)  # signed
        scale = largest / np.float32(-8)
        scale[scale == 0] = 1  # an all-zero block: any scale
        if search:
            best = np.full(scale.shape, np.inf, np.float32)
            chosen = scale.copy()
            for factor in SCALE_FACTORS:
                s = scale * factor
                err = np.square(np.clip(np.rint(wt / s), -8, 7) * s - wt).sum(-1, keepdims=True)
                better = err < best
                best[better], chosen[better] = err[better], s[better]
            scale = chosen
        q[cols] = np.clip(np.rint(wt / scale), -8, 7)
        scales[cols] = scale[..., 0]
    return q, scales


def block_along(k: int, block: int) -> int:
    """The block a weight of K rows is quantized in: `block`, halved until it divides K. OpenVINO reads a blocked
    DequantizeLinear only when it does (a partial last block fails to convert), and MatMulNBits is given the same
    blocks so that both forms hold the same weights. The InternVL2.5 decoders' K are multiples of 128; the demo
    model's hidden size (192) takes blocks of 64."""
    while k % block and block > min(BLOCK_SIZES):
        block //= 2
    if k % block:
        raise InputError(f"a weight with K={k} rows is not a whole number of INT4 blocks of {min(BLOCK_SIZES)}")
    return block


def _nbits_weights(q: np.ndarray) -> np.ndarray:
    """quantize_blocks' q as MatMulNBits' B: (N, blocks, block / 2) uint8, two weights a byte (the first in the low
    nibble), stored with the zero point 8 that MatMulNBits assumes when it is given none."""
    u = (q + 8).astype(np.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _int4_tensor(q: np.ndarray, written, name: str) -> TensorProto:
    """quantize_blocks' q (K a whole number of blocks) as a (K, N) INT4 initializer: row-major, two a byte, the first
    in the low nibble."""
    n, k = q.shape[0], q.shape[1] * q.shape[2]
    flat = np.ascontiguousarray(q.reshape(n, k).T).reshape(-1).view(np.uint8) & 0x0F  # K even: whole bytes
    return written.tensor(flat[0::2] | (flat[1::2] << 4), name, dims=(k, n), data_type=TensorProto.INT4)


def _rewrite_4bit(src: Path, dst: Path, block_size: int, search: bool, make: Callable, head_block: int | None = None,
                  opset: int = 0) -> None:
    """Every weight MatMul of `src` as `make(graph, node, tensor, q, scales, block, written)`'s nodes, weight by
    weight (dynamic._rewrite_weight_matmuls); with `head_block`, the lm_head as 8-bit MatMulNBits in blocks of that
    size instead (dynamic.nbits8_matmul, as dynamic_int8_model's head). The default domain's opset is raised to at
    least `opset`."""
    from .dynamic import _rewrite_weight_matmuls, empty, nbits8_matmul
    from .quantize import weights_of

    model = onnx.load(str(src), load_external_data=False)
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    read = weights_of(src)
    head = lm_head_node(model) if head_block else None

    def rewrite(node, tensor, written):
        if node.name == head:
            return [nbits8_matmul(node, tensor, read, model.graph, written, head_block)]
        w = read(tensor)
        block = block_along(w.shape[0], block_size)
        q, scales = quantize_blocks(w, block, search)
        del w
        empty(tensor)
        return make(model.graph, node, tensor, q, scales, block, written)

    _rewrite_weight_matmuls(model, read, dst, rewrite)


def matmul_nbits(src: Path, dst: Path, block_size: int = 128, accuracy_level: int = 4, lm_head: str = "int4",
                 search: bool = True) -> None:
    """ONNX Runtime's INT4 decoder: every weight MatMul as MatMulNBits; lm_head 4-bit too or, "int8", 8-bit
    MatMulNBits as the INT8 decoder's head (dynamic.nbits8_matmul, symmetric blocks of HEAD_BLOCK)."""
    from .dynamic import HEAD_BLOCK

    _check(block_size, accuracy_level, lm_head)

    def make(graph, node, tensor, q, scales, block, written):
        names = (tensor.name + "_Q4", tensor.name + "_scales")
        graph.initializer.extend([written.tensor(_nbits_weights(q), names[0]), numpy_helper.from_array(scales, names[1])])
        return [helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output), node.name + "_Q4",
                                 domain="com.microsoft", K=q.shape[1] * block, N=q.shape[0], bits=4, block_size=block,
                                 accuracy_level=accuracy_level)]

    _rewrite_4bit(src, dst, block_size, search, make, head_block=HEAD_BLOCK if lm_head == "int8" else None)


def blocked_qdq(src: Path, dst: Path, block_size: int = 128, search: bool = True) -> None:
    """The portable INT4 decoder: int4 weights, DequantizeLinear with `block_size` (opset 21), plain MatMul; the same
    4-bit weights and scales as `matmul_nbits`'s. lm_head is 4-bit too (a portable int8 lm_head would be weight-only
    Q/DQ at twice the bytes)."""
    _check(block_size, 0, "int4")

    def make(graph, node, tensor, q, scales, block, written):
        names = (tensor.name + "_DQ_Q4", tensor.name + "_DQ_scales")
        graph.initializer.extend([_int4_tensor(q, written, names[0]),
                                  numpy_helper.from_array(np.ascontiguousarray(scales.T), names[1])])
        weight = names[0] + "_output"
        return [helper.make_node("DequantizeLinear", list(names), [weight], node.name + "_DQ_Q4", axis=0,
                                 block_size=block),
                helper.make_node("MatMul", [node.input[0], weight], list(node.output), node.name)]

    _rewrite_4bit(src, dst, block_size, search, make, opset=21)  # blocked DequantizeLinear, INT4
