"""INT4 weight-only decoders: block-wise 4-bit weights, activations float, through ONNX Runtime's MatMulNBitsQuantizer.

Two forms of the same round-to-nearest quantization:
- `matmul_nbits`: ONNX Runtime's MatMulNBits contrib operator (ORT-only). Its accuracy_level 4 runs the matmul on
  int8-quantized activations with the CPU's int8 dot-product kernels; the other levels dequantize to float.
- `blocked_qdq`: the portable form, int4 weights behind a blocked DequantizeLinear (opset 21, `block_size` along K)
  feeding a plain MatMul, which OpenVINO and TensorRT read.

`lm_head`: "int4" quantizes it like the other weights; "int8" leaves it to ONNX Runtime's dynamic INT8
(MatMulInteger, per-channel): the vocabulary projection is where 4-bit rounding errors reach the logits directly.
(Chosen when MatMulNBits at 8 bits had no fast CPU kernel: 1 tok/s on an older ONNX Runtime. 1.32 has one, which
the INT8 decoder's lm_head uses, calibration/dynamic.py; not tried here.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from vl_export.errors import InputError

from .quantize import EXTERNAL_DATA_BYTES

BLOCK_SIZES = (32, 64, 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
LM_HEAD_BITS = ("int4", "int8")


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


def _quantize(src: Path, dst: Path, block_size: int, symmetric: bool, accuracy_level: int | None, qdq: bool,
              exclude: list[str]) -> None:
    """MatMulNBitsQuantizer over the graph alone: each fp32 weight is read from `src`'s external data when its
    MatMul is quantized (the quantizer reads weights through onnx_ir, which maps the file), so the step holds the
    4-bit graph and one fp32 weight instead of the whole fp32 decoder. What stays float comes in at the end."""
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs every node at INFO
    model = onnx.load(str(src), load_external_data=False)
    data_dir = src.parent.resolve()
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    for tensor in external:  # absolute while the quantizer reads them (it knows no base directory)
        _set_location(tensor, str(data_dir / ExternalDataInfo(tensor).location))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                     quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    out = quantizer.model.model
    for tensor in out.graph.initializer:
        if uses_external_data(tensor):
            _set_location(tensor, str(Path(ExternalDataInfo(tensor).location).relative_to(data_dir)))
    load_external_data_for_model(out, str(data_dir))
    size = sum(t.ByteSize() for t in out.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(out, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data")
    else:
        onnx.save_model(out, str(dst))


def _set_location(tensor: onnx.TensorProto, location: str) -> None:
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location


def matmul_nbits(src: Path, dst: Path, block_size: int = 32, accuracy_level: int = 4, symmetric: bool = True,
                 lm_head: str = "int8") -> None:
    """ONNX Runtime's INT4 decoder: every weight MatMul as MatMulNBits; lm_head 4-bit too or dynamic INT8."""
    _check(block_size, accuracy_level, lm_head)
    head = lm_head_node(onnx.load(str(src), load_external_data=False))
    if lm_head == "int4":
        _quantize(src, dst, block_size, symmetric, accuracy_level, qdq=False, exclude=[])
        return
    import tempfile

    from .dynamic import dynamic_int8

    with tempfile.TemporaryDirectory(prefix="vl-export-int4-", dir=dst.parent) as tmp:
        staged = Path(tmp) / dst.name
        _quantize(src, staged, block_size, symmetric, accuracy_level, qdq=False, exclude=[head])
        # The only fp32 weight MatMul left is lm_head: ONNX Runtime's dynamic INT8 for it, with 7-bit weights as
        # quantize.dynamic_int8 (no int16 saturation on CPUs without int8 dot products).
        if dynamic_int8(staged, dst) != 1:
            raise RuntimeError("expected lm_head to be the one fp32 MatMul left after INT4")


def blocked_qdq(src: Path, dst: Path, block_size: int = 32, symmetric: bool = True) -> None:
    """The portable INT4 decoder: int4 weights, DequantizeLinear with `block_size` (opset 21), plain MatMul.
    lm_head is 4-bit too (a portable int8 lm_head would be weight-only Q/DQ at twice the bytes)."""
    _check(block_size, 0, "int4")
    _quantize(src, dst, block_size, symmetric, None, qdq=True, exclude=[])
