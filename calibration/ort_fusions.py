"""ONNX Runtime-only rewrites of the exported vision graph: attention into com.microsoft.MultiHeadAttention and
erf-GELU into com.microsoft.Gelu, before its dynamic INT8 quantization.

ONNX Runtime's own transformer optimizer does not recognise these patterns in the dynamo-exported InternViT (the
layer scale between attention and residual, and the operand order of the GELU), so the ORT variant would keep
materialising the (heads, 1025, 1025) score matrix through three kernels. Each rewrite checks the exact pattern
and leaves anything else untouched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    def __init__(self, model: onnx.ModelProto, base_dir: Path):
        self.model = model
        self.base_dir = str(base_dir)  # where the graph's external data is, for the few constants read from it
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers = {t.name: t for t in model.graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], self.base_dir)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def op(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _attention(g: _Graph, softmax) -> tuple[list, onnx.NodeProto] | None:
    """Reshape/Transpose(q, k, v) -> MatMul(q, kT) * scale -> Softmax -> MatMul(., v) -> Transpose -> Reshape."""
    scaled = g.op(softmax.input[0], "Mul")
    qk = scaled and g.op(scaled.input[0], "MatMul")
    scale = scaled is not None and g.const(scaled.input[1])
    if qk is None or scale is None or np.size(scale) != 1:
        return None
    tq, tk = g.op(qk.input[0], "Transpose"), g.op(qk.input[1], "Transpose")
    pv = g.only_consumer(softmax.output[0], "MatMul")
    tv = pv and g.op(pv.input[1], "Transpose")
    to = pv and g.only_consumer(pv.output[0], "Transpose")
    ro = to and g.only_consumer(to.output[0], "Reshape")
    if None in (tq, tk, tv, to, ro):
        return None
    rq, rk, rv = (g.op(t.input[0], "Reshape") for t in (tq, tk, tv))
    if None in (rq, rk, rv):
        return None
    perms = [list(next(a.ints for a in t.attribute if a.name == "perm")) for t in (tq, tk, tv, to)]
    if perms != [[0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3], [0, 2, 1, 3]]:
        return None
    shape = g.const(rq.input[1])
    if shape is None or len(shape) != 4:
        return None
    mha = helper.make_node("MultiHeadAttention", [rq.input[0], rk.input[0], rv.input[0]], [ro.output[0]],
                           domain=MS_DOMAIN, num_heads=int(shape[2]), scale=float(np.ravel(scale)[0]),
                           name=softmax.name + "_mha")
    return [scaled, qk, tq, tk, tv, rq, rk, rv, softmax, pv, to, ro], mha


def _gelu(g: _Graph, erf) -> tuple[list, onnx.NodeProto] | None:
    """x * (0.5 * (erf(x / sqrt(2)) + 1)), as the exporter writes torch's exact GELU."""
    div = g.op(erf.input[0], "Div")
    add = g.only_consumer(erf.output[0], "Add")
    half = add and g.only_consumer(add.output[0], "Mul")
    out = half and g.only_consumer(half.output[0], "Mul")
    if None in (div, add, half, out):
        return None
    x = div.input[0]
    constants = (g.const(div.input[1]), g.const(add.input[1]), g.const(next(i for i in half.input if i != add.output[0])))
    if any(c is None for c in constants) or x not in out.input:
        return None
    if not np.allclose([float(np.ravel(c)[0]) for c in constants], [np.sqrt(2.0), 1.0, 0.5], rtol=1e-6):
        return None
    return [div, erf, add, half, out], helper.make_node("Gelu", [x], [out.output[0]], domain=MS_DOMAIN, name=erf.name + "_gelu")


def fuse_for_onnxruntime(src: Path, dst: Path) -> dict[str, int]:
    """Write `src` with its attention and GELU patterns fused; returns how many of each were fused.

    Only the graph is read: the weights stay in `src`'s external data. A `dst` beside `src` refers to that same
    data file (nothing is copied: the step's memory is the graph, not the 1.2 GB of InternViT-300M's weights); one
    elsewhere gets the weights written into it."""
    model = onnx.load(str(src), load_external_data=False)
    g = _Graph(model, src.parent)
    replaced: dict[int, onnx.NodeProto | None] = {}
    counts = {"MultiHeadAttention": 0, "Gelu": 0}
    for node in list(model.graph.node):
        matcher = {"Softmax": _attention, "Erf": _gelu}.get(node.op_type)
        found = matcher(g, node) if matcher else None
        if found is None or any(id(n) in replaced for n in found[0]):
            continue
        removed, fused = found
        for n in removed:
            replaced[id(n)] = None
        replaced[id(removed[-1])] = fused  # the fused node takes the place of the pattern's last node
        counts[fused.op_type] += 1
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    model.graph.ClearField("node")
    model.graph.node.extend(n for n in nodes if n is not None)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if dst.parent.resolve() == src.parent.resolve():
        onnx.save_model(model, str(dst))  # the initializers keep their references into src's data file
    else:
        from onnx.external_data_helper import load_external_data_for_model

        from .quantize import save

        load_external_data_for_model(model, str(src.parent))
        save(model, dst)
    return counts
