"""The in-place KV cache decoders (the torch-exported export/graphs_inplace.py, and export/graphs_gqa.py's
GroupQueryAttention and stacked forms for both decoder families; runtime/backends/ort_inplace.py) against today's concatenating
decoder graph, all fp32 on ONNX Runtime: same greedy tokens, same logits to float rounding, same cache, and rows of
one buffer at different lengths (engine slots) equal to each row run alone. What only the GQA form has is in
test_gqa_decoder.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vl_export.runtime import GenerationConfig, Pipeline

NEW_TOKENS = 24


def image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def inplace_bundle(tiny, bundle_fp32, tmp_path_factory):
    """bundle_fp32 plus the torch-exported in-place decoder as its ONNX Runtime variant."""
    from tiny_models import add_inplace_decoder

    return add_inplace_decoder(tiny["original"], bundle_fp32, tmp_path_factory.mktemp("inplace") / "bundle")


@pytest.fixture(scope="module", params=["exported", "gqa-qwen2", "gqa-internlm2", "stacked-qwen2", "stacked-internlm2",
                                        "stacked-fp16-qwen2"])
def pipes(request, bundle_fp32):
    if request.param.endswith("-internlm2"):
        fp32, inplace = request.getfixturevalue(f"internlm2_{request.param.split('-')[0]}_bundles")
    else:
        fixture = {"exported": "inplace_bundle", "gqa-qwen2": "bundle_gqa", "stacked-qwen2": "bundle_stacked",
                   "stacked-fp16-qwen2": "bundle_stacked_fp16"}
        fp32, inplace = bundle_fp32, request.getfixturevalue(fixture[request.param])
    return Pipeline.from_bundle(fp32, threads=2), Pipeline.from_bundle(inplace, threads=2)


def test_inplace_decoder_is_chosen_for_the_onnxruntime_variant(pipes):
    from vl_export.runtime.backends.ort_inplace import OrtInplaceDecoder

    concat, inplace = pipes
    assert isinstance(inplace.decoder, OrtInplaceDecoder)
    assert not isinstance(concat.decoder, OrtInplaceDecoder)


def test_inplace_greedy_tokens_equal_the_concatenating_graph(pipes):
    concat, inplace = pipes
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for picture, question in ((image(900, 500, 3), "Describe the image."), (None, "Tell me a story.")):
        want = concat.chat(question, images=picture, generation=generation).token_ids
        got = inplace.chat(question, images=picture, generation=generation).token_ids
        assert got == want and len(got) == NEW_TOKENS


def test_inplace_batch_with_left_padding_equals_the_concatenating_graph(pipes):
    concat, inplace = pipes
    pictures = [image(1600, 500, 15), image(448, 448, 16)]
    questions = ["What is shown?", "Describe it in detail please."]
    generation = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    want = [r.token_ids for r in concat.batch_chat(questions, pictures, generation)]
    assert [r.token_ids for r in inplace.batch_chat(questions, pictures, generation)] == want


def tolerances(decoder) -> tuple[float, float]:
    """(logits, cache) tolerances against fp32: an fp16 cache rounds each key and value to 11 significant bits (a
    relative 2**-11 = 4.9e-4; these logits are O(1), moved by up to 7e-4 over the steps below)."""
    return (2e-3, 1e-3) if decoder.kv_dtype == np.float16 else (1e-4, 1e-5)


def test_inplace_logits_and_cache_match_step_by_step(pipes, monkeypatch):
    from vl_export.runtime.backends import ort_inplace

    monkeypatch.setattr(ort_inplace, "GROW_POSITIONS", 1)  # the view: 6 positions at the prompt, 12 from step 2 on
    concat, inplace = pipes
    hidden = concat.manifest.model.text.hidden_size
    rng = np.random.default_rng(0)
    a, b = concat.decoder, inplace.decoder
    a.reset(2, 12)
    b.reset(2, 20)  # a larger capacity than needed: the unused tail must not matter
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int64)  # row 0 left-padded
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
    for step in range(4):
        s = mask.shape[1] if step == 0 else 1
        embeds = rng.standard_normal((2, s, hidden)).astype(np.float32)
        pos = positions if step == 0 else positions[:, -1:] + step
        last = np.full((2, 1), s - 1, np.int64)
        current = mask if step == 0 else np.concatenate([mask, np.ones((2, step), np.int64)], axis=1)
        want, got = a.forward(embeds, current, pos, last), b.forward(embeds, current, pos, last)
        np.testing.assert_allclose(got, want, rtol=tolerances(b)[0], atol=tolerances(b)[0])
        assert (got.argmax(-1) == want.argmax(-1)).all()
    from vl_export.runtime.backends.ort_inplace import OrtStackedDecoder

    # Grown once, the kept positions copied into the new layout: doubled, or (the stacked decoder, which attends over
    # the whole view) by GROW_POSITIONS past what is needed.
    assert b.capacity == (8 if isinstance(b, OrtStackedDecoder) else 12)
    real = np.concatenate([mask, np.ones((2, 3), np.int64)], axis=1).astype(bool)  # (b, past)
    for x, y in zip(a.cache(), b.cache()):
        assert x.shape == y.shape
        # Padding positions differ past layer 0 and are never attended to: a fully masked query row softmaxes
        # to uniform over past+s keys in one graph and over the capacity in the other.
        assert y.dtype == b.kv_dtype
        np.testing.assert_allclose(y.transpose(0, 2, 1, 3)[real].astype(np.float32), x.transpose(0, 2, 1, 3)[real],
                                   rtol=tolerances(b)[1], atol=tolerances(b)[1])


def test_rows_of_one_buffer_at_different_lengths_equal_each_row_alone(pipes):
    """Engine slots: row 0 holds a 6-token prompt, row 1 a 3-token one, in one buffer; a decode step for both
    (per-row write positions) gives each row's logits as if it ran alone. While one row is prefilled the other
    writes into masked scratch slots at the end of its buffer, consecutively (the GQA form writes no other way)."""
    concat, inplace = pipes
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
    d = inplace.decoder
    d.reset(2, 13)
    d.ensure(13)  # an engine sizes the view before stepping slots with forward_at
    mask = np.zeros((2, d.capacity), np.int64)
    for row, p in enumerate(prompts):  # each slot prefilled on its own row
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
        np.testing.assert_allclose(logits[row], alone[row][0], rtol=tolerances(d)[0], atol=tolerances(d)[0])


def test_stacked_prefill_in_chunks_equals_one_run(bundle_stacked, monkeypatch):
    """The stacked decoder reads a long prompt PREFILL_CHUNK positions at a time: the same logits (at positions in
    different chunks, a left-padded row beside a full one), the same cache and the same next step as one run."""
    from vl_export.runtime.backends import ort_inplace

    d = Pipeline.from_bundle(bundle_stacked, threads=2).decoder
    hidden = d.session.get_inputs()[0].shape[-1]
    rng = np.random.default_rng(7)
    n = 11
    embeds = rng.standard_normal((2, n, hidden)).astype(np.float32)
    mask = np.ones((2, n), np.int64)
    mask[0, :3] = 0
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
    wanted = np.array([[n - 1, 5], [n - 1, 0]])  # the last chunk's, a middle chunk's and the first chunk's
    step = rng.standard_normal((2, 1, hidden)).astype(np.float32)
    results = []
    for chunk in (64, 4):  # one run; then chunks of 4, 4 and 3
        monkeypatch.setattr(ort_inplace, "PREFILL_CHUNK", chunk)
        d.reset(2, 20)
        logits = d.forward(embeds, mask, positions, wanted)
        cache = d.cache()
        after = d.forward(step, np.concatenate([mask, np.ones((2, 1), np.int64)], 1), positions[:, -1:] + 1,
                          np.zeros((2, 1), np.int64))
        results.append((logits, cache, after))
    (one, one_cache, one_after), (chunked, chunked_cache, chunked_after) = results
    np.testing.assert_allclose(chunked, one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked_after, one_after, rtol=1e-5, atol=1e-5)
    real = mask.astype(bool)  # padding positions are never attended to (see the step-by-step test)
    for x, y in zip(one_cache, chunked_cache):
        np.testing.assert_allclose(y.transpose(0, 2, 1, 3)[real], x.transpose(0, 2, 1, 3)[real], rtol=1e-5, atol=1e-5)
