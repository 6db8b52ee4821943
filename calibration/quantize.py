"""INT8 graphs from fp32 graphs: static W8A8 Q/DQ and dynamic INT8 through ONNX Runtime's quantizer, and the
weight-only INT8 Q/DQ form for the decoder.

ONNX Runtime's quantization tools do the calibration (minmax, entropy, percentile), the symmetric per-channel
weight scales and the Q/DQ placement. Its weight-only quantizer emits Q/DQ only for 4 bits (8 bits becomes the
ORT-only MatMulNBits), so the portable weight-only INT8 decoder -- int8 weights behind DequantizeLinear, which
TensorRT and OpenVINO read -- comes from `weight_only_int8` here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vl_export.errors import InputError

METHODS = ("minmax", "entropy", "percentile")
EXTERNAL_DATA_BYTES = 1_800_000_000
Feeds = Callable[[], Iterable[dict[str, np.ndarray]]]


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a feed generator."""

    def __init__(self, feeds: Feeds):
        self._feeds: Iterator = iter(feeds())

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # not needed: each quantize call makes its own reader
        pass


def lean_session(calibrator) -> None:
    """Reopen the calibrator's session on its augmented graph in priority order, without ONNX Runtime's memory
    pattern.

    The calibrator appends a ReduceMin/ReduceMax pair per calibrated tensor at the end of the graph, and ONNX
    Runtime's default execution order runs them there: every calibrated tensor of the whole forward pass stays
    alive until the end. Priority-based order runs each reduction as soon as its tensor exists. Measured on the
    same-size InternViT-300M (one 448x448 tile per run, 2 threads): the session's peak RSS is 12.1 GiB from the
    second run on with ONNX Runtime's defaults, 6.4 GiB without the memory pattern and arena, 1.5 GiB in priority
    order as well (5.5-6 s a tile instead of 7-9 s). In priority order the CPU arena no longer grows with the
    pass, so it stays on: 1.48 GiB either way, 4.4-4.6 s a tile with it against 4.8-5.1 s without (the allocator
    no longer maps and faults in each large tensor anew; 2026-12-07, AVX-512 VM). Same graph, same kernels, same
    optimisation level (none, as ONNX Runtime's calibrator opens it): the ranges do not change (a test holds them
    equal).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_mem_pattern = False
    calibrator.infer_session = None  # the default session goes before the lean one loads the weights again
    calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, sess_options=options,
                                                    providers=calibrator.execution_providers)


@contextmanager
def lean_calibrator(src: Path, op_types: tuple[str, ...], method: str):
    """ONNX Runtime's calibrator for `src`, made from the graph alone and run in a lean session (`lean_session`).

    create_calibrator loads the whole model (weights too) after its shape inference, saves the augmented copy with
    the weights and opens a default session on it before anything can be changed: three copies of the weights at
    once (4.1 GiB for the same-size InternViT-300M). Here the calibrator reads the graph without its external data,
    writes the augmented graph beside `src` so that its weights stay references into `src`'s data file, and only
    the lean session ever loads them. Same augmentation code, same reductions, same ranges (a test holds them equal
    to ONNX Runtime's untouched calibrator). The augmented graph is removed on the way out.
    """
    from unittest import mock

    from onnxruntime.quantization import calibrate as ort_calibrate
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    def graph_with_shapes(model_path: Path) -> onnx.ModelProto:  # quant_utils.load_model_with_shape_infer, no weights
        inferred = model_path.with_name(model_path.stem + "-inferred.onnx")
        try:
            onnx.shape_inference.infer_shapes_path(str(model_path), str(inferred))
            model = onnx.load(str(inferred), load_external_data=False)
        finally:
            inferred.unlink(missing_ok=True)
        add_infer_metadata(model)
        return model

    augmented = src.with_name(src.stem + ".augmented.onnx")
    try:
        with mock.patch.object(ort_calibrate, "load_model_with_shape_infer", graph_with_shapes), \
                mock.patch.object(ort_calibrate.CalibraterBase, "create_inference_session", lambda self: None):
            calibrator = ort_calibrate.create_calibrator(
                src, list(op_types), augmented_model_path=str(augmented), calibrate_method=_ort_method(method),
                use_external_data_format=False, providers=["CPUExecutionProvider"],
                extra_options={"symmetric": True, "percentile": 99.999},  # TensorRT wants symmetric ranges
            )
        lean_session(calibrator)
        yield calibrator
    finally:
        augmented.unlink(missing_ok=True)


def _quiet():
    """ONNX Runtime's quantizer logs a pre-processing hint at WARNING on every call; ours say what happened."""
    logging.getLogger().setLevel(logging.ERROR)


def calibrate(src: Path, feeds: Feeds, method: str, cache: Path, op_types: tuple[str, ...]) -> None:
    """Activation ranges of `src` over `feeds`, written to `cache` in ONNX Runtime's calibration-cache format.

    Drives ONNX Runtime's calibrator one feed at a time: its histogram calibrators otherwise hold every
    intermediate tensor of every feed (16 GB for 24 tiles of InternViT-300M), and its CalibMaxIntermediateOutputs
    option discards the batches it should merge (onnxruntime 1.32).
    """
    from onnxruntime.quantization.calibrate import save_tensors_data

    with lean_calibrator(src, op_types, method) as calibrator:
        seen = 0
        for feed in feeds():
            calibrator.collect_data(_Reader(lambda feed=feed: [feed]))
            seen += 1
        if not seen:
            raise InputError("the calibration data produced no inputs")
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator


def w8a8(src: Path, dst: Path, feeds: Feeds, method: str, cache: Path | None,
         op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv"), weights_only_matmuls: bool = True,
         seven_bit_weights: bool = False) -> bool:
    """Static W8A8: symmetric int8 activations (calibrated) and symmetric per-channel int8 weights, as Q/DQ.

    `weights_only_matmuls` leaves the attention matmuls (both inputs activations) in float: only layers with
    weights are quantized; LayerNorm, Softmax and GELU stay in float because they are not in `op_types`.
    `seven_bit_weights` (for CPU bundles) keeps the weights within [-64, 64]: ONNX Runtime's and OpenVINO's CPU
    kernels shift s8 activations to u8 and multiply with VPMADDUBSW on CPUs without int8 dot products, whose int16
    pair sums saturate with full-range weights (see `dynamic_int8`). GPUs accumulate in int32: TensorRT bundles
    keep all 8 bits.
    Returns True when the ranges came from `cache` instead of a calibration run.
    """
    import tempfile

    from .static_qdq import write_w8a8

    _quiet()
    with tempfile.TemporaryDirectory(prefix="vl-export-calib-") as tmp:
        ranges = cache if cache is not None else Path(tmp) / "ranges.json"
        reused = ranges.is_file()
        if not reused:
            calibrate(src, feeds, method, ranges, op_types)
        # The graph ONNX Runtime's quantize_static(QDQ, per_channel, ActivationSymmetric, WeightSymmetric,
        # reduce_range=seven_bit_weights, OpTypesToExcludeOutputQuantization=op_types) writes, weight by weight:
        # Q/DQ on the inputs of quantized layers only, as TensorRT's placement guide asks (their outputs feed the
        # bias add and the residual sum in float); zero points 0, as TensorRT requires.
        write_w8a8(src, dst, read_ranges(ranges), op_types,
                   exclude=activation_matmuls(src) if weights_only_matmuls else (), reduce_range=seven_bit_weights)
    return reused


def read_ranges(cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A calibration cache (ONNX Runtime's TensorsData JSON) -> {tensor: (lowest, highest)}."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    return {name: data.range_value for name, data in load_tensors_data(cache).data.items()}


def structure_sha256(path: Path) -> str:
    """A graph's nodes (with their attributes and tensor names) and its inputs and outputs, not its weights: what
    activation ranges are ranges of."""
    import hashlib

    graph = onnx.load(str(path), load_external_data=False).graph
    digest = hashlib.sha256()
    for proto in (*graph.input, *graph.output, *graph.node):
        digest.update(proto.SerializeToString(deterministic=True))
    return digest.hexdigest()


def activation_matmuls(path: Path) -> list[str]:
    """Names of the MatMuls whose inputs are both activations (attention's QK^T and PV)."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def dynamic_int8(src: Path, dst: Path, head_block: int | None = None) -> None:
    """ONNX Runtime's dynamic INT8: int8 per-channel weights, activations quantized per call (MatMulInteger).

    The fast INT8 form on ONNX Runtime's CPU kernels; no calibration. ORT-only in practice. Written weight by
    weight (`dynamic.dynamic_int8`: the graph ONNX Runtime's quantize_dynamic writes, without holding the fp32
    graph whole).

    The weights use 7 of the 8 bits (reduce_range): on x86 CPUs without int8 dot products (AVX2, AVX-512 without
    VNNI) ORT multiplies u8 activations by s8 weights with VPMADDUBSW, whose int16 sums of two products saturate
    when both are large (255 * 127 * 2 > 32767), silently corrupting the result. Seven-bit weights cannot saturate
    (255 * 64 * 2 < 32768), and cost one bit of weight precision on the CPUs that would not have saturated; a bundle
    does not know which CPU it will run on. (ORT's quantization guide gives the same advice.)

    `head_block`: a decoder's lm_head as 8-bit MatMulNBits instead (`dynamic.nbits8_matmul`).
    """
    from .dynamic import dynamic_int8 as streamed

    streamed(src, dst, head_block)


def fused_dynamic_int8(src: Path, dst: Path) -> None:
    """The ONNX Runtime vision variant: attention and GELU fused into ORT's kernels, then dynamic INT8. The fused
    fp32 graph is written beside `src` and shares its external data (removed after), so neither step holds the
    fp32 weights whole: dynamic_int8 reads them one at a time."""
    from .ort_fusions import fuse_for_onnxruntime

    fused = src.with_name(src.stem + ".fused.onnx")
    try:
        fuse_for_onnxruntime(src, fused)
        dynamic_int8(fused, dst)
    finally:
        fused.unlink(missing_ok=True)


def weights_of(src: Path) -> Callable[[onnx.TensorProto], np.ndarray]:
    """How a quantizer reads one of `src`'s initializers, as an array of its own that it may overwrite: straight from
    the graph's external data file where that is where the tensor is (no bytes object in between)."""
    from onnx.external_data_helper import ExternalDataInfo

    def read(tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor).copy()
        info = ExternalDataInfo(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        location = (src.parent / info.location).resolve()
        if src.parent.resolve() not in location.parents:  # a graph's data lives beside it, never elsewhere
            raise ValueError(f"{tensor.name}: external data {info.location!r} is outside {src.parent}")
        count = int(np.prod(tensor.dims, dtype=np.int64))
        array = np.fromfile(location, dtype=dtype, count=count, offset=info.offset or 0)
        if array.size != count:
            raise ValueError(f"{tensor.name}: {location.name} holds {array.size} of its {count} values")
        return array.reshape(tuple(tensor.dims))

    return read


def of_file(make: Callable[[onnx.ModelProto, Callable[[onnx.TensorProto], np.ndarray], Path], object]
            ) -> Callable[[Path, Path], object]:
    """A quantizer of a graph whose weights it reads one at a time (`*_model`) as one of files: `src`'s graph, its
    weights read from its external data."""
    return lambda src, dst: make(onnx.load(str(src), load_external_data=False), weights_of(src), dst)


def load_the_rest(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], np.ndarray], written: WeightFile) -> None:
    """Bring every initializer still stored elsewhere (the source's external data, or a graph built in memory) into
    the model; what the quantizer itself wrote to external data stays there."""
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not written.holds(tensor):
            tensor.CopyFrom(numpy_helper.from_array(read(tensor), tensor.name))


def weight_only_int8(src: Path, dst: Path) -> int:
    """Every MatMul whose B is a 2-D float weight gets int8 weights (symmetric, per output column) and a
    DequantizeLinear in front; activations stay float. Returns the number of weights quantized.

    Weights are read one at a time from the graph's external data (when it has any), so the peak is the int8
    graph plus one fp32 weight, not the whole fp32 graph.
    """
    return weight_only_int8_model(onnx.load(str(src), load_external_data=False), weights_of(src), dst)


def weight_only_int8_model(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], np.ndarray], dst: Path) -> int:
    """`weight_only_int8` of a graph whose weights `read` gives one at a time (a file's external data, or the
    weights of a graph being built from a checkpoint, which then never exists in fp32 on disk)."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    written = WeightFile(dst, streamed(model))
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes, count = [], 0
    for node in graph.node:
        name = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        tensor = weights.get(name) if name else None
        if tensor is None or len(tensor.dims) != 2 or tensor.data_type != onnx.TensorProto.FLOAT or consumers[name] != 1:
            new_nodes.append(node)
            continue
        w = read(tensor)  # (K, N): y = x @ w
        scale = np.maximum(np.maximum(w.max(axis=0), -w.min(axis=0)), 1e-12) / 127.0  # (N,) = max |w| / 127
        q = np.divide(w, scale, out=w)  # then rounded and clipped in place: one fp32 copy of one weight at a time
        np.clip(np.rint(q, out=q), -127, 127, out=q)
        tensor.CopyFrom(written.tensor(q.astype(np.int8), name + "_int8"))
        del w, q
        graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), name + "_scale"))
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", [name + "_int8", name + "_scale"], [name + "_dq"],
                                               name=name + "_DequantizeLinear", axis=1))
        node.input[1] = name + "_dq"
        new_nodes.append(node)
        count += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    load_the_rest(model, read, written)  # what stayed float (norms, biases) comes in whole
    written.save(model)
    return count


STREAM_BYTES = 100_000_000  # quantized weights above this go to external data as they are made (WeightFile)


class WeightFile:
    """Where a quantizer puts the weights it makes: into the graph, or (`streamed`) each into `dst`'s external data
    file as soon as it is made, so that the quantized graph is never whole in memory and is not serialised whole
    (an inline 0.5 GB int8 decoder was held twice at its save: 1.9 GiB for the step at the 1B). Offsets are aligned
    to 4096 bytes, as memory-mapping readers prefer."""

    def __init__(self, dst: Path, streamed: bool):
        self.dst, self.location = dst, dst.name + ".data"
        self._file = open(dst.with_name(self.location), "wb") if streamed else None

    def tensor(self, array: np.ndarray, name: str, dims: tuple[int, ...] | None = None,
               data_type: int | None = None) -> onnx.TensorProto:
        """`array` as initializer `name`; with `dims` and `data_type`, `array` is that type's packed bytes (INT4)."""
        if self._file is None:
            if data_type is None:
                return numpy_helper.from_array(array, name)
            return onnx.TensorProto(name=name, data_type=data_type, dims=dims, raw_data=array.tobytes())
        if data_type is None:
            dims, data_type = array.shape, onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = onnx.TensorProto(name=name, data_type=data_type, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
        end = self._file.tell()
        offset = end + -end % 4096  # the next 4096-byte boundary
        self._file.seek(offset)
        np.ascontiguousarray(array).tofile(self._file)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def holds(self, tensor: onnx.TensorProto) -> bool:
        return self._file is not None and any(e.key == "location" and e.value == self.location
                                              for e in tensor.external_data)

    def save(self, model: onnx.ModelProto) -> None:
        if self._file is None:
            return save(model, self.dst)
        self._file.close()
        onnx.save_model(model, str(self.dst))  # what is inline (scales, norms, biases) is small


def streamed(model: onnx.ModelProto) -> bool:
    """Whether the int8 forms of the graph's MatMul weights come to more than STREAM_BYTES."""
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    return sum(sizes.get(name, 0) for name in weights) > STREAM_BYTES


def save(model: onnx.ModelProto, dst: Path) -> None:
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.name + ".data")
    else:
        onnx.save_model(model, str(dst))


def count_ops(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
