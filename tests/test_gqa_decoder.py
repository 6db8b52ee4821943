"""What only the decoders built from the weights (export/graphs_gqa.py's GroupQueryAttention and stacked forms;
runtime/backends/ort_inplace.py's OrtGqaDecoder and OrtStackedDecoder) have: their fused graphs for both decoder
families (Qwen2, InternLM2), the write positions the GQA form refuses, and the manifest and session checks that keep a
bundle's built graph honest. Its parity with today's fp32 graphs (greedy tokens, logits
and cache, rows of one buffer at different lengths) runs in test_inplace_cache.py, engine batching in
test_engine.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from vl_export.errors import BundleError
from vl_export.manifest import Manifest
from vl_export.runtime import Pipeline
from vl_export.runtime.backends.ort_inplace import OrtGqaDecoder


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def pipes(request, bundle_fp32, bundle_gqa):
    fp32, gqa = (bundle_fp32, bundle_gqa) if request.param == "qwen2" else request.getfixturevalue("internlm2_gqa_bundles")
    return Pipeline.from_bundle(fp32, threads=2), Pipeline.from_bundle(gqa, threads=2)


def test_the_gqa_graph_is_chosen_and_fused(pipes):
    concat, gqa = pipes
    assert isinstance(gqa.decoder, OrtGqaDecoder) and not isinstance(concat.decoder, OrtGqaDecoder)
    entry = gqa.manifest.graph("decoder", "onnxruntime")
    assert entry.form == "gqa"
    ops = [n.op_type for n in onnx.load(str(gqa.bundle / entry.file), load_external_data=False).graph.node]
    layers = gqa.manifest.model.text.num_layers
    assert ops.count("GroupQueryAttention") == layers
    # Rotary inside GroupQueryAttention where ONNX Runtime rotates the head size (multiples of 16: the tiny Qwen2's
    # 16, every real model's 64 or 128), else RotaryEmbedding nodes (the tiny InternLM2's 8): both forms tested here.
    inside = gqa.manifest.model.text.head_dim % 16 == 0
    assert ops.count("RotaryEmbedding") == (0 if inside else 2 * layers) and ops.count("Split") == (0 if inside else layers)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers and ops.count("SimplifiedLayerNormalization") == 1
    assert ops.count("MatMul") == 5 * layers + 1  # qkv, o, gate, up, down + lm_head: what the INT4 step quantizes
    assert "Softmax" not in ops and "ScatterElements" not in ops


def test_the_stacked_graph_is_chosen_and_attends_per_kv_head(bundle_stacked, internlm2_stacked_bundles):
    from vl_export.runtime.backends.ort_inplace import OrtStackedDecoder

    for bundle in (bundle_stacked, internlm2_stacked_bundles[1]):
        pipe = Pipeline.from_bundle(bundle, threads=1)
        assert isinstance(pipe.decoder, OrtStackedDecoder)
        entry = pipe.manifest.graph("decoder", "onnxruntime")
        assert entry.form == "stacked"
        ops = [n.op_type for n in onnx.load(str(bundle / entry.file), load_external_data=False).graph.node]
        t = pipe.manifest.model.text
        assert t.num_heads > t.num_kv_heads  # grouped: the query groups are stacked
        assert ops.count("MultiHeadAttention") == t.num_layers and "GroupQueryAttention" not in ops
        assert ops.count("ScatterND") == 2 * t.num_layers and ops.count("RotaryEmbedding") == 2 * t.num_layers
        assert ops.count("MatMul") == 5 * t.num_layers + 1  # what the INT4 and INT8 steps quantize
        assert ops.count("Transpose") == 0  # the query heads' order is in the weights, the keys read as stored


def test_the_fp16_cache_graph_runs_attention_in_fp16_between_two_casts_a_layer(bundle_stacked_fp16):
    """The stacked decoder builds ship (fp16 cache): q|k|v cast to fp16 as it leaves its projection, attention's
    output cast back, nothing else; the manifest, the session and the runtime's buffers all say float16."""
    pipe = Pipeline.from_bundle(bundle_stacked_fp16, threads=1)
    entry = pipe.manifest.graph("decoder", "onnxruntime")
    layers = pipe.manifest.model.text.num_layers
    assert {t.dtype for t in entry.inputs + entry.outputs if t.name.startswith(("past_", "present."))} == {"float16"}
    assert pipe.decoder.kv_dtype == np.float16
    assert {i.type for i in pipe.decoder.session.get_inputs() if i.name.startswith("past_")} == {"tensor(float16)"}
    graph = onnx.load(str(bundle_stacked_fp16 / entry.file), load_external_data=False).graph
    casts = [next(a.i for a in n.attribute if a.name == "to") for n in graph.node if n.op_type == "Cast"]
    assert casts.count(onnx.TensorProto.FLOAT16) == layers and casts.count(onnx.TensorProto.FLOAT) == layers
    assert [n.op_type for n in graph.node].count("MultiHeadAttention") == layers
    tables = {i.name: i.data_type for i in graph.initializer if i.name in ("cos_cache", "sin_cache")}
    assert tables == {"cos_cache": onnx.TensorProto.FLOAT16, "sin_cache": onnx.TensorProto.FLOAT16}


def test_a_stacked_manifest_with_mixed_cache_dtypes_is_refused(bundle_stacked_fp16, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(bundle_stacked_fp16, out)
    data = json.loads((out / "manifest.json").read_text())
    entry = next(g for g in data["graphs"] if g.get("form") == "stacked")
    next(t for t in entry["inputs"] if t["name"] == "past_key_values.0.value")["dtype"] = "float32"
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="a stacked decoder's cache is float32 or float16, one dtype for every tensor"):
        Manifest.load(out)


def test_gqa_refuses_write_positions_it_cannot_honour(bundle_gqa):
    d = Pipeline.from_bundle(bundle_gqa, threads=1).decoder
    hidden = d.session.get_inputs()[0].shape[-1]
    d.reset(1, 8)
    d.ensure(8)
    with pytest.raises(ValueError, match="consecutively"):
        d.forward_at(np.zeros((1, 2, hidden), np.float32), np.ones((1, d.capacity), np.int64), np.array([[0, 1]]),
                     np.array([[1]]), np.array([[0, 5]]))


def _edited(bundle, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    edit(next(g for g in data["graphs"] if g.get("form") == "gqa"), data)
    (out / "manifest.json").write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda g, d: g.update(form="flash"), "form must be null or one of gqa"),
    (lambda g, d: g.update(backends=None), "must be [\"onnxruntime\"] for a gqa decoder"),
    (lambda g, d: [t.update(dtype="float16") for t in g["inputs"] + g["outputs"] if "." in t["name"]], "cache is float32"),
    (lambda g, d: next(x for x in d["graphs"] if x["role"] == "projector").update(form="gqa"), "not an in-place decoder"),
    (lambda g, d: next(x for x in d["graphs"] if x["role"] == "decoder" and not x.get("backends")).update(
        form="gqa", backends=["onnxruntime"]), "not an in-place decoder"),
])
def test_manifest_refuses_a_gqa_entry_that_is_not_one(bundle_gqa, tmp_path, edit, message):
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Manifest.load(_edited(bundle_gqa, tmp_path, edit))


@pytest.mark.parametrize("form", ["gqa", "stacked"])
def test_a_built_graph_whose_io_differs_from_its_manifest_is_refused_at_load(form, request, tmp_path):
    """The manifest is self-consistent, the graph is not what it says (inputs renamed): refused when the session opens."""
    from vl_export.export.bundle import with_hashes

    out = tmp_path / "renamed"
    shutil.copytree(request.getfixturevalue(f"bundle_{form}"), out)
    manifest = Manifest.load(out)
    entry = manifest.graph("decoder", "onnxruntime")
    model = onnx.load(str(out / entry.file))
    for graph_input in model.graph.input:
        if graph_input.name == "position_ids":
            graph_input.name = "positions"
    for node in model.graph.node:
        node.input[:] = ["positions" if n == "position_ids" else n for n in node.input]
    onnx.save(model, str(out / entry.file))
    manifest.graphs = [with_hashes(g, out) if g.file == entry.file else g for g in manifest.graphs]
    manifest.save(out)
    with pytest.raises(BundleError, match="do not match its manifest entry: graph positions"):
        Pipeline.from_bundle(out, threads=1)


def test_manifest_without_a_form_is_written_as_before(bundle_fp32):
    """Bundles without the GQA decoder keep their manifest.json unchanged (no `form` key an older reader refuses)."""
    data = json.loads((bundle_fp32 / "manifest.json").read_text())
    assert all("form" not in g for g in data["graphs"])
    assert json.loads(json.dumps(Manifest.load(bundle_fp32).to_dict())) == data


@pytest.mark.parametrize("form", ["gqa", "stacked"])
def test_built_graph_quantizes_to_int4_and_dynamic_int8_close_to_fp32(form, request, tmp_path):
    """The build's two ONNX Runtime steps take the built graphs as they take the exported one: every weight MatMul
    quantized, logits close to the fp32 graph's over a prompt and decode steps."""
    import dataclasses

    from vl_export.calibration import int4, quantize
    from vl_export.runtime.backends.ort import OrtBackend

    bundle = request.getfixturevalue(f"bundle_{form}")
    manifest = Manifest.load(bundle)
    entry = manifest.graph("decoder", "onnxruntime")
    layers, hidden = manifest.model.text.num_layers, manifest.model.text.hidden_size
    src = bundle / entry.file
    made = {"int4": tmp_path / "decoder.int4.onnx", "int8": tmp_path / "decoder.int8.onnx"}
    int4.matmul_nbits(src, made["int4"], block_size=32, accuracy_level=4, lm_head="int4")
    quantize.dynamic_int8(src, made["int8"], head_block=128)  # as builds make it: lm_head 8-bit MatMulNBits
    backend = OrtBackend(threads=1)

    def run(path) -> np.ndarray:
        d = backend.open_decoder(path.parent, dataclasses.replace(entry, file=path.name))
        rng = np.random.default_rng(5)
        d.reset(1, 16)
        out = [d.forward(rng.standard_normal((1, 6, hidden)).astype(np.float32), np.ones((1, 6), np.int64),
                         np.arange(6)[None], np.arange(6)[None])[0]]
        for step in range(6, 10):
            out.append(d.forward(rng.standard_normal((1, 1, hidden)).astype(np.float32), np.ones((1, step + 1), np.int64),
                                 np.array([[step]]), np.zeros((1, 1), np.int64))[0])
        return np.concatenate(out)  # (10, vocab)

    want = run(src)
    for precision, op, head, bar in (("int4", "MatMulNBits", 1, 0.98), ("int8", "MatMulInteger", 0, 0.995)):
        ops = [n.op_type for n in onnx.load(str(made[precision])).graph.node]
        assert ops.count(op) == 5 * layers + head and "MatMul" not in ops, precision  # qkv o gate up down (+ lm_head)
        assert ops.count("MatMulNBits") == 1 + (precision == "int4") * 5 * layers  # lm_head 4- or 8-bit
        got = run(made[precision])
        cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > bar, (precision, cos)
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.5, precision


def test_a_gqa_bundle_is_refused_by_an_onnxruntime_older_than_the_one_it_was_checked_on(bundle_gqa, monkeypatch):
    import onnxruntime

    from vl_export.errors import BackendUnavailableError

    monkeypatch.setattr(onnxruntime, "__version__", "1.31.2")
    with pytest.raises(BackendUnavailableError, match=r"needs onnxruntime >= 1\.32, this is 1\.31\.2"):
        Pipeline.from_bundle(bundle_gqa, threads=1)
