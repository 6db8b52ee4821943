"""The bundle's portable decoder, vision encoder and projector built from the weights, op for op what the torch
exporter writes for graphs.Decoder, graphs.VisionEncoder and graphs.Projector, without the torch exporter.

graphs.py stays the readable statement of the graphs, and tests hold these equal to torch.onnx's export of it
(outputs, names, dtypes; fp32 and fp16; both decoder families, both vision encoders). Building them here instead of
exporting them: the exporter traced, decomposed and optimised the same ~20 nodes per layer for over a minute at
Qwen2.5-0.5B (74.7 s of a 354 s INT8 build, README "Build memory and time") and 30-40 s for InternViT-300M, and held
the graph's weights upcast to fp32 while it did (the decoder's export was the build's peak); here each weight is read
when it is written (graph_builder.WeightGraph). Each builder takes a `quantize` (graph_builder.Quantizer): the
quantized graph is then written straight from the checkpoint's weights, never the full-precision one.

The decoder. Standard ONNX operators only (opset 18, as the exported graphs), in the order and precision graphs.Decoder states:
in fp16 graphs the matmuls and the KV cache are fp16, RMSNorm, rotary, softmax and the residual stream fp32. The
patterns the rest of vl-export reads are those of the exported graph: each norm ends in Mul(normed, g) feeding the
q/k/v (gate/up) MatMuls directly in fp32 graphs (SmoothQuant), every weight is the 2-D B input of one MatMul
(weight-only INT8, INT4), attention is MatMul-Mul-Add-Softmax-MatMul (OpenVINO's attention fusion at prefill), and the
KV cache is past -> Concat -> present (OpenVINO's MakeStateful, TensorRT's profiles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vl_export.manifest import GraphEntry
from vl_export.spec import ModelSpec

from .graph_builder import WeightGraph, graph_inputs, to_numpy


def _start(role: str, spec: ModelSpec, precision: str):
    """`role`'s graph inputs and outputs (onnx_export.graph_io) and an empty WeightGraph of the precision's matmul
    dtype (fp16 graphs: fp16 matmuls; fp32 otherwise)."""
    from .onnx_export import graph_io

    inputs, outputs = graph_io(role, spec, precision)
    return inputs, outputs, WeightGraph(np.float16 if precision == "fp16" else np.float32)


def build_portable_decoder(model, spec: ModelSpec, precision: str, path: Path, quantize=None) -> GraphEntry:
    """Write `model`'s (InternVLForConditionalGeneration-shaped) portable decoder in `precision` (fp32|fp16) to
    `path`; inputs and outputs as onnx_export.graph_io says."""
    import onnx_ir as ir

    from .onnx_export import EXTERNAL_DATA_BYTES, OPSET

    t = spec.text
    lm = model.model.language_model
    inputs, outputs, g = _start("decoder", spec, precision)
    wide = g.matmul_dtype  # the matmuls' and the KV cache's dtype
    op, i64, cast = g.tape.op, g.i64, g.cast
    f32, w_type = ir.DataType.FLOAT, g.wide

    values = graph_inputs(inputs)
    embeds, mask, position_ids = values["inputs_embeds"], values["attention_mask"], values["position_ids"]
    past = [values[s.name] for s in inputs[4:]]
    heads, kv_heads, d = t.num_heads, t.num_kv_heads, t.head_dim
    groups = heads // kv_heads

    # The attention bias (b, 1, groups*s, past+s): 0 where the query may see the key (causal and attention_mask),
    # the most negative float where not; tiled to the stacked query rows (graphs.Decoder._attention_bias).
    s = op("Gather", [op("Shape", [embeds]), i64(1)], {"axis": 0})
    past_len = op("Gather", [op("Shape", [past[0]]), i64(2)], {"axis": 0})
    total = op("Gather", [op("Shape", [mask]), i64(1)], {"axis": 0})
    query_at = op("Range", [past_len, op("Add", [past_len, s]), i64(1)])  # (s,)
    key_at = op("Range", [i64(0), total, i64(1)])  # (past+s,)
    causal = op("LessOrEqual", [op("Unsqueeze", [key_at, i64([0])]), op("Unsqueeze", [query_at, i64([1])])])
    allowed = op("And", [op("Unsqueeze", [causal, i64([0])]),
                         op("Unsqueeze", [op("Cast", [mask], {"to": ir.DataType.BOOL}), i64([1])])])  # (b, s, past+s)
    bias = op("Where", [allowed, g.const("const.zero_f", np.array(0.0, np.float32)),
                        g.const("const.blocked", np.array(np.finfo(np.float32).min, np.float32))])
    # The values whose axes shape inference cannot name (after Range and the -1 reshapes) are named here, as the
    # exporter names them, and inference carries the names on: ONNX Runtime's allocation planner reuses a buffer only
    # for a value it knows has the same size.
    stacked = f"{groups}*seq"

    def named(value, dtype, *dims):
        value.dtype, value.shape = dtype, ir.Shape(list(dims))
        return value

    bias = named(op("Tile", [op("Unsqueeze", [bias, i64([1])]), i64([1, 1, groups, 1])]), f32, "batch", 1, stacked, "total")

    # Rotary cos/sin (b, 1, s, d) from the position ids, fp32 (graphs.Decoder._rope).
    inv_freq = g.const("inv_freq", to_numpy(lm.rotary_emb.inv_freq))
    freqs = op("Mul", [op("Unsqueeze", [op("Cast", [position_ids], {"to": f32}), i64([-1])]), inv_freq])  # (b, s, d/2)
    angles = op("Concat", [freqs, freqs], {"axis": -1})
    cos = op("Unsqueeze", [op("Cos", [angles]), i64([1])])
    sin = op("Unsqueeze", [op("Sin", [angles]), i64([1])])
    half = d // 2

    def rotate(x):  # x * cos + rotate_half(x) * sin, fp32 (graphs._rotate)
        first = op("Slice", [x, i64([0]), i64([half]), i64([-1])])
        second = op("Slice", [x, i64([half]), i64([d]), i64([-1])])
        rotated = op("Concat", [op("Neg", [second]), first], {"axis": -1})
        return op("Add", [op("Mul", [x, cos]), op("Mul", [rotated, sin])])

    eps = g.const("const.eps", np.array(t.rms_norm_eps, np.float32))

    def rms_norm(x, norm, name: str):
        return g.rms_norm(x, g.const(f"{name}.weight", to_numpy(norm.weight)), eps)

    def split_heads(x, n: int):  # (b, s, n*d) -> (b, n, s, d)
        return op("Transpose", [op("Reshape", [x, i64([0, 0, n, d])])], {"perm": [0, 2, 1, 3]})

    scaling = g.const("const.scaling", np.array(lm.layers[0].self_attn.scaling, wide))
    x = embeds
    presents = []
    for i, layer in enumerate(lm.layers):
        p, attn = f"layers.{i}", layer.self_attn
        h = cast(rms_norm(x, layer.input_layernorm, f"{p}.input_layernorm"), w_type)
        q = rotate(cast(split_heads(g.matmul(h, [attn.q_proj], f"{p}.attn.q_proj"), heads), f32))
        k = rotate(cast(split_heads(g.matmul(h, [attn.k_proj], f"{p}.attn.k_proj"), kv_heads), f32))
        v = split_heads(g.matmul(h, [attn.v_proj], f"{p}.attn.v_proj"), kv_heads)
        key = op("Concat", [past[2 * i], cast(k, w_type)], {"axis": 2}, output=ir.val(f"present.{i}.key"))
        value = op("Concat", [past[2 * i + 1], v], {"axis": 2}, output=ir.val(f"present.{i}.value"))
        presents += [key, value]
        # The query heads that share a KV head stacked along the sequence axis (b, kv_heads, groups*s, d): one
        # matmul per KV head, no repeated cache (graphs.Decoder._attention says why).
        q = cast(named(op("Reshape", [q, i64([0, kv_heads, -1, d])]), f32, "batch", kv_heads, stacked, d), w_type)
        scores = named(op("MatMul", [q, op("Transpose", [key], {"perm": [0, 1, 3, 2]})]), w_type, "batch", kv_heads,
                       stacked, "total")
        scores = op("Mul", [scores, scaling])
        probs = cast(op("Softmax", [op("Add", [cast(scores, f32), bias])], {"axis": -1}), w_type)
        out = named(op("Reshape", [op("MatMul", [probs, value]), i64([0, heads, -1, d])]), w_type, "batch", heads, "seq", d)
        out = op("Reshape", [op("Transpose", [out], {"perm": [0, 2, 1, 3]}), i64([0, 0, heads * d])])
        x = op("Add", [x, cast(g.matmul(out, [attn.o_proj], f"{p}.attn.o_proj"), f32)])
        h = cast(rms_norm(x, layer.post_attention_layernorm, f"{p}.post_attention_layernorm"), w_type)
        gate = g.matmul(h, [layer.mlp.gate_proj], f"{p}.mlp.gate_proj")
        up = g.matmul(h, [layer.mlp.up_proj], f"{p}.mlp.up_proj")
        act = op("Mul", [op("Mul", [gate, op("Sigmoid", [gate])]), up])
        x = op("Add", [x, cast(g.matmul(act, [layer.mlp.down_proj], f"{p}.mlp.down_proj"), f32)])
    x = rms_norm(x, lm.norm, "norm")
    index = op("Expand", [op("Unsqueeze", [values["logits_positions"], i64([-1])]),
                          op("Concat", [op("Shape", [values["logits_positions"]]), i64([t.hidden_size])], {"axis": 0})])
    x = cast(op("GatherElements", [x, index], {"axis": 1}), w_type)  # (b, k, H)
    logits = cast(g.matmul(x, [model.lm_head], "lm_head"), f32)
    logits.name = "logits"
    g.save(path, [values[s.name] for s in inputs], [logits, *presents], outputs, "decoder", {"": OPSET},
           {"vl_export.role": "decoder", "vl_export.precision": precision}, EXTERNAL_DATA_BYTES, quantize)
    return GraphEntry(role="decoder", file=path.name, precision=precision, inputs=inputs, outputs=outputs)


def build_vision_encoder(model, spec: ModelSpec, precision: str, path: Path, quantize=None) -> GraphEntry:
    """Write `model`'s vision encoder in `precision` (fp32|fp16) to `path`, as torch.onnx exports graphs.VisionEncoder:
    the patterns ONNX Runtime's fusions (calibration/ort_fusions.py) rewrite are the exporter's -- Reshape/Transpose
    (perms 0213, 0231, 0213) around MatMul-Mul-Softmax-MatMul, and x * (0.5 * (erf(x / sqrt 2) + 1)) -- and the
    weights are MatMul B inputs (in, out), so the quantizers see the same graph. fp16: the matmuls and the conv in
    fp16, norms, softmax and the residual stream in fp32 (graphs.VisionEncoder)."""
    import onnx_ir as ir
    from torch import nn

    from .onnx_export import EXTERNAL_DATA_BYTES, OPSET

    v = spec.vision
    tower = model.model.vision_tower
    inputs, outputs, g = _start("vision_encoder", spec, precision)
    wide = g.matmul_dtype
    op, i64, cast = g.tape.op, g.i64, g.cast
    f32, w_type = ir.DataType.FLOAT, g.wide

    def const(name, t, dtype=np.float32):
        return g.const(name, to_numpy(t).astype(dtype))

    def norm(x, module, name: str):  # fp32: LayerNorm (InternViT-300M) or RMSNorm (InternViT-6B)
        if isinstance(module, nn.LayerNorm):
            return op("LayerNormalization", [x, const(f"{name}.weight", module.weight), const(f"{name}.bias", module.bias)],
                      {"axis": -1, "epsilon": float(module.eps), "stash_type": 1})
        eps = g.const(f"{name}.eps", np.array(module.variance_epsilon, np.float32))
        return g.rms_norm(x, const(f"{name}.weight", module.weight), eps)

    positions, c, heads, d = v.num_positions, v.hidden_size, v.num_heads, v.head_dim
    pixels = graph_inputs(inputs)["pixel_values"]
    emb = tower.embeddings
    conv = emb.patch_embeddings.projection
    x = op("Conv", [cast(pixels, w_type), const("patch_embedding.weight", conv.weight, wide),
                    const("patch_embedding.bias", conv.bias, wide)],
           {"kernel_shape": list(conv.kernel_size), "strides": list(conv.stride), "pads": [0, 0, 0, 0],
            "dilations": [1, 1], "group": 1})
    # Reshapes copy the tiles axis (0, not the exporter's -1): shape inference then carries the name `tiles` through
    # the graph, and ONNX Runtime's allocation planner reuses buffers only between values it knows are the same size
    # (with unnamed axes, the calibration session held 0.7 GiB more and ran 20% slower on the same-size 300M).
    x = op("Transpose", [op("Reshape", [cast(x, f32), i64([0, c, positions - 1])])], {"perm": [0, 2, 1]})
    tiles = op("Shape", [pixels], {"start": 0, "end": 1})
    cls = op("Expand", [const("cls_token", emb.cls_token), op("Concat", [tiles, i64([1]), i64([1])], {"axis": 0})])
    x = op("Add", [op("Concat", [cls, x], {"axis": 1}), const("position_embeddings", emb.position_embeddings)])
    scale = g.const("attention.scale", np.array(tower.encoder.layer[0].attention.scale, wide))
    heads_shape, merged_shape = i64([0, positions, heads, d]), i64([0, positions, c])
    for i, layer in enumerate(tower.encoder.layer):
        p, attn = f"layers.{i}", layer.attention
        h = cast(norm(x, layer.layernorm_before, f"{p}.norm1"), w_type)
        q, k, v_ = (g.matmul(h, [proj], f"{p}.attn.{n}") for proj, n in ((attn.q_proj, "q"), (attn.k_proj, "k"),
                                                                          (attn.v_proj, "v")))
        if v.qk_normalization:  # RMSNorm over all heads of q and of k, in fp32
            q = cast(norm(cast(q, f32), attn.q_norm, f"{p}.attn.q_norm"), w_type)
            k = cast(norm(cast(k, f32), attn.k_norm, f"{p}.attn.k_norm"), w_type)
        q, k, v_ = (op("Reshape", [t, heads_shape]) for t in (q, k, v_))
        scores = op("MatMul", [op("Transpose", [q], {"perm": [0, 2, 1, 3]}), op("Transpose", [k], {"perm": [0, 2, 3, 1]})])
        probs = cast(op("Softmax", [cast(op("Mul", [scores, scale]), f32)], {"axis": -1}), w_type)
        out = op("MatMul", [probs, op("Transpose", [v_], {"perm": [0, 2, 1, 3]})])
        out = op("Reshape", [op("Transpose", [out], {"perm": [0, 2, 1, 3]}), merged_shape])
        out = cast(g.matmul(out, [attn.projection_layer], f"{p}.attn.proj"), f32)
        x = op("Add", [x, op("Mul", [const(f"{p}.lambda_1", layer.lambda_1), out])])
        h = g.matmul(cast(norm(x, layer.layernorm_after, f"{p}.norm2"), w_type), [layer.mlp.fc1], f"{p}.mlp.fc1")
        out = cast(g.matmul(g.gelu(h), [layer.mlp.fc2], f"{p}.mlp.fc2"), f32)
        x = op("Add", [x, op("Mul", [const(f"{p}.lambda_2", layer.lambda_2), out])])
    x.name = "vision_features"
    g.save(path, [pixels], [x], outputs, "vision_encoder", {"": OPSET},
           {"vl_export.role": "vision_encoder", "vl_export.precision": precision}, EXTERNAL_DATA_BYTES, quantize)
    return GraphEntry(role="vision_encoder", file=path.name, precision=precision, inputs=inputs, outputs=outputs)


def build_projector(model, spec: ModelSpec, precision: str, path: Path, quantize=None) -> GraphEntry:
    """Write `model`'s projector in `precision` to `path`, as torch.onnx exports graphs.Projector: drop CLS, InternVL's
    pixel unshuffle (v2) as Reshape/Transpose, fp32 LayerNorm, MatMul + Add, the exporter's erf GELU, MatMul + Add.
    Its torch export took 2-4 s of a build for two matmuls (most of it the exporter's own start)."""
    import onnx_ir as ir

    from .onnx_export import EXTERNAL_DATA_BYTES, OPSET

    mlp = model.model.multi_modal_projector
    inputs, outputs, g = _start("projector", spec, precision)
    op, i64, cast = g.tape.op, g.i64, g.cast
    f32, w_type = ir.DataType.FLOAT, g.wide
    c, grid, r = spec.vision.hidden_size, spec.vision.grid, spec.shuffle_factor
    features = graph_inputs(inputs)["vision_features"]
    x = op("Slice", [features, i64([1]), i64([np.iinfo(np.int64).max]), i64([1]), i64([1])])  # (tiles, g*g, C)
    x = op("Reshape", [x, i64([0, grid, grid // r, c * r])])  # (tiles, w, h/r, C*r)
    x = op("Transpose", [x], {"perm": [0, 2, 1, 3]})  # (tiles, h/r, w, C*r)
    x = op("Reshape", [x, i64([0, grid // r, grid // r, c * r * r])])
    x = op("Transpose", [x], {"perm": [0, 2, 1, 3]})  # (tiles, w/r, h/r, C*r*r)
    x = op("Reshape", [x, i64([0, (grid // r) ** 2, c * r * r])])  # (tiles, 256, 4C)
    norm = mlp.layer_norm
    x = op("LayerNormalization", [x, g.const("mlp.layer_norm.weight", to_numpy(norm.weight)),
                                  g.const("mlp.layer_norm.bias", to_numpy(norm.bias))],
           {"axis": -1, "epsilon": float(norm.eps), "stash_type": 1})
    h = g.gelu(g.matmul(cast(x, w_type), [mlp.linear_1], "mlp.linear_1"))
    y = cast(g.matmul(h, [mlp.linear_2], "mlp.linear_2"), f32)
    y.name = "image_embeds"
    g.save(path, [features], [y], outputs, "projector", {"": OPSET},
           {"vl_export.role": "projector", "vl_export.precision": precision}, EXTERNAL_DATA_BYTES, quantize)
    return GraphEntry(role="projector", file=path.name, precision=precision, inputs=inputs, outputs=outputs)


BUILDERS = {"decoder": build_portable_decoder, "vision_encoder": build_vision_encoder, "projector": build_projector}
