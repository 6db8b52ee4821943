"""SmoothQuant for the decoder's W8A8 recipe: move activation outliers into the weights before calibration.

Xiao et al., "SmoothQuant" (2023). A linear layer fed by an RMSNorm computes y = (x̂ * g) W. Per input channel j,
with s_j = max|X_j|^α / max|W_j|^(1-α) (X the norm's output over the calibration data, W_j row j of every weight
that reads it), replacing g_j by g_j / s_j and W_j by W_j * s_j leaves y unchanged in exact arithmetic, while the
activation that int8 must cover per tensor no longer has outlier channels: their range moved into the weights,
which are quantized per output channel anyway. Qwen2's decoder has exactly these pairs: input_layernorm -> q, k,
v and post_attention_layernorm -> gate, up. The final norm feeds the vocabulary head through the logits gather and
is left alone.

The fp32 graph is smoothed in place of its initializers (same ops, same names), so the W8A8 calibration and Q/DQ
insertion that follow are the same as for the unsmoothed graph.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vl_export.errors import InputError

from .quantize import Feeds, save

ALPHA = 0.5  # the paper's default for most LLMs: difficulty split evenly between activations and weights


@dataclass(frozen=True)
class SmoothPair:
    """One norm scale and the linear layers that read its output."""

    activation: str  # the norm's output tensor (the Mul by its scale)
    scale: str  # the norm's scale initializer (g)
    weights: tuple[str, ...]  # MatMul weight initializers, (in, out) each


def smooth_pairs(model: onnx.ModelProto) -> list[SmoothPair]:
    """Every `Mul(norm, g)` with `g` a 1-D initializer whose output feeds only MatMuls with weight initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        if node.op_type != "Mul":
            continue
        scales = [i for i in node.input if i in inits and len(inits[i].dims) == 1]
        readers = consumers.get(node.output[0], [])
        if len(scales) != 1 or len(consumers.get(scales[0], [])) != 1 or not readers:
            continue
        if all(r.op_type == "MatMul" and r.input[0] == node.output[0] and r.input[1] in inits
               and len(inits[r.input[1]].dims) == 2 and len(consumers[r.input[1]]) == 1 for r in readers):
            pairs.append(SmoothPair(node.output[0], scales[0], tuple(r.input[1] for r in readers)))
    return pairs


def channel_absmax(src: Path, tensors: list[str], feeds: Feeds) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor in `tensors`, over every position of every feed."""
    import onnxruntime as ort

    model = onnx.load(str(src))
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix="vl-export-smooth-") as tmp:
        path = Path(tmp) / "probe.onnx"
        save(model, path)
        del model
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        found: dict[str, np.ndarray] = {}
        for feed in feeds():
            for name, value in zip(tensors, session.run(tensors, feed)):
                peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
                found[name] = peak if name not in found else np.maximum(found[name], peak)
    if len(found) != len(tensors):
        raise InputError("the calibration data produced no decoder inputs to smooth with")
    return found


def smooth(src: Path, dst: Path, feeds: Feeds, alpha: float = ALPHA) -> int:
    """Write the smoothed fp32 graph of `src` to `dst`; returns how many norm/linear pairs were smoothed."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    model = onnx.load(str(src), load_external_data=False)
    pairs = smooth_pairs(model)
    del model
    if not pairs:
        raise InputError(f"{src.name} has no norm -> linear pairs to smooth")
    peaks = channel_absmax(src, [p.activation for p in pairs], feeds)
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    for pair in pairs:
        weights = [numpy_helper.to_array(inits[w]) for w in pair.weights]  # (in, out) each
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # (in,)
        s = np.power(np.maximum(peaks[pair.activation], 1e-5), alpha) / np.power(np.maximum(weight_peak, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        g = numpy_helper.to_array(inits[pair.scale])
        inits[pair.scale].CopyFrom(numpy_helper.from_array((g / s).astype(g.dtype), pair.scale))
        for name, w in zip(pair.weights, weights):
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), name))
    save(model, dst)
    return len(pairs)
