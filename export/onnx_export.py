"""What each graph is, as data (names, dtypes, symbolic axes, example sizes), and the one function exporting it."""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from vl_export.manifest import GraphEntry, TensorSpec
from vl_export.spec import ModelSpec

from .graphs import Decoder, Projector, VisionEncoder

OPSET = 18
WRAPPERS = {"vision_encoder": VisionEncoder, "projector": Projector, "decoder": Decoder}
FILES = {"vision_encoder": "vision_encoder.onnx", "projector": "projector.onnx", "decoder": "decoder.onnx"}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Sizes of the example inputs the exporter traces with: all distinct and >= 2, so no axis gets specialised.
EXAMPLE_SIZES = {"tiles": 2, "batch": 2, "seq": 5, "past": 3, "total": 8, "num_logits": 2}
# Above this many bytes of weights a graph is saved with ONNX external data: written tensor by tensor and checked
# by path without reading its weights back. Inline, the same-size 1B's 1.2 GB vision graph was serialised whole and
# read back whole by the checker (the fp32 export's peak, 5.7 GiB). The projector and the tiny models stay inline.
EXTERNAL_DATA_BYTES = 100_000_000


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """`past_key_values.{i}.key|value` or `present.{i}.key|value`, in the graph's order."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def graph_io(role: str, spec: ModelSpec, precision: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    v, t = spec.vision, spec.text
    if role == "vision_encoder":
        return (
            (TensorSpec("pixel_values", "float32", ("tiles", v.num_channels, v.image_size, v.image_size)),),
            (TensorSpec("vision_features", "float32", ("tiles", v.num_positions, v.hidden_size)),),
        )
    if role == "projector":
        return (
            (TensorSpec("vision_features", "float32", ("tiles", v.num_positions, v.hidden_size)),),
            (TensorSpec("image_embeds", "float32", ("tiles", spec.num_image_tokens, t.hidden_size)),),
        )
    kv_dtype = "float16" if precision == "fp16" else "float32"
    kv_in = ("batch", t.num_kv_heads, "past", t.head_dim)
    kv_out = ("batch", t.num_kv_heads, "total", t.head_dim)
    inputs = (
        TensorSpec("inputs_embeds", "float32", ("batch", "seq", t.hidden_size)),
        TensorSpec("attention_mask", "int64", ("batch", "total")),
        TensorSpec("position_ids", "int64", ("batch", "seq")),
        TensorSpec("logits_positions", "int64", ("batch", "num_logits")),
        *(TensorSpec(n, kv_dtype, kv_in) for n in kv_names(t.num_layers, "past_key_values")),
    )
    outputs = (
        TensorSpec("logits", "float32", ("batch", "num_logits", t.vocab_size)),
        *(TensorSpec(n, kv_dtype, kv_out) for n in kv_names(t.num_layers, "present")),
    )
    return inputs, outputs


def example_inputs(inputs: tuple[TensorSpec, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Valid random feeds for a graph at EXAMPLE_SIZES (masks of ones, in-range positions)."""
    rng = np.random.default_rng(seed)
    sizes = EXAMPLE_SIZES
    feeds = {}
    for t in inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.name == "attention_mask":
            feeds[t.name] = np.ones(shape, np.int64)
        elif t.name == "position_ids":
            feeds[t.name] = np.broadcast_to(np.arange(sizes["past"], sizes["total"]), shape).copy()
        elif t.name == "logits_positions":
            feeds[t.name] = np.broadcast_to(np.arange(sizes["seq"] - shape[1], sizes["seq"]), shape).copy()
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def _dynamic_shapes(wrapper: torch.nn.Module, inputs: tuple[TensorSpec, ...]):
    """torch.export Dims named after the symbolic axes, grouped as the forward signature takes them."""
    dims = {name: torch.export.Dim(name, min=0 if name == "past" else 1) for name in EXAMPLE_SIZES}
    per_input = [{i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in inputs]
    params = list(inspect.signature(wrapper.forward).parameters.values())
    fixed = sum(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)
    if fixed < len(params):
        return (*per_input[:fixed], tuple(per_input[fixed:]))
    return tuple(per_input)


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graph(role: str, model: torch.nn.Module, spec: ModelSpec, precision: str, out_dir: Path,
                 release_weights: bool = False, torch_exporter: bool | None = None, quantized=None) -> GraphEntry:
    """Write one graph to out_dir/FILES[role]; names, dtypes and axes as `graph_io` says.

    The three graphs are built from the weights (graphs_portable.py: the graphs torch.onnx exports of graphs.py's
    wrappers, op for op; tests hold the two equal on outputs) unless `torch_exporter` asks for that export, the
    reference those tests build. `quantized` (decoder_variants.Quantized) writes that quantized form of the built graph
    instead, straight from the weights.
    `release_weights` frees the torch weights only this graph reads once it is written, before the checker
    reads the file back.
    """
    import onnx

    from .graphs_portable import BUILDERS

    path = out_dir / (quantized.file if quantized else FILES[role])
    if torch_exporter is None:
        torch_exporter = role not in BUILDERS
    if quantized is not None:
        entry = quantized.entry(BUILDERS[role](model, spec, precision, path, quantized.make))
    elif torch_exporter:
        entry = _torch_export(role, model, spec, precision, path)
    elif role in BUILDERS:
        entry = BUILDERS[role](model, spec, precision, path)
    else:
        raise ValueError(f"{role} is not built from the weights (only {', '.join(BUILDERS)})")
    if release_weights:
        release_graph_weights(role, model)
    onnx.checker.check_model(str(path), full_check=True)
    return entry


def _torch_export(role: str, model: torch.nn.Module, spec: ModelSpec, precision: str, path: Path) -> GraphEntry:
    """torch.onnx's export of `role`'s wrapper. The exporter's ONNX IR refers to the torch tensors and is written
    straight to disk (a graph over EXTERNAL_DATA_BYTES tensor by tensor into its .data file), never copied into a
    whole protobuf first."""
    import onnx_ir as ir

    inputs, outputs = graph_io(role, spec, precision)
    to_full_precision(role, model)
    wrapper = WRAPPERS[role](model, spec, TORCH_DTYPES[precision]).eval()
    feeds = example_inputs(inputs)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in inputs)
    external = _weight_bytes(wrapper) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), _quiet_exporter(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            input_names=[t.name for t in inputs],
            output_names=[t.name for t in outputs],
            dynamic_shapes=_dynamic_shapes(wrapper, inputs),
            dynamo=True,
            opset_version=OPSET,
            verbose=False,
        )
    graph_ir = program.model
    _name_axes(graph_ir.graph.inputs, inputs)
    _name_axes(graph_ir.graph.outputs, outputs)
    graph_ir.metadata_props.update({"vl_export.role": role, "vl_export.precision": precision})
    if external:
        ir.save(graph_ir, path, external_data=path.name + ".data")
    else:
        ir.save(graph_ir, path)
    del program, graph_ir, wrapper
    _forget_exported_graph()
    return GraphEntry(role=role, file=path.name, precision=precision, inputs=inputs, outputs=outputs)


def _forget_exported_graph() -> None:
    """Drop what onnxscript's rewrite rules remember of the last graph they matched.

    The exporter's optimiser runs module-level rewrite rules whose pattern matchers keep the graph of their last
    match (`_graph`, `_match`, `_current_node`, set afresh on every match). That graph's initializers wrap the torch
    parameters, so every exported graph's weights stayed resident until the next export: freeing a graph's weights
    after its export gave nothing back (the same-size 2B build held its 9 GiB through the vision export).
    """
    import gc

    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # a later onnxscript without this module: nothing of it to clear
        return
    for obj in gc.get_objects():
        if issubclass(type(obj), PatternMatcher):  # type(): isinstance would read deprecated objects' __class__
            for name in ("_graph", "_match", "_current_node", "_tracer"):
                if name in obj.__dict__:
                    setattr(obj, name, None)


def graph_modules(role: str, model: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules whose weights only `role`'s graph reads (the embedding table is written on its own)."""
    inner = model.model
    if role == "vision_encoder":
        return [inner.vision_tower]
    if role == "projector":
        return [inner.multi_modal_projector]
    lm = inner.language_model
    return [*lm.layers, lm.norm, model.lm_head]


def to_full_precision(role: str, model: torch.nn.Module) -> None:
    """Upcast `role`'s weights to fp32 in place (a no-op when they are): the exporter holds a bf16 checkpoint in bf16
    until the graph that reads each weight is exported. Module by module, so the bf16 and fp32 copies of one graph
    are never both whole; a tied lm_head stays tied (the shared parameter's data is replaced)."""
    for module in graph_modules(role, model):
        module.float()


def release_graph_weights(role: str, model: torch.nn.Module) -> None:
    """Move `role`'s weights to the meta device: their memory goes back; the model can no longer run that part."""
    for module in graph_modules(role, model):
        module.to("meta")
    from vl_export.memory import release

    release()


def _name_axes(values, specs: tuple[TensorSpec, ...]) -> None:
    """Give every symbolic axis the manifest's name (the exporter writes e.g. 'seq + past')."""
    import onnx_ir as ir

    by_name = {t.name: t for t in specs}
    for value in values:
        dims = value.shape.dims
        value.shape = ir.Shape([ir.SymbolicDim(want) if isinstance(want, str) else dim
                                for dim, want in zip(dims, by_name[value.name].shape)])


class _quiet_exporter:
    """torch.onnx prints progress and torchvision notices on every export; keep the user's terminal for ours."""

    def __enter__(self):
        self._level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        self._null = open(os.devnull, "w")
        self._stdout = os.dup(1)
        os.dup2(self._null.fileno(), 1)
        return self

    def __exit__(self, *exc):
        os.dup2(self._stdout, 1)
        os.close(self._stdout)
        self._null.close()
        logging.getLogger("torch.onnx").setLevel(self._level)
        return False
