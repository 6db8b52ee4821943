"""The decoder with a KV cache updated in place: the cache is a preallocated (b, kv_heads, capacity, d) buffer that
is both an input (`past_key_values.*`) and, after one ScatterElements per tensor, the output (`present.*`).

Today's decoder (graphs.Decoder) concatenates past and new keys into a fresh `present`, so every decode step reads
and writes the whole cache (about 24 MB per step at 1,900 positions for Qwen2.5-0.5B in fp32). Here the new
positions are scattered into the buffer at `write_positions`; when the runtime binds the same memory to `past` and
`present`, ONNX Runtime's CPU ScatterElements skips its input-to-output copy (measured: 0.3 ms against 28 ms for a
100 MB buffer), so a step writes only its own positions. Attention reads all `capacity` positions, masked by
`attention_mask` (b, capacity), which the runtime keeps zero beyond the written positions. Per-row write positions
let the rows of one batched buffer sit at different lengths (slots of a batching engine).
"""

from __future__ import annotations

import torch

from vl_export.manifest import TensorSpec
from vl_export.spec import ModelSpec

from .graphs import Decoder, _linear, _rms_norm, _rotate

CAPACITY_AXIS = "capacity"  # the name of the cache axis that marks an in-place decoder graph in the manifest


class InplaceDecoder(Decoder):
    """inputs_embeds (b, s, H), attention_mask (b, capacity) int64 1/0, position_ids (b, s), logits_positions (b, k),
    write_positions (b, s) int64 (the cache slots of the s new positions, also their causal limit), and
    past_key_values.{i}.key|value (b, kv_heads, capacity, d) -> logits (b, k, vocab), present.{i}.key|value, the
    same buffers with the new positions written."""

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions, write_positions, *past_key_values):
        b, s, _ = inputs_embeds.shape
        capacity = past_key_values[0].shape[2]
        key_at = torch.arange(capacity, device=attention_mask.device)  # (capacity,)
        causal = key_at.view(1, 1, capacity) <= write_positions.unsqueeze(-1)  # (b, s, capacity)
        allowed = causal & attention_mask.unsqueeze(1).bool()  # (b, s, capacity)
        blocked = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
        mask = torch.where(allowed, torch.tensor(0.0), blocked).unsqueeze(1)  # (b, 1, s, capacity)
        mask = mask.repeat(1, 1, self.groups, 1)  # (b, 1, groups*s, capacity), as Decoder stacks the query heads
        slots = write_positions.view(b, 1, s, 1).expand(b, self.num_kv_heads, s, self.head_dim)  # (b, kv, s, d)
        cos, sin = self._rope(position_ids)  # (b, 1, s, d)
        x = inputs_embeds.float()
        presents = []
        for i, layer in enumerate(self.lm.layers):
            attn_out, key, value = self._attention_inplace(
                _rms_norm(x, layer.input_layernorm), layer.self_attn, cos, sin, mask, slots,
                past_key_values[2 * i], past_key_values[2 * i + 1],
            )
            presents += [key, value]
            x = x + attn_out.float()
            h = _rms_norm(x, layer.post_attention_layernorm).to(layer.mlp.gate_proj.weight.dtype)
            x = x + _linear(torch.nn.functional.silu(_linear(h, layer.mlp.gate_proj)) * _linear(h, layer.mlp.up_proj),
                            layer.mlp.down_proj).float()
        x = _rms_norm(x, self.lm.norm)
        index = logits_positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (b, k, H)
        logits = _linear(torch.gather(x, 1, index), self.lm_head).float()  # (b, k, vocab)
        return (logits, *presents)

    def _attention_inplace(self, x, attn, cos, sin, mask, slots, past_key, past_value):
        b, s, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # (b, s, n*d) -> (b, n, s, d)
            return t.reshape(b, s, n, self.head_dim).transpose(1, 2)

        q = _rotate(heads(_linear(x, attn.q_proj), self.num_heads).float(), cos, sin)
        k = _rotate(heads(_linear(x, attn.k_proj), self.num_kv_heads).float(), cos, sin)
        v = heads(_linear(x, attn.v_proj), self.num_kv_heads)
        key = torch.scatter(past_key, 2, slots, k.to(self.kv_dtype))  # (b, kv_heads, capacity, d)
        value = torch.scatter(past_value, 2, slots, v.to(self.kv_dtype))
        q = q.reshape(b, self.num_kv_heads, self.groups * s, self.head_dim).to(key.dtype)  # as Decoder: no repeat_kv
        scores = torch.matmul(q, key.transpose(2, 3)) * attn.scaling  # (b, kv_heads, groups*s, capacity)
        probs = torch.softmax(scores.float() + mask, dim=-1).to(value.dtype)
        out = torch.matmul(probs, value).reshape(b, self.num_heads, s, self.head_dim)  # (b, heads, s, d)
        out = out.transpose(1, 2).reshape(b, s, -1)  # (b, s, heads*d)
        return _linear(out, attn.o_proj), key, value


def inplace_io(spec: ModelSpec, precision: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    from .onnx_export import kv_names

    t = spec.text
    kv_dtype = "float16" if precision == "fp16" else "float32"
    kv = ("batch", t.num_kv_heads, CAPACITY_AXIS, t.head_dim)
    inputs = (
        TensorSpec("inputs_embeds", "float32", ("batch", "seq", t.hidden_size)),
        TensorSpec("attention_mask", "int64", ("batch", CAPACITY_AXIS)),
        TensorSpec("position_ids", "int64", ("batch", "seq")),
        TensorSpec("logits_positions", "int64", ("batch", "num_logits")),
        TensorSpec("write_positions", "int64", ("batch", "seq")),
        *(TensorSpec(n, kv_dtype, kv) for n in kv_names(t.num_layers, "past_key_values")),
    )
    outputs = (
        TensorSpec("logits", "float32", ("batch", "num_logits", t.vocab_size)),
        *(TensorSpec(n, kv_dtype, kv) for n in kv_names(t.num_layers, "present")),
    )
    return inputs, outputs


# Example sizes for tracing: distinct and >= 2 so no axis is specialised; capacity above past + seq.
EXAMPLE_SIZES = {"batch": 2, "seq": 3, "num_logits": 2, CAPACITY_AXIS: 9}


def export_inplace_decoder(model: torch.nn.Module, spec: ModelSpec, precision: str, path) -> "GraphEntry":
    """Export InplaceDecoder to `path` (an ONNX file; external data beside it when large)."""
    import inspect
    import warnings

    import numpy as np
    import onnx_ir as ir

    from vl_export.manifest import GraphEntry

    from .onnx_export import EXTERNAL_DATA_BYTES, TORCH_DTYPES, _name_axes, _quiet_exporter, _weight_bytes, to_full_precision

    inputs, outputs = inplace_io(spec, precision)
    to_full_precision("decoder", model)
    wrapper = InplaceDecoder(model, spec, TORCH_DTYPES[precision]).eval()
    sizes = EXAMPLE_SIZES
    rng = np.random.default_rng(0)
    args = []
    for t in inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.name == "attention_mask":
            array = np.ones(shape, np.int64)
        elif t.name in ("position_ids", "write_positions"):
            array = np.broadcast_to(np.arange(4, 4 + shape[1]), shape).copy()
        elif t.name == "logits_positions":
            array = np.broadcast_to(np.arange(shape[1]), shape).copy()
        else:
            array = rng.standard_normal(shape).astype(t.dtype)
        args.append(torch.from_numpy(array))
    dims = {name: torch.export.Dim(name, min=1) for name in sizes}
    per_input = [{i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in inputs]
    fixed = len(inspect.signature(wrapper.forward).parameters) - 1  # all but *past_key_values
    with warnings.catch_warnings(), _quiet_exporter(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, tuple(args), input_names=[t.name for t in inputs],
                                    output_names=[t.name for t in outputs],
                                    dynamic_shapes=(*per_input[:fixed], tuple(per_input[fixed:])),
                                    dynamo=True, opset_version=18, verbose=False)
    # Written from the exporter's ONNX IR, as export_graph does (no whole-protobuf copy of a large decoder).
    graph_ir = program.model
    _name_axes(graph_ir.graph.inputs, inputs)
    _name_axes(graph_ir.graph.outputs, outputs)
    graph_ir.metadata_props.update({"vl_export.role": "decoder", "vl_export.precision": precision,
                                    "vl_export.kv_cache": "in-place"})
    if _weight_bytes(wrapper) > EXTERNAL_DATA_BYTES:
        ir.save(graph_ir, path, external_data=path.name + ".data")
    else:
        ir.save(graph_ir, path)
    del program, graph_ir
    return GraphEntry(role="decoder", file=path.name, precision=precision, inputs=inputs, outputs=outputs)
