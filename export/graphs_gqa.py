"""The decoder for ONNX Runtime built from the weights with its fused contrib operators, in two forms (FORMS) that
differ in attention only: "gqa", GroupQueryAttention on an in-place KV cache (packed q|k|v, rotary inside); "stacked"
(what builds ship), MultiHeadAttention over each KV head's stacked query group with ScatterND cache writes
(_StackedAttention says why); both with SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization. What follows
describes the gqa form; the stacked one has the same IO, writes any slots and attends over the whole capacity.

Same inputs, outputs and meaning as the in-place decoder (graphs_inplace.py), so one runtime session drives both:
inputs_embeds (b, s, H), attention_mask (b, capacity) int64 1/0, position_ids (b, s), logits_positions (b, k),
write_positions (b, s) and past_key_values.{i}.key|value (b, kv_heads, capacity, d) -> logits (b, k, vocab),
present.{i}.key|value, the same buffers with the new positions written when the runtime binds past and present to
one memory (GroupQueryAttention then shares the buffer instead of copying it). What the form adds and requires:
- each row's write positions are consecutive (the operator writes a row's new keys at seqlens_k + 1 - s .. seqlens_k;
  seqlens_k = write_positions[:, -1], query_seqlens = s), so rows of one buffer can still sit at different lengths;
- attention reads each row's first write_positions[:, -1] + 1 positions only (not the whole capacity), with the
  causal limit and `attention_mask` (an additive bias, the most negative float where the mask is 0, as the other
  graphs use) applied by the operator;
- rotary inside the operator (do_rotary) from the explicit position_ids input, since a left-padded row's positions
  are not its cache slots; its cos/sin tables cover max_position_embeddings positions. ONNX Runtime's schema says a
  first prompt uses only the first position id; with query_seqlens given (always here) ONNX Runtime 1.32 reads them
  all, which tests/test_gqa_decoder.py holds (left-padded prompts, logits and cache step by step). Rotating in the
  operator instead of RotaryEmbedding nodes on q and k (after a Split) measured 1.2 ms less per step (README); the
  operator rotates only head sizes that are multiples of 16, so smaller heads keep the RotaryEmbedding nodes.

Built with onnx_ir from the torch modules' weights (no torch export): the exporter's graph of the same computation
is unfused (a norm is 6 nodes, attention ~20), and ONNX Runtime's CPU fusions do not turn it into these kernels.
Qwen2 and InternLM2 both load into the Llama-shaped modules this reads (export/internlm2.py), so both are covered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vl_export.manifest import GraphEntry
from vl_export.manifest_checks import FORM_KV_DTYPES
from vl_export.spec import ModelSpec

from .graph_builder import WeightGraph, graph_inputs, to_numpy, transposed
from .graphs_inplace import inplace_io

OPSET = 21
MS = "com.microsoft"
FORM = "gqa"  # the manifest's decoder form (GraphEntry.form) for this graph
STACKED = "stacked"  # the form with attention over each KV head's stacked query group
FORMS = (FORM, STACKED)
KV_DTYPES = FORM_KV_DTYPES  # the KV cache's element type, by form: the manifest check's own table


def rotary_tables(inv_freq, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (positions, d/2) fp32, computed as graphs.Decoder._rope does (fp32 product, torch cos/sin), so
    the two graphs rotate by the same bits."""
    import torch

    freqs = torch.arange(positions, dtype=torch.int64).float().unsqueeze(-1) * inv_freq.float()  # (positions, d/2)
    return freqs.cos().numpy(), freqs.sin().numpy()


def build_gqa_decoder(model, spec: ModelSpec, path: Path, quantize=None, form: str = FORM,
                      kv_dtype: str = "float32") -> GraphEntry:
    """Write the fp32 decoder of `model` (InternVLForConditionalGeneration-shaped) in `form` (FORMS) to `path`, or
    with `quantize` (graph_builder.Quantizer) what that quantizer makes of it, straight from the weights. The KV
    cache is `kv_dtype`: float32, or float16 in the stacked form (_StackedAttention says when and why)."""
    import onnx_ir as ir

    from .onnx_export import EXTERNAL_DATA_BYTES

    if form not in FORMS:
        raise ValueError(f"decoder form {form!r} is not one of {FORMS}")
    if kv_dtype not in KV_DTYPES[form]:
        raise ValueError(f"a {form} decoder's KV cache is one of {KV_DTYPES[form]}, not {kv_dtype!r}")
    # No upcast of the modules (the exporters' to_full_precision): each weight is read into fp32 only when it is
    # written, so a bf16 checkpoint stays bf16 through this step. bf16 -> fp32 is exact: the same graph.
    t = spec.text
    lm = model.model.language_model
    inputs, outputs = inplace_io(spec, "fp16" if kv_dtype == "float16" else "fp32")  # fp16: the cache's dtype only
    g = WeightGraph()
    tape, const, matmul = g.tape, g.const, g.matmul
    values = graph_inputs(inputs)
    cos, sin = rotary_tables(lm.rotary_emb.inv_freq, t.max_position_embeddings)
    cos, sin = (const(n, x.astype(kv_dtype)) for n, x in (("cos_cache", cos), ("sin_cache", sin)))
    attention = _GqaAttention(g, values, t, cos, sin) if form == FORM else _StackedAttention(g, values, t, cos, sin,
                                                                                             np.dtype(kv_dtype))
    eps = float(t.rms_norm_eps)

    residual, pending = values["inputs_embeds"], None  # pending: the sublayer output not yet added to the residual
    presents = []
    for i, layer in enumerate(lm.layers):
        p = f"layers.{i}"
        attn = layer.self_attn
        h, residual = _norm(tape, residual, pending, const(f"{p}.input_layernorm.weight", to_numpy(layer.input_layernorm.weight)),
                            eps, f"{p}/input_layernorm")
        projections, o_proj = attention.linears(attn)
        qkv = matmul(h, projections, f"{p}.attn.qkv_proj")  # (b, s, q + 2 kv)
        present_k, present_v = ir.val(f"present.{i}.key"), ir.val(f"present.{i}.value")
        out = attention(p, qkv, values[f"past_key_values.{i}.key"], values[f"past_key_values.{i}.value"], present_k,
                        present_v)
        presents += [present_k, present_v]
        pending = matmul(out, [o_proj], f"{p}.attn.o_proj")
        h, residual = _norm(tape, residual, pending,
                            const(f"{p}.post_attention_layernorm.weight", to_numpy(layer.post_attention_layernorm.weight)),
                            eps, f"{p}/post_attention_layernorm")
        pending = None
        gate = matmul(h, [layer.mlp.gate_proj], f"{p}.mlp.gate_proj")
        up = matmul(h, [layer.mlp.up_proj], f"{p}.mlp.up_proj")
        act = tape.op("Mul", [gate, tape.op("Sigmoid", [gate], name=f"{p}/mlp/Sigmoid")], name=f"{p}/mlp/Mul_silu")
        pending = matmul(tape.op("Mul", [act, up], name=f"{p}/mlp/Mul"), [layer.mlp.down_proj], f"{p}.mlp.down_proj")
    x, _ = _norm(tape, residual, pending, const("norm.weight", to_numpy(lm.norm.weight)), eps, "final_norm")
    index = tape.op("Unsqueeze", [values["logits_positions"], g.i64([-1])], name="logits/Unsqueeze")  # (b, k, 1)
    x = tape.op("GatherND", [x, index], {"batch_dims": 1}, name="logits/GatherND")  # (b, k, H)
    logits = ir.val("logits")
    head = model.lm_head.weight
    tape.op("MatMul", [x, g.weight("lm_head.weight", lambda: transposed([head]), (head.shape[1], head.shape[0]))],
            output=logits, name="lm_head/MatMul")

    g.save(path, [values[s.name] for s in inputs], [logits, *presents], outputs, f"decoder_{form}", {"": OPSET, MS: 1},
           {"vl_export.role": "decoder", "vl_export.precision": "fp32", "vl_export.kv_cache": "in-place",
            "vl_export.form": form}, EXTERNAL_DATA_BYTES, quantize)
    return GraphEntry(role="decoder", file=path.name, precision="fp32", inputs=inputs, outputs=outputs, form=form)


class _GqaAttention:
    """GroupQueryAttention on the in-place cache: the cache write, rotary (inside the operator where it can), the
    causal limit and the mask, in one operator per layer."""

    def __init__(self, g: WeightGraph, values: dict, t, cos_cache, sin_cache):
        import onnx_ir as ir

        tape, i64 = g.tape, g.i64
        embeds, mask, write = values["inputs_embeds"], values["attention_mask"], values["write_positions"]
        self.tape, self.t, self.position_ids = tape, t, values["position_ids"]
        # seqlens_k (b,) = the last write position; query_seqlens (b,) = s; total_sequence_length = capacity (a bound).
        last = tape.op("Gather", [write, i64(-1)], {"axis": 1}, name="seqlens/Gather_last")
        first = tape.op("Gather", [write, i64(0)], {"axis": 1}, name="seqlens/Gather_first")
        self.seqlens_k = tape.op("Cast", [last], {"to": ir.DataType.INT32}, name="seqlens/Cast")
        count = tape.op("Add", [tape.op("Sub", [last, first], name="seqlens/Sub"), i64(1)], name="seqlens/Add")
        self.query_seqlens = tape.op("Cast", [count], {"to": ir.DataType.INT32}, name="seqlens/Cast_query")
        mask_shape = tape.op("Shape", [mask], name="mask/Shape")  # (b, capacity)
        capacity = tape.op("Gather", [mask_shape, i64(1)], {"axis": 0}, name="mask/Gather_capacity")
        self.total = tape.op("Cast", [capacity], {"to": ir.DataType.INT32}, name="mask/Cast_total")
        # attention_bias (b, 1, s, capacity): 0 where the mask allows a key, the most negative float where it does not.
        bias = g.blocked_where(tape.op("Cast", [mask], {"to": ir.DataType.BOOL}, name="mask/Cast_bool"))
        bias = tape.op("Unsqueeze", [bias, i64([1, 2])], name="mask/Unsqueeze")  # (b, 1, 1, capacity)
        embeds_shape = tape.op("Shape", [embeds], name="embeds/Shape")  # (b, s, H)
        bias_shape = tape.op("Concat", [
            tape.op("Slice", [embeds_shape, i64([0]), i64([1])], name="mask/Slice_b"),
            i64([1]),
            tape.op("Slice", [embeds_shape, i64([1]), i64([2])], name="mask/Slice_s"),
            tape.op("Slice", [mask_shape, i64([1]), i64([2])], name="mask/Slice_capacity"),
        ], {"axis": 0}, name="mask/Concat")
        self.bias = tape.op("Expand", [bias, bias_shape], name="mask/Expand")  # (b, 1, s, capacity)
        # ONNX Runtime's GroupQueryAttention rotates only head sizes that are multiples of 16 (every InternVL2.5
        # decoder: 64 or 128); smaller ones (the tests' tiny models) get RotaryEmbedding nodes on q and k instead.
        self.rotary_inside = t.head_dim % 16 == 0
        self.rotary = _Rotary(g, t, cos_cache, sin_cache, self.position_ids)

    def linears(self, attn) -> tuple[list, object]:
        """The projections packed into qkv_proj, and o_proj."""
        return [attn.q_proj, attn.k_proj, attn.v_proj], attn.o_proj

    def __call__(self, p: str, qkv, past_k, past_v, present_k, present_v):
        import onnx_ir as ir

        t = self.t
        if self.rotary_inside:
            qkv_in, rotary_in = [qkv, None, None], [self.rotary.cos, self.rotary.sin, self.position_ids]
        else:
            q, k, v = self.rotary.split(p, qkv)
            qkv_in, rotary_in = [q, k, v], [None, None, None]
        out, _, _ = self.tape.op_multi_out(
            "GroupQueryAttention",
            [*qkv_in, past_k, past_v, self.seqlens_k, self.total, *rotary_in, self.bias, None, None, None, None, None,
             self.query_seqlens],
            {"num_heads": t.num_heads, "kv_num_heads": t.num_kv_heads, "scale": float(t.head_dim) ** -0.5,
             "do_rotary": int(self.rotary_inside), "rotary_interleaved": 0},
            outputs=[ir.val(f"{p}/attn/output"), present_k, present_v], domain=MS, name=f"{p}/attn/GroupQueryAttention")
        return out


class _Rotary:
    """q, k, v of a packed projection, q and k rotated by RotaryEmbedding nodes at the explicit position ids."""

    def __init__(self, g: WeightGraph, t, cos_cache, sin_cache, position_ids):
        self.tape, self.cos, self.sin, self.position_ids = g.tape, cos_cache, sin_cache, position_ids
        q_size, kv_size = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        self.sizes = g.i64([q_size, kv_size, kv_size])

    def split(self, p: str, qkv):
        q, k, v = self.tape.op_multi_out("Split", [qkv, self.sizes], {"axis": -1}, num_outputs=3, name=f"{p}/attn/Split")
        q, k = (self.tape.op("RotaryEmbedding", [x, self.position_ids, self.cos, self.sin], {"interleaved": 0},
                             domain=MS, name=f"{p}/attn/{n}_rotary") for x, n in ((q, "q"), (k, "k")))
        return q, k, v


class _StackedAttention:
    """Attention over each KV head's stacked query group: ONNX Runtime's MultiHeadAttention with one head per KV head,
    whose queries are the group's query heads at every new position (s*groups rows), against the cache itself
    (b, kv, capacity, d). So each KV head's cache is read once per step, not once per query head as ONNX Runtime's CPU
    GroupQueryAttention reads it (benchmarks/gqa_attention.py: about 2x at 1,900 positions). The query heads are
    ordered group-member-major in q_proj's output (and o_proj's input) so that (b, s, heads*d) is (b, s*groups,
    kv*d) by a Reshape alone: rotary is per head, so the order changes nothing else. The new keys and values are
    written by ScatterND at write_positions (in place when the runtime binds past and present to one buffer, as for
    graphs_inplace.py's decoder: ONNX Runtime then skips the copy), and attention covers the bound buffer's whole
    capacity, masked; the runtime keeps that buffer near what is used (runtime/backends/ort_inplace.py).

    With a float16 cache (`kv_dtype`; what builds ship for their quantized decoders) q|k|v is cast to fp16 as it
    leaves its projection: rotary (fp16 tables), the cache writes and attention run in fp16, and attention's output
    is cast back. ONNX Runtime's CPU MultiHeadAttention reads fp16 keys and values in ~2/3 of the time (24 layers
    over 2,048 positions: 2.75 against 4.11 ms), the cache takes half the memory, and the logits moved by 0.0030 at
    most over 3 x 64 prompt positions with fp32 weights, greedy tokens identical for 32 steps (README, "INT8
    decoder default and the fp16 KV cache")."""

    def __init__(self, g: WeightGraph, values: dict, t, cos_cache, sin_cache, kv_dtype=np.dtype(np.float32)):
        import onnx_ir as ir

        tape, i64 = g.tape, g.i64
        embeds, mask, write = values["inputs_embeds"], values["attention_mask"], values["write_positions"]
        self.g, self.t = g, t
        self.fp16 = kv_dtype == np.float16
        self.groups = t.num_heads // t.num_kv_heads
        self.rotary = _Rotary(g, t, cos_cache, sin_cache, values["position_ids"])
        embeds_shape = tape.op("Shape", [embeds], name="embeds/Shape")  # (b, s, H)
        b = tape.op("Slice", [embeds_shape, i64([0]), i64([1])], name="shape/Slice_b")
        s = tape.op("Slice", [embeds_shape, i64([1]), i64([2])], name="shape/Slice_s")
        capacity = tape.op("Slice", [tape.op("Shape", [mask], name="mask/Shape"), i64([1]), i64([2])],
                           name="shape/Slice_capacity")
        kv, d = t.num_kv_heads, t.head_dim
        self.rows = i64([0, -1, kv * d])  # (b, s, heads*d) -> (b, s*groups, kv*d)
        self.merged = i64([0, -1, t.num_heads * d])  # and back
        self.kv_heads = i64([0, 0, kv, d])  # (b, s, kv*d) -> (b, s, kv, d)
        # Where each new key and value goes: (b, s, kv, 3) indices (row, KV head, write position) into the cache.
        shape = tape.op("Concat", [b, s, i64([kv, 1])], {"axis": 0}, name="slots/Concat")
        row = tape.op("Range", [i64(0), tape.op("Squeeze", [b, i64([0])], name="slots/Squeeze_b"), i64(1)],
                      name="slots/Range_row")  # (b,)
        parts = [tape.op("Reshape", [row, i64([-1, 1, 1, 1])], name="slots/Reshape_row"),
                 i64(np.arange(kv).reshape(1, 1, kv, 1)),
                 tape.op("Unsqueeze", [write, i64([2, 3])], name="slots/Unsqueeze_write")]
        self.slots = tape.op("Concat", [tape.op("Expand", [x, shape], name=f"slots/Expand_{n}") for n, x in enumerate(parts)],
                             {"axis": -1}, name="slots/Concat_index")
        # The additive bias (b, 1, s*groups, capacity): a key is allowed where the mask has it and it is not after
        # the query's own position (its write position), as graphs_inplace.InplaceDecoder masks.
        key_at = tape.op("Range", [i64(0), tape.op("Squeeze", [capacity, i64([0])], name="mask/Squeeze"), i64(1)],
                         name="mask/Range")  # (capacity,)
        causal = tape.op("LessOrEqual", [key_at, tape.op("Unsqueeze", [write, i64([-1])], name="mask/Unsqueeze_write")],
                         name="mask/LessOrEqual")  # (b, s, capacity)
        present = tape.op("Unsqueeze", [tape.op("Cast", [mask], {"to": ir.DataType.BOOL}, name="mask/Cast_bool"),
                                        i64([1])], name="mask/Unsqueeze_mask")  # (b, 1, capacity)
        bias = tape.op("Unsqueeze", [g.blocked_where(tape.op("And", [causal, present], name="mask/And"), kv_dtype),
                                     i64([1, 3])], name="mask/Unsqueeze_bias")  # (b, 1, s, 1, capacity)
        grouped = tape.op("Concat", [b, i64([1]), s, i64([self.groups]), capacity], {"axis": 0}, name="mask/Concat")
        stacked = tape.op("Concat", [b, i64([1, -1]), capacity], {"axis": 0}, name="mask/Concat_stacked")
        self.bias = tape.op("Reshape", [tape.op("Expand", [bias, grouped], name="mask/Expand"), stacked],
                            name="mask/Reshape")  # (b, 1, s*groups, capacity), rows (position, group member)

    def linears(self, attn) -> tuple[list, object]:
        """The projections packed into qkv_proj, and o_proj, with the query heads in group-member-major order."""
        t = self.t
        heads = [kv * self.groups + member for member in range(self.groups) for kv in range(t.num_kv_heads)]
        rows = [h * t.head_dim + i for h in heads for i in range(t.head_dim)]
        return [_Reordered(attn.q_proj, rows, 0), attn.k_proj, attn.v_proj], _Reordered(attn.o_proj, rows, 1)

    def __call__(self, p: str, qkv, past_k, past_v, present_k, present_v):
        import onnx_ir as ir

        op = self.g.tape.op
        if self.fp16:
            qkv = op("Cast", [qkv], {"to": ir.DataType.FLOAT16}, name=f"{p}/attn/Cast_fp16")
        q, k, v = self.rotary.split(p, qkv)
        for x, past, present, n in ((k, past_k, present_k, "key"), (v, past_v, present_v, "value")):
            op("ScatterND", [past, self.slots, op("Reshape", [x, self.kv_heads], name=f"{p}/attn/Reshape_{n}")],
               output=present, name=f"{p}/attn/Scatter_{n}")
        q = op("Reshape", [q, self.rows], name=f"{p}/attn/Reshape_q")  # (b, s*groups, kv*d)
        out = op("MultiHeadAttention", [q, present_k, present_v, None, None, self.bias],
                 {"num_heads": self.t.num_kv_heads, "scale": float(self.t.head_dim) ** -0.5}, domain=MS,
                 name=f"{p}/attn/MultiHeadAttention")  # (b, s*groups, kv*d)
        if self.fp16:
            out = op("Cast", [out], {"to": ir.DataType.FLOAT}, name=f"{p}/attn/Cast_fp32")
        return op("Reshape", [out, self.merged], name=f"{p}/attn/Reshape_out")  # (b, s, heads*d)


class _Reordered:
    """A linear layer with its weight's rows (axis 0: outputs) or columns (axis 1: inputs) in another order, read
    as graph_builder reads nn.Linear (.weight, .bias)."""

    def __init__(self, linear, order: list[int], axis: int):
        import torch

        index = torch.tensor(order)
        self.weight = linear.weight.detach().index_select(axis, index)
        self.bias = None if linear.bias is None else (linear.bias.detach()[index] if axis == 0 else linear.bias)


def _norm(tape, residual, pending, weight, eps: float, name: str):
    """RMSNorm of residual + pending (pending None: of residual alone) -> (normed, the new residual)."""
    if pending is None:
        return tape.op("SimplifiedLayerNormalization", [residual, weight], {"epsilon": eps, "axis": -1, "stash_type": 1},
                       name=f"{name}/SimplifiedLayerNorm"), residual
    normed, _, _, summed = tape.op_multi_out("SkipSimplifiedLayerNormalization", [residual, pending, weight],
                                             {"epsilon": eps}, num_outputs=4, domain=MS, name=f"{name}/SkipLayerNorm")
    return normed, summed
