"""What the graphs built from the weights (graphs_gqa.py, graphs_portable.py) share: an onnx_ir tape whose weight
initializers are made only when the graph is written, one weight at a time, the casts and the RMSNorm of graphs.py's
precision rules, and the graph's saving.

A weight is read into fp32 (then the graph's dtype) only when it is written, so a bf16 checkpoint stays bf16 through
the step and the graph never holds all its weights at once: the step's peak is the torch weights plus one weight
(the exported graph's step peaked at the torch weights upcast to fp32 plus the exporter's copies).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vl_export.manifest import TensorSpec

if TYPE_CHECKING:
    import onnx


def ir_dtype(name: str):
    import onnx_ir as ir

    return ir.DataType.from_numpy(np.dtype(name))


def to_numpy(t) -> np.ndarray:
    """A torch tensor as fp32 numpy (bf16 -> fp32 is exact)."""
    return t.detach().to("cpu").float().numpy()


def transposed(weights: list, dtype=np.float32, rows: int = 2048) -> np.ndarray:
    """[W_0; W_1; ...].T as one C-ordered (in, out) array of `dtype`, filled a block of rows at a time: no whole fp32
    copy of a bf16 weight beside its transposed copy (lm_head: 2 x 0.54 GB at Qwen2.5-0.5B). torch's copy_ converts
    and transposes each block in cache-sized tiles (lm_head: 0.08 s; numpy's strided assignment took 2.1 s)."""
    import torch

    out = np.empty((weights[0].shape[1], sum(w.shape[0] for w in weights)), dtype)
    target = torch.from_numpy(out)  # shares out's memory
    column = 0
    for w in weights:
        w = w.detach().to("cpu")
        for start in range(0, w.shape[0], rows):
            block = w[start : start + rows]  # (rows, in)
            target[:, column + start : column + start + block.shape[0]].copy_(block.t())
        column += w.shape[0]
    return out


class WeightGraph:
    """A tape of nodes and initializers; `matmul` reads linear layers' weights lazily."""

    def __init__(self, matmul_dtype=np.float32):
        import onnx_ir as ir

        self.tape = ir.tape.Tape()
        self.weight_bytes = 0
        self.matmul_dtype = np.dtype(matmul_dtype)
        self.wide = ir.DataType.from_numpy(self.matmul_dtype)  # the matmuls' (and a decoder's KV cache's) dtype
        self._ints = 0
        self._two = None  # RMSNorm's exponent, made with the first RMSNorm
        self._gelu = None  # the erf GELU's constants, made with the first GELU
        self._blocked: dict = {}  # an additive mask's 0 and most negative number, per dtype, made with the first mask

    def const(self, name: str, array: np.ndarray):
        import onnx_ir as ir

        array = np.asarray(array, order="C")  # asarray keeps 0-d scalars 0-d
        self.weight_bytes += array.nbytes
        return self.tape.initializer(ir.tensor(array, name=name))

    def i64(self, values):
        """An int64 constant (shapes, axes, indices), named by a counter."""
        self._ints += 1
        return self.const(f"const.i64.{self._ints}", np.array(values, np.int64))

    def cast(self, x, to):
        """graphs.py's .to()/.float(): in an fp32 graph every value is fp32 already, so nothing."""
        if self.matmul_dtype == np.float32:
            return x
        return self.tape.op("Cast", [x], {"to": to})

    def rms_norm(self, x, weight, eps):
        """weight * (x * rsqrt(mean(x^2) + eps)), fp32, as graphs._rms_norm exports (`weight`, `eps`: values)."""
        if self._two is None:
            self._two = self.const("const.two", np.array(2.0, np.float32))
        op = self.tape.op
        mean = op("ReduceMean", [op("Pow", [x, self._two]), self.i64([-1])], {"keepdims": 1})
        inverse = op("Reciprocal", [op("Sqrt", [op("Add", [mean, eps])])])
        return op("Mul", [weight, op("Mul", [x, inverse])])

    def gelu(self, x):
        """x * (0.5 * (erf(x / sqrt 2) + 1)) in the matmul dtype: the exporter's erf GELU, which ONNX Runtime's fusion
        turns into its Gelu kernel."""
        if self._gelu is None:
            self._gelu = [self.const(f"gelu.{n}", np.array(v, self.matmul_dtype))
                          for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
        sqrt2, one, half = self._gelu
        op = self.tape.op
        return op("Mul", [x, op("Mul", [half, op("Add", [op("Erf", [op("Div", [x, sqrt2])]), one])])])

    def blocked_where(self, allowed, dtype=np.float32):
        """0 where `allowed` (bool), the most negative `dtype` number where not: the decoders' additive attention mask
        (finite, not -inf: a row with every key blocked, a left-padded row's padding, then attends uniformly instead
        of to NaN, which a zero weight would not cancel further on)."""
        dtype = np.dtype(dtype)
        if dtype not in self._blocked:
            suffix = "" if dtype == np.float32 else f"_{dtype.name}"
            self._blocked[dtype] = (self.const(f"const.zero_f{suffix}", np.array(0.0, dtype)),
                                    self.const(f"const.blocked{suffix}", np.array(np.finfo(dtype).min, dtype)))
        return self.tape.op("Where", [allowed, *self._blocked[dtype]], name="mask/Where")

    def weight(self, name: str, make, shape: tuple[int, int]):
        """An initializer of the matmul dtype made only when it is written."""
        import onnx_ir as ir

        self.weight_bytes += self.matmul_dtype.itemsize * shape[0] * shape[1]
        tensor = ir.LazyTensor(lambda: ir.tensor(np.asarray(make(), order="C")), self.wide, ir.Shape(shape), name=name)
        return self.tape.initializer(tensor)

    def matmul(self, x, linears: list, name: str):
        """x @ [W_0; W_1; ...].T (+ the biases) in the matmul dtype: one MatMul for projections that read the same
        input."""
        shape = (linears[0].weight.shape[1], sum(m.weight.shape[0] for m in linears))  # (in, out)
        w = self.weight(f"{name}.weight", lambda: transposed([m.weight for m in linears], self.matmul_dtype), shape)
        y = self.tape.op("MatMul", [x, w], name=f"{name}/MatMul")
        if linears[0].bias is not None:
            b = np.concatenate([to_numpy(m.bias) for m in linears]).astype(self.matmul_dtype)
            y = self.tape.op("Add", [y, self.const(f"{name}.bias", b)], name=f"{name}/Add")
        return y

    def save(self, path: Path, inputs: list, outputs: list, output_specs: tuple[TensorSpec, ...], name: str,
             opset_imports: dict[str, int], metadata: dict[str, str], external_bytes: int,
             quantize: Quantizer | None = None) -> None:
        """Write the graph to `path` (external data above `external_bytes` of weights); `outputs` get the specs'
        dtypes and named shapes. With `quantize`, `path` gets what that quantizer makes of the graph, each weight
        read from the checkpoint when it is quantized: the full-precision graph is never written."""
        import onnx
        import onnx_ir as ir

        for value, spec in zip(outputs, output_specs):
            value.dtype = ir_dtype(spec.dtype)
            value.shape = ir.Shape(spec.shape)
        graph = ir.Graph(inputs, outputs, nodes=self.tape.nodes, initializers=self.tape.initializers,
                         opset_imports=opset_imports, name=name)
        model = ir.Model(graph, ir_version=10, producer_name="vl-export")
        model.metadata_props.update(metadata)
        if quantize is not None:
            proto, read = deferred(model)
            if set(opset_imports) == {""}:  # the value types the file would carry (below)
                proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
            quantize(proto, read, path)
            return
        if self.weight_bytes > external_bytes:
            ir.save(model, path, external_data=path.name + ".data")
        else:
            ir.save(model, path)
        # Every value's type and shape in the file, as the exporter writes them: ONNX Runtime's quantizers read the
        # types (its own inference stops at contrib operators), its allocation planner the named axes. Data
        # propagation carries them through Shape -> Concat -> Expand. By path: the weights are not read. Not for
        # graphs with contrib operators (the GQA decoder), whose values after them ONNX's inference cannot type:
        # ONNX Runtime infers those itself, as it always has for that graph.
        if set(opset_imports) == {""}:
            onnx.shape_inference.infer_shapes_path(str(path), str(path), data_prop=True)


Quantizer = Callable[["onnx.ModelProto", Callable[["onnx.TensorProto"], np.ndarray], Path], object]


def deferred(model) -> tuple[onnx.ModelProto, Callable[[onnx.TensorProto], np.ndarray]]:
    """`model` as a proto whose lazy weights are external-data references that lead nowhere, and the function that
    makes one of them when a quantizer reads it. The proto is what the file written by `WeightGraph.save` holds,
    without the weights' bytes."""
    import onnx_ir as ir

    makers = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.LazyTensor):
            makers[name] = tensor
            value.const_value = ir.ExternalTensor("deferred-weights", 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=name)
    proto = ir.serde.serialize_model(model)

    def read(t: onnx.TensorProto) -> np.ndarray:
        """The tensor as an array of the caller's own (quantizers overwrite what they read)."""
        if t.name in makers:
            return makers.pop(t.name).numpy()  # each weight is made once, when it is quantized
        from onnx import numpy_helper

        return numpy_helper.to_array(t).copy()

    return proto, read


def graph_inputs(specs: tuple[TensorSpec, ...]) -> dict:
    """One named graph input per spec."""
    import onnx_ir as ir

    return {s.name: ir.val(s.name, ir_dtype(s.dtype), ir.Shape(s.shape)) for s in specs}
