"""The GroupQueryAttention decoder (export/graphs_gqa.py, runtime/backends/ort_inplace.py's OrtGqaDecoder) against
today's fp32 graphs on ONNX Runtime, for both decoder families (Qwen2, InternLM2): same greedy tokens, logits and
cache to float rounding, rows of one buffer at different lengths equal to each row alone; and the manifest and
session checks that keep a bundle's GQA graph honest. Engine batching with it runs in test_engine.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image

from tiny_models import add_gqa_decoder
from vl_export.errors import BundleError
from vl_export.manifest import Manifest
from vl_export.runtime import GenerationConfig, Pipeline
from vl_export.runtime.backends.ort_inplace import OrtGqaDecoder

NEW_TOKENS = 24


def image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def internlm2_bundles(tmp_path_factory):
    """An InternLM2 tiny model (the 2B's decoder family): its fp32 bundle, and that bundle with the GQA decoder."""
    from tiny_models import TINY_INTERNLM2_LLM, make_tiny, member_config
    from vl_export.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("internlm2-gqa")
    tiny = make_tiny(root, member_config(llm=TINY_INTERNLM2_LLM), native=False)
    export_bundle(str(tiny["original"]), root / "fp32", precision="fp32", progress=lambda _: None)
    return root / "fp32", add_gqa_decoder(tiny["original"], root / "fp32", root / "gqa")


@pytest.fixture(scope="module", params=["qwen2", "internlm2"])
def pipes(request, bundle_fp32, bundle_gqa):
    fp32, gqa = (bundle_fp32, bundle_gqa) if request.param == "qwen2" else request.getfixturevalue("internlm2_bundles")
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


def test_gqa_greedy_tokens_equal_the_concatenating_graph(pipes):
    concat, gqa = pipes
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for picture, question in ((image(900, 500, 3), "Describe the image."), (None, "Tell me a story.")):
        want = concat.chat(question, images=picture, generation=generation).token_ids
        got = gqa.chat(question, images=picture, generation=generation).token_ids
        assert got == want and len(got) == NEW_TOKENS


def test_gqa_batch_with_left_padding_equals_the_concatenating_graph(pipes):
    concat, gqa = pipes
    pictures = [image(1600, 500, 15), image(448, 448, 16)]
    questions = ["What is shown?", "Describe it in detail please."]
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    want = [r.token_ids for r in concat.batch_chat(questions, pictures, generation)]
    assert [r.token_ids for r in gqa.batch_chat(questions, pictures, generation)] == want


def test_gqa_logits_and_cache_match_step_by_step(pipes, monkeypatch):
    from vl_export.runtime.backends import ort_inplace

    monkeypatch.setattr(ort_inplace, "GROW_POSITIONS", 1)  # the view grows mid-run: kept positions copied over
    concat, gqa = pipes
    hidden = concat.manifest.model.text.hidden_size
    rng = np.random.default_rng(0)
    a, b = concat.decoder, gqa.decoder
    a.reset(2, 12)
    b.reset(2, 20)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)  # row 0 left-padded
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
    for step in range(4):
        s = mask.shape[1] if step == 0 else 1
        embeds = rng.standard_normal((2, s, hidden)).astype(np.float32)
        pos = positions if step == 0 else positions[:, -1:] + step
        last = np.full((2, 1), s - 1, np.int64)
        current = mask if step == 0 else np.concatenate([mask, np.ones((2, step), np.int64)], axis=1)
        want, got = a.forward(embeds, current, pos, last), b.forward(embeds, current, pos, last)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # measured: 2e-6 apart
        assert (got.argmax(-1) == want.argmax(-1)).all()
    assert b.capacity == 12
    real = np.concatenate([mask, np.ones((2, 3), np.int64)], axis=1).astype(bool)  # (b, past)
    for x, y in zip(a.cache(), b.cache()):
        assert x.shape == y.shape
        np.testing.assert_allclose(y.transpose(0, 2, 1, 3)[real], x.transpose(0, 2, 1, 3)[real], rtol=1e-5, atol=1e-5)


def test_gqa_rows_of_one_buffer_at_different_lengths_equal_each_row_alone(pipes):
    """Slots: row 0 holds a 6-token prompt, row 1 a 3-token one; while one row is prefilled the other writes into
    masked scratch slots at the end of its buffer (consecutively: the form writes no other way)."""
    concat, gqa = pipes
    hidden = concat.manifest.model.text.hidden_size
    rng = np.random.default_rng(1)
    prompts = [rng.standard_normal((1, n, hidden)).astype(np.float32) for n in (6, 3)]
    nxt = rng.standard_normal((2, 1, hidden)).astype(np.float32)
    alone = []
    for p, e in zip(prompts, nxt):
        concat.decoder.reset(1, 8)
        n = p.shape[1]
        concat.decoder.forward(p, np.ones((1, n), np.int64), np.arange(n)[None], np.array([[n - 1]]))
        alone.append(concat.decoder.forward(e[None], np.ones((1, n + 1), np.int64), np.array([[n]]), np.zeros((1, 1), np.int64)))
    d = gqa.decoder
    d.reset(2, 13)
    d.ensure(13)
    mask = np.zeros((2, d.capacity), np.int64)
    for row, p in enumerate(prompts):
        n = p.shape[1]
        mask[row, :n] = 1
        full = np.zeros((2, n, hidden), np.float32)
        full[row] = p[0]
        write = np.broadcast_to(np.arange(n), (2, n)).copy()
        write[1 - row] = np.arange(d.capacity - n, d.capacity)  # scratch, past every row's real positions
        d.forward_at(full, np.where(np.arange(2)[:, None] == row, mask, 0), np.broadcast_to(np.arange(n), (2, n)),
                     np.full((2, 1), n - 1), write)
    lengths = np.array([6, 3])
    mask[np.arange(2), lengths] = 1
    logits = d.forward_at(nxt, mask, lengths[:, None], np.zeros((2, 1), np.int64), lengths[:, None])
    for row in range(2):
        np.testing.assert_allclose(logits[row], alone[row][0], rtol=1e-4, atol=1e-4)


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


def test_a_gqa_graph_whose_io_differs_from_its_manifest_is_refused_at_load(bundle_gqa, tmp_path):
    """The manifest is self-consistent, the graph is not what it says (inputs renamed): refused when the session opens."""
    from vl_export.export.bundle import with_hashes

    out = tmp_path / "renamed"
    shutil.copytree(bundle_gqa, out)
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


def test_gqa_graph_quantizes_to_int4_and_dynamic_int8_close_to_fp32(bundle_gqa, tmp_path):
    """The build's two ONNX Runtime steps take the GQA graph as they take the exported one: every weight MatMul
    quantized, logits close to the fp32 GQA graph's over a prompt and decode steps."""
    import dataclasses

    from vl_export.calibration import int4, quantize
    from vl_export.runtime.backends.ort import OrtBackend

    manifest = Manifest.load(bundle_gqa)
    entry = manifest.graph("decoder", "onnxruntime")
    layers, hidden = manifest.model.text.num_layers, manifest.model.text.hidden_size
    src = bundle_gqa / entry.file
    made = {"int4": tmp_path / "decoder.int4.onnx", "int8": tmp_path / "decoder.int8.onnx"}
    int4.matmul_nbits(src, made["int4"], block_size=32, accuracy_level=4, lm_head="int4")
    quantize.dynamic_int8(src, made["int8"])
    backend = OrtBackend(threads=1)

    def run(path) -> np.ndarray:
        d = OrtGqaDecoder(backend._session(path), dataclasses.replace(entry, file=path.name), backend)
        rng = np.random.default_rng(5)
        d.reset(1, 16)
        out = [d.forward(rng.standard_normal((1, 6, hidden)).astype(np.float32), np.ones((1, 6), np.int64),
                         np.arange(6)[None], np.arange(6)[None])[0]]
        for step in range(6, 10):
            out.append(d.forward(rng.standard_normal((1, 1, hidden)).astype(np.float32), np.ones((1, step + 1), np.int64),
                                 np.array([[step]]), np.zeros((1, 1), np.int64))[0])
        return np.concatenate(out)  # (10, vocab)

    want = run(src)
    for precision, op, bar in (("int4", "MatMulNBits", 0.98), ("int8", "MatMulInteger", 0.995)):
        ops = [n.op_type for n in onnx.load(str(made[precision])).graph.node]
        assert ops.count(op) == 5 * layers + 1 and "MatMul" not in ops, precision  # qkv o gate up down + lm_head
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
