"""The decoder for ONNX Runtime built from the weights with its fused contrib operators: GroupQueryAttention on an
in-place KV cache (packed q|k|v, rotary inside), SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization.

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
from vl_export.spec import ModelSpec

from .graph_builder import WeightGraph, graph_inputs, to_numpy, transposed
from .graphs_inplace import inplace_io

OPSET = 21
MS = "com.microsoft"
FORM = "gqa"  # the manifest's decoder form (GraphEntry.form) for this graph


def rotary_tables(inv_freq, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (positions, d/2) fp32, computed as graphs.Decoder._rope does (fp32 product, torch cos/sin), so
    the two graphs rotate by the same bits."""
    import torch

    freqs = torch.arange(positions, dtype=torch.int64).float().unsqueeze(-1) * inv_freq.float()  # (positions, d/2)
    return freqs.cos().numpy(), freqs.sin().numpy()


def build_gqa_decoder(model, spec: ModelSpec, path: Path, quantize=None) -> GraphEntry:
    """Write the fp32 GQA decoder of `model` (InternVLForConditionalGeneration-shaped) to `path`, or with `quantize`
    (graph_builder.Quantizer) what that quantizer makes of it, straight from the weights."""
    import onnx_ir as ir

    from .onnx_export import EXTERNAL_DATA_BYTES

    # No upcast of the modules (the exporters' to_full_precision): each weight is read into fp32 only when it is
    # written, so a bf16 checkpoint stays bf16 through this step. bf16 -> fp32 is exact: the same graph.
    t = spec.text
    lm = model.model.language_model
    inputs, outputs = inplace_io(spec, "fp32")
    g = WeightGraph()
    tape, const, matmul = g.tape, g.const, g.matmul

    values = graph_inputs(inputs)
    embeds, mask = values["inputs_embeds"], values["attention_mask"]
    position_ids, logits_positions, write = values["position_ids"], values["logits_positions"], values["write_positions"]

    i64 = lambda name, v: const(name, np.array(v, np.int64))  # noqa: E731
    # seqlens_k (b,) = the last write position; query_seqlens (b,) = s; total_sequence_length = capacity (a bound).
    last = tape.op("Gather", [write, i64("const.minus_one", -1)], {"axis": 1}, name="seqlens/Gather_last")
    first = tape.op("Gather", [write, i64("const.zero", 0)], {"axis": 1}, name="seqlens/Gather_first")
    seqlens_k = tape.op("Cast", [last], {"to": ir.DataType.INT32}, name="seqlens/Cast")
    count = tape.op("Add", [tape.op("Sub", [last, first], name="seqlens/Sub"), i64("const.one", 1)], name="seqlens/Add")
    query_seqlens = tape.op("Cast", [count], {"to": ir.DataType.INT32}, name="seqlens/Cast_query")
    mask_shape = tape.op("Shape", [mask], name="mask/Shape")  # (b, capacity)
    capacity = tape.op("Gather", [mask_shape, i64("const.one_scalar", 1)], {"axis": 0}, name="mask/Gather_capacity")
    total = tape.op("Cast", [capacity], {"to": ir.DataType.INT32}, name="mask/Cast_total")
    # attention_bias (b, 1, s, capacity): 0 where the mask allows a key, the most negative float where it does not.
    allowed = tape.op("Cast", [mask], {"to": ir.DataType.BOOL}, name="mask/Cast_bool")
    blocked = const("const.blocked", np.array(np.finfo(np.float32).min, np.float32))
    bias = tape.op("Where", [allowed, const("const.zero_f", np.array(0.0, np.float32)), blocked], name="mask/Where")
    bias = tape.op("Unsqueeze", [bias, i64("const.axes_12", [1, 2])], name="mask/Unsqueeze")  # (b, 1, 1, capacity)
    embeds_shape = tape.op("Shape", [embeds], name="embeds/Shape")  # (b, s, H)
    bias_shape = tape.op("Concat", [
        tape.op("Slice", [embeds_shape, i64("const.s0", [0]), i64("const.s1", [1])], name="mask/Slice_b"),
        i64("const.one_1d", [1]),
        tape.op("Slice", [embeds_shape, i64("const.s1b", [1]), i64("const.s2", [2])], name="mask/Slice_s"),
        tape.op("Slice", [mask_shape, i64("const.s1c", [1]), i64("const.s2c", [2])], name="mask/Slice_capacity"),
    ], {"axis": 0}, name="mask/Concat")
    bias = tape.op("Expand", [bias, bias_shape], name="mask/Expand")  # (b, 1, s, capacity)

    cos, sin = rotary_tables(lm.rotary_emb.inv_freq, t.max_position_embeddings)
    cos_cache, sin_cache = const("cos_cache", cos), const("sin_cache", sin)
    scale = float(t.head_dim) ** -0.5
    # ONNX Runtime's GroupQueryAttention rotates only head sizes that are multiples of 16 (every InternVL2.5 decoder:
    # 64 or 128); smaller ones (the tests' tiny models) get RotaryEmbedding nodes on q and k instead.
    rotary_inside = t.head_dim % 16 == 0
    q_size, kv_size = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    split = None if rotary_inside else i64("const.qkv_split", [q_size, kv_size, kv_size])
    eps = float(t.rms_norm_eps)

    residual, pending = embeds, None  # pending: the sublayer output not yet added to the residual stream
    presents = []
    for i, layer in enumerate(lm.layers):
        p = f"layers.{i}"
        attn = layer.self_attn
        h, residual = _norm(tape, residual, pending, const(f"{p}.input_layernorm.weight", to_numpy(layer.input_layernorm.weight)),
                            eps, f"{p}/input_layernorm")
        qkv = matmul(h, [attn.q_proj, attn.k_proj, attn.v_proj], f"{p}.attn.qkv_proj")  # (b, s, q + 2 kv)
        if rotary_inside:
            qkv_in, rotary_in = [qkv, None, None], [cos_cache, sin_cache, position_ids]
        else:
            q, k, v = tape.op_multi_out("Split", [qkv, split], {"axis": -1}, num_outputs=3, name=f"{p}/attn/Split")
            q, k = (tape.op("RotaryEmbedding", [x, position_ids, cos_cache, sin_cache], {"interleaved": 0}, domain=MS,
                            name=f"{p}/attn/{n}_rotary") for x, n in ((q, "q"), (k, "k")))
            qkv_in, rotary_in = [q, k, v], [None, None, None]
        present_k = ir.val(f"present.{i}.key")
        present_v = ir.val(f"present.{i}.value")
        out, _, _ = tape.op_multi_out(
            "GroupQueryAttention",
            [*qkv_in, values[f"past_key_values.{i}.key"], values[f"past_key_values.{i}.value"], seqlens_k, total,
             *rotary_in, bias, None, None, None, None, None, query_seqlens],
            {"num_heads": t.num_heads, "kv_num_heads": t.num_kv_heads, "scale": scale, "do_rotary": int(rotary_inside),
             "rotary_interleaved": 0},
            outputs=[ir.val(f"{p}/attn/output"), present_k, present_v], domain=MS, name=f"{p}/attn/GroupQueryAttention")
        presents += [present_k, present_v]
        pending = matmul(out, [attn.o_proj], f"{p}.attn.o_proj")
        h, residual = _norm(tape, residual, pending,
                            const(f"{p}.post_attention_layernorm.weight", to_numpy(layer.post_attention_layernorm.weight)),
                            eps, f"{p}/post_attention_layernorm")
        pending = None
        gate = matmul(h, [layer.mlp.gate_proj], f"{p}.mlp.gate_proj")
        up = matmul(h, [layer.mlp.up_proj], f"{p}.mlp.up_proj")
        act = tape.op("Mul", [gate, tape.op("Sigmoid", [gate], name=f"{p}/mlp/Sigmoid")], name=f"{p}/mlp/Mul_silu")
        pending = matmul(tape.op("Mul", [act, up], name=f"{p}/mlp/Mul"), [layer.mlp.down_proj], f"{p}.mlp.down_proj")
    x, _ = _norm(tape, residual, pending, const("norm.weight", to_numpy(lm.norm.weight)), eps, "final_norm")
    index = tape.op("Unsqueeze", [logits_positions, i64("const.axes_last", [-1])], name="logits/Unsqueeze")  # (b, k, 1)
    x = tape.op("GatherND", [x, index], {"batch_dims": 1}, name="logits/GatherND")  # (b, k, H)
    logits = ir.val("logits")
    head = model.lm_head.weight
    tape.op("MatMul", [x, g.weight("lm_head.weight", lambda: transposed([head]), (head.shape[1], head.shape[0]))],
            output=logits, name="lm_head/MatMul")

    g.save(path, [values[s.name] for s in inputs], [logits, *presents], outputs, "decoder_gqa", {"": OPSET, MS: 1},
           {"vl_export.role": "decoder", "vl_export.precision": "fp32", "vl_export.kv_cache": "in-place",
            "vl_export.form": FORM}, EXTERNAL_DATA_BYTES, quantize)
    return GraphEntry(role="decoder", file=path.name, precision="fp32", inputs=inputs, outputs=outputs, form=FORM)


def _norm(tape, residual, pending, weight, eps: float, name: str):
    """RMSNorm of residual + pending (pending None: of residual alone) -> (normed, the new residual)."""
    if pending is None:
        return tape.op("SimplifiedLayerNormalization", [residual, weight], {"epsilon": eps, "axis": -1, "stash_type": 1},
                       name=f"{name}/SimplifiedLayerNorm"), residual
    normed, _, _, summed = tape.op_multi_out("SkipSimplifiedLayerNormalization", [residual, pending, weight],
                                             {"epsilon": eps}, num_outputs=4, domain=MS, name=f"{name}/SkipLayerNorm")
    return normed, summed
