"""Export: every graph in ONNX Runtime equals the transformers PyTorch model it came from."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vl_export.export import checkpoint
from vl_export.export.onnx_export import kv_names
from vl_export.manifest import SCHEMA_VERSION, Manifest

FP32_RTOL = 1e-4  # max abs diff <= 1e-4 x the output's largest magnitude
FP16_MIN_COSINE = 0.999


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def session(bundle, file):
    return ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])


def pixel_values(tiles: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tiles, 3, 448, 448)).astype(np.float32)


def hf_vision(model, px: np.ndarray):
    with torch.no_grad():
        t = torch.from_numpy(px)
        features = model.model.vision_tower(pixel_values=t).last_hidden_state
        embeds = model.model.get_image_features(pixel_values=t).pooler_output
    return features.numpy(), embeds.numpy()


def decoder_feeds(spec, embeds, mask, positions, logits_positions, past):
    feeds = {
        "inputs_embeds": embeds.astype(np.float32),
        "attention_mask": mask.astype(np.int64),
        "position_ids": positions.astype(np.int64),
        "logits_positions": logits_positions.astype(np.int64),
    }
    feeds.update(zip(kv_names(spec.text.num_layers, "past_key_values"), past))
    return feeds


def hf_cache(past_key_values) -> list[np.ndarray]:
    out = []
    for layer in past_key_values.layers:
        out += [layer.keys.numpy(), layer.values.numpy()]
    return out


# --- the graphs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiles", [1, 3])
def test_vision_and_projector_match_pytorch_fp32(tiny, bundle_fp32, tiles):
    px = pixel_values(tiles, seed=tiles)
    want_features, want_embeds = hf_vision(tiny["model"], px)
    features = session(bundle_fp32, "vision_encoder.onnx").run(None, {"pixel_values": px})[0]
    embeds = session(bundle_fp32, "projector.onnx").run(None, {"vision_features": features})[0]
    assert features.shape == (tiles, 1025, 32)
    assert embeds.shape == (tiles, 256, 64)
    assert rel_err(features, want_features) <= FP32_RTOL
    assert rel_err(embeds, want_embeds) <= FP32_RTOL


def _prefill_then_decode(tiny, bundle, batch: int, kv_dtype=np.float32):
    """Prefill 9 positions (row 1 left-padded by 3 when batch 2), then 3 single-token steps, beside transformers."""
    model, spec = tiny["model"], tiny["spec"]
    rng = np.random.default_rng(batch)
    hidden, kv_heads, head_dim = spec.text.hidden_size, spec.text.num_kv_heads, spec.text.head_dim
    seq = 9
    mask = np.ones((batch, seq), np.int64)
    if batch == 2:
        mask[1, :3] = 0
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)  # as transformers' generate builds them
    embeds = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    sess = session(bundle, "decoder.onnx")
    empty = [np.zeros((batch, kv_heads, 0, head_dim), kv_dtype)] * (2 * spec.text.num_layers)
    every = np.broadcast_to(np.arange(seq), (batch, seq))
    outs = sess.run(None, decoder_feeds(spec, embeds, mask, positions, every, empty))
    with torch.no_grad():
        ref = model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), use_cache=True)
    valid = mask.astype(bool)  # padding rows are never read by real positions; compare real ones
    steps = [(outs[0][valid], ref.logits.numpy()[valid], outs[1:], hf_cache(ref.past_key_values))]
    cache, past_kv, step_mask, pos = outs[1:], ref.past_key_values, mask, positions[:, -1:]
    for _ in range(3):
        token = rng.standard_normal((batch, 1, hidden)).astype(np.float32)
        step_mask = np.concatenate([step_mask, np.ones((batch, 1), np.int64)], axis=1)
        pos = pos + 1
        outs = sess.run(None, decoder_feeds(spec, token, step_mask, pos, np.zeros((batch, 1)), cache))
        with torch.no_grad():
            ref = model(inputs_embeds=torch.from_numpy(token), attention_mask=torch.from_numpy(step_mask),
                        position_ids=torch.from_numpy(pos), past_key_values=past_kv, use_cache=True)
        past_kv, cache = ref.past_key_values, outs[1:]
        steps.append((outs[0], ref.logits.numpy(), outs[1:], hf_cache(ref.past_key_values)))
    return steps


@pytest.mark.parametrize("batch", [1, 2])
def test_decoder_prefill_and_decode_match_pytorch_fp32(tiny, bundle_fp32, batch):
    steps = _prefill_then_decode(tiny, bundle_fp32, batch)
    for i, (logits, want, present, want_present) in enumerate(steps):
        assert rel_err(logits, want) <= FP32_RTOL, f"step {i}"
        assert len(present) == len(want_present) == 2 * tiny["spec"].text.num_layers
        for got_kv, want_kv in zip(present, want_present):
            assert got_kv.shape == want_kv.shape
            if batch == 2:  # the padded row's cache entries at padding positions are garbage in both
                got_kv, want_kv = got_kv[:, :, 3:], want_kv[:, :, 3:]
            assert rel_err(got_kv, want_kv) <= FP32_RTOL, f"present at step {i}"
    assert steps[-1][2][0].shape[2] == 9 + 3  # the cache grew by one per decode step


def test_decoder_returns_only_the_logits_asked_for(tiny, bundle_fp32):
    spec = tiny["spec"]
    sess = session(bundle_fp32, "decoder.onnx")
    embeds = np.random.default_rng(0).standard_normal((1, 6, spec.text.hidden_size)).astype(np.float32)
    empty = [np.zeros((1, spec.text.num_kv_heads, 0, spec.text.head_dim), np.float32)] * (2 * spec.text.num_layers)
    mask, pos = np.ones((1, 6)), np.arange(6)[None]
    full = sess.run(["logits"], decoder_feeds(spec, embeds, mask, pos, np.arange(6)[None], empty))[0]
    last = sess.run(["logits"], decoder_feeds(spec, embeds, mask, pos, np.array([[5]]), empty))[0]
    assert full.shape == (1, 6, spec.text.vocab_size) and last.shape == (1, 1, spec.text.vocab_size)
    np.testing.assert_array_equal(last[0, 0], full[0, 5])


def test_fp16_graphs_stay_close_to_pytorch_fp32(tiny, bundle_fp16):
    px = pixel_values(2, seed=7)
    want_features, want_embeds = hf_vision(tiny["model"], px)
    features = session(bundle_fp16, "vision_encoder.onnx").run(None, {"pixel_values": px})[0]
    embeds = session(bundle_fp16, "projector.onnx").run(None, {"vision_features": want_features})[0]
    assert cosine(features, want_features) >= FP16_MIN_COSINE
    assert cosine(embeds, want_embeds) >= FP16_MIN_COSINE
    for logits, want, present, want_present in _prefill_then_decode(tiny, bundle_fp16, 2, np.float16):
        assert cosine(logits, want) >= FP16_MIN_COSINE
        assert present[0].dtype == np.float16


def test_fp16_graphs_hold_fp16_matmuls_and_fp32_norms(bundle_fp16):
    graph = onnx.load(str(bundle_fp16 / "vision_encoder.onnx"))
    fp16_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_weights, "no fp16 weights in the fp16 vision encoder"
    types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.graph.value_info}
    types.update({i.name: i.data_type for i in graph.graph.initializer})
    norms = [n for n in graph.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert norms and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in norms)


def test_decoder_attention_does_not_repeat_the_kv_cache(tiny, bundle_fp32):
    """Regression: the graph used to expand K and V from the KV heads to all query heads at every step, a copy of
    groups x the cache that took most of a decode step at long contexts. Between the cache inputs and the
    attention matmuls that read them there must be no Expand or Tile."""
    graph = onnx.load(str(bundle_fp32 / "decoder.onnx")).graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    assert tiny["spec"].text.num_kv_heads < tiny["spec"].text.num_heads, "the tiny model must use grouped-query attention"
    reached, frontier, matmuls = [], list(kv_names(tiny["spec"].text.num_layers, "past_key_values")), 0
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type == "MatMul":  # the attention matmul: the cache has arrived, stop here
                matmuls += 1
                continue
            if node.op_type == "Shape":  # reads the past length, not the cache's values
                continue
            reached.append(node.op_type)
            frontier.extend(node.output)
    assert matmuls == 2 * tiny["spec"].text.num_layers  # every K and V reaches its attention matmul
    assert not {"Expand", "Tile"} & set(reached), reached


# --- the two layouts ------------------------------------------------------------------------------------------


def test_original_and_native_layouts_load_to_identical_models(tiny):
    original = checkpoint.load(tiny["original"])
    native = checkpoint.load(tiny["native"])
    assert original.spec.layout == "original" and native.spec.layout == "native"
    assert original.spec.vision == native.spec.vision and original.spec.text == native.spec.text
    a, b = original.model.state_dict(), native.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = torch.tensor([[1, 2, 3, tiny["specials"]["<IMG_CONTEXT>"]] + [tiny["specials"]["<IMG_CONTEXT>"]] * 255 + [4]])
    px = torch.from_numpy(pixel_values(1))
    with torch.no_grad():
        out_a = original.model(input_ids=ids, pixel_values=px).logits
        out_b = native.model(input_ids=ids, pixel_values=px).logits
        out_ref = tiny["model"](input_ids=ids, pixel_values=px).logits
    assert torch.equal(out_a, out_b)
    assert torch.equal(out_a, out_ref)


def test_rename_map_agrees_with_internvl_module_names(tiny):
    from tiny_models import original_state_dict

    native = {k: v for k, v in tiny["model"].state_dict().items()}
    original = original_state_dict(tiny["model"])
    mapped = checkpoint.original_to_native(original)
    assert mapped.keys() == native.keys()
    assert all(torch.equal(mapped[k], native[k]) for k in native)
    back = checkpoint.native_to_original(native)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_manifest_records_the_contract(tiny, bundle_fp32):
    manifest = Manifest.load(bundle_fp32)
    data = json.loads((bundle_fp32 / "manifest.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert manifest.model.text.hidden_size == 64 and manifest.model.num_image_tokens == 256
    assert manifest.special_tokens == {k: tiny["specials"][k] for k in manifest.special_tokens}
    assert set(manifest.special_tokens) >= {"<|im_end|>", "<IMG_CONTEXT>", "<img>", "</img>", "<|endoftext|>"}
    assert manifest.provenance["layout"] == "original" and len(manifest.provenance["source_sha256"]) == 64
    assert {"torch", "onnx", "transformers"} <= set(manifest.provenance["versions"])
    embed = np.load(bundle_fp32 / "embed_tokens.npy", mmap_mode="r")
    np.testing.assert_array_equal(embed, tiny["model"].model.language_model.embed_tokens.weight.detach().numpy())
    for entry in manifest.graphs:
        graph = onnx.load(str(bundle_fp32 / entry.file), load_external_data=False)
        onnx.checker.check_model(str(bundle_fp32 / entry.file), full_check=True)
        for values, specs in ((graph.graph.input, entry.inputs), (graph.graph.output, entry.outputs)):
            assert [v.name for v in values] == [t.name for t in specs]
            for value, spec in zip(values, specs):
                dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                assert dims == list(spec.shape), value.name
    decoder = manifest.graph("decoder")
    assert decoder.inputs[4].name == "past_key_values.0.key" and decoder.outputs[1].name == "present.0.key"
    assert decoder.input("past_key_values.1.value").shape == ("batch", 2, "past", 16)
