"""The continuous-batching engine keeps every request's tokens exactly: alone or batched, cached or not.

The reference is the plain single-request loop (runtime/generate.py: one-shot prefill, batch 1, no cache), run on
the same bundle and backend. Requests differ in prompt length, image count and tile count, join and leave at
different steps, and one is cancelled midway; prefills are chunked (64 positions) so chunks interleave with the
running rows' decode steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vl_export.errors import InputError
from vl_export.runtime import GenerationConfig, Pipeline
from vl_export.runtime.engine import Engine
from vl_export.runtime.engine.cache import ImageCache, PrefixCache
from vl_export.runtime.generate import generate


def picture(width, height, seed) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


ONE_TILE, WIDE, OTHER = picture(224, 224, 1), picture(448, 224, 2), picture(224, 224, 3)
# (question, images, max_new_tokens): 1 tile; 2 tiles + thumbnail; text only; two images; a short prompt.
REQUESTS = [("Describe the image.", ONE_TILE, 14), ("Name a colour.", WIDE, 9), ("Tell me a story.", None, 20),
            ("Compare them.", [OTHER, WIDE], 12), ("Hi", None, 6), ("What is this?", OTHER, 16)]


@pytest.fixture(scope="module", params=["onnxruntime", "onnxruntime-gqa", "onnxruntime-stacked", "openvino-f32"])
def pipe(request, bundle_fp32):
    if request.param == "onnxruntime":
        return Pipeline.from_bundle(bundle_fp32, threads=1)
    if request.param == "onnxruntime-gqa":  # the GroupQueryAttention decoder (export/graphs_gqa.py)
        from vl_export.runtime.backends.ort_inplace import OrtGqaDecoder

        pipe = Pipeline.from_bundle(request.getfixturevalue("bundle_gqa"), threads=1)
        assert isinstance(pipe.decoder, OrtGqaDecoder)
        return pipe
    if request.param == "onnxruntime-stacked":  # the stacked-group decoder (export/graphs_gqa.py) on an fp16 cache:
        from vl_export.runtime.backends.ort_inplace import OrtStackedDecoder  # what builds ship

        pipe = Pipeline.from_bundle(request.getfixturevalue("bundle_stacked_fp16"), threads=1)
        assert isinstance(pipe.decoder, OrtStackedDecoder) and pipe.decoder.kv_dtype == np.float16
        return pipe
    pytest.importorskip("openvino")
    return Pipeline.from_bundle(bundle_fp32, backend="openvino", threads=1, precision="f32")


def alone(pipe, question, images, generation, history=()) -> list[int]:
    """The single-request loop the engine replaced: splice, one-shot prefill, batch 1."""
    request = pipe.prepare(question, images, history)
    embeds = pipe.encode_images(request.pixel_values) if len(request.pixel_values) else None
    spliced = pipe.splice(request.ids, embeds)[None]
    return generate(pipe.decoder, spliced, np.ones((1, len(request.ids)), np.int64), pipe.embed, generation,
                    pipe.tokenizer.stop_ids, pipe.tokenizer.pad, pipe.manifest.max_context).token_ids[0]


def finish(engine: Engine) -> None:
    while engine.has_work:
        engine.step()


def test_greedy_tokens_are_the_same_alone_and_batched_joining_leaving_and_cancelled(pipe):
    want = [alone(pipe, q, im, GenerationConfig(max_new_tokens=n)) for q, im, n in REQUESTS]
    assert len({tuple(w) for w in want}) >= 4  # distinct answers, so a row mix-up would show
    engine = Engine(pipe, max_batch=3, prefill_chunk=64)
    prepared = [pipe.prepare(q, im) for q, im, _ in REQUESTS]
    seqs = {}

    def add(i):
        seqs[i] = engine.add(prepared[i], GenerationConfig(max_new_tokens=REQUESTS[i][2]))

    add(0)
    engine.step()
    add(1), add(2)  # join while 0 decodes; 2 waits for a slot until someone leaves
    widths = []
    for _ in range(4):
        engine.step()
        widths.append(len(engine.runner.rows))
    add(3), add(4), add(5)
    engine.step()
    engine.abort(seqs[2])  # cancelled midway: leaves at the next step, the others go on
    cancelled_at = len(seqs[2].tokens)
    finish(engine)
    assert max(widths) >= 2  # requests really decoded together
    for i in (0, 1, 3, 4, 5):
        assert seqs[i].finish_reason == "length" and seqs[i].tokens == want[i], i
    assert seqs[2].finish_reason == "cancelled" and 0 < cancelled_at < len(want[2])
    assert seqs[2].tokens == want[2][:cancelled_at]
    assert not engine.scheduler.active and not engine.runner.rows  # every slot given back


def test_a_seeded_sampled_request_gives_the_same_tokens_batched(pipe):
    sampled = GenerationConfig.sampling(temperature=1.0, top_p=0.95, seed=7, max_new_tokens=16)
    want = alone(pipe, "Tell me a story.", ONE_TILE, sampled)
    engine = Engine(pipe, max_batch=4, prefill_chunk=64)
    others = [engine.add(pipe.prepare(q, im), GenerationConfig.sampling(seed=i, max_new_tokens=n))
              for i, (q, im, n) in enumerate(REQUESTS[1:4])]
    engine.step()
    seq = engine.add(pipe.prepare("Tell me a story.", ONE_TILE), sampled)
    finish(engine)
    assert seq.tokens == want
    assert all(o.finish_reason == "length" for o in others)


def test_batch_chat_answers_as_each_question_alone(pipe):
    questions = [q for q, _, _ in REQUESTS[:4]]
    images = [im for _, im, _ in REQUESTS[:4]]
    results = pipe.batch_chat(questions, images, GenerationConfig(max_new_tokens=10))
    for result, question, image in zip(results, questions, images):
        assert result.token_ids == alone(pipe, question, image, GenerationConfig(max_new_tokens=10))


def test_a_follow_up_question_prefills_only_what_is_new_with_identical_tokens(bundle_fp32):
    cached = Pipeline.from_bundle(bundle_fp32, threads=1, kv_cache_mb=64, image_cache_mb=16)
    plain = Pipeline.from_bundle(bundle_fp32, threads=1)
    greedy = GenerationConfig(max_new_tokens=12)
    first = cached.chat("Describe the image.", images=WIDE, generation=greedy)
    assert first.timings.cached_tokens == 0
    second = cached.chat("And the colours?", images=WIDE, history=first.history, generation=greedy)
    assert second.token_ids == alone(plain, "And the colours?", WIDE, greedy, first.history)
    # The whole first round is reused (its question, its image's 768 tokens, as much of the answer as re-tokenises
    # the same): only the rest is prefilled.
    assert second.timings.cached_tokens >= first.timings.prompt_tokens
    assert cached.engine.image_cache.describe()["misses"] == 1  # the image's embeddings were not even needed again


def test_two_different_images_never_share_cached_positions(bundle_fp32):
    pipe = Pipeline.from_bundle(bundle_fp32, threads=1, kv_cache_mb=64)
    greedy = GenerationConfig(max_new_tokens=8)
    pipe.chat("What is this?", images=ONE_TILE, generation=greedy)
    request = pipe.prepare("What is this?", OTHER)  # same size, same prompt ids, other pixels
    assert request.ids == pipe.prepare("What is this?", ONE_TILE).ids
    image_start = request.ids.index(pipe.tokenizer.image_context)
    result = pipe.chat("What is this?", images=OTHER, generation=greedy)
    assert result.timings.cached_tokens == image_start  # the system prompt and <img>, never the other image's rows
    assert result.token_ids == alone(Pipeline.from_bundle(pipe.bundle, threads=1), "What is this?", OTHER, greedy)


def test_the_image_cache_skips_the_vision_encoder_and_keys_on_the_tiling(bundle_fp32):
    pipe = Pipeline.from_bundle(bundle_fp32, threads=1, image_cache_mb=16, max_tiles_per_run=8)  # one run per image
    runs = []
    vision_run = pipe.vision.run
    pipe.vision.run = lambda feeds: runs.append(len(feeds["pixel_values"])) or vision_run(feeds)
    greedy = GenerationConfig(max_new_tokens=6)
    first = pipe.chat("Describe the image.", images=WIDE, generation=greedy)
    again = pipe.chat("Name a colour.", images=WIDE, generation=greedy)
    assert runs == [3] and again.timings.vision_ms < first.timings.vision_ms
    pipe.chat("Describe the image.", images=WIDE, generation=greedy, max_tiles=1)  # other tiling: other tiles
    assert runs == [3, 1]
    stats = pipe.engine.image_cache.describe()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 2)
    assert stats["bytes"] == 4 * 256 * pipe.embed_table.shape[1] * 4  # 4 tiles of 256 float32 embeddings


def test_one_failing_request_does_not_take_down_the_batch(pipe):
    engine = Engine(pipe, max_batch=3, prefill_chunk=64)
    encode = engine._encode

    def broken(seq, needed):
        if seq.id == doomed.id:
            raise RuntimeError("vision encoder fell over")
        return encode(seq, needed)

    engine._encode = broken
    greedy = GenerationConfig(max_new_tokens=10)
    first = engine.add(pipe.prepare("Tell me a story.", None), greedy)
    engine.step()
    doomed = engine.add(pipe.prepare("Describe the image.", ONE_TILE), greedy)
    last = engine.add(pipe.prepare("What is this?", OTHER), greedy)
    finish(engine)
    assert doomed.finish_reason == "error" and "fell over" in str(doomed.error)
    assert first.tokens == alone(pipe, "Tell me a story.", None, greedy)
    assert last.tokens == alone(pipe, "What is this?", OTHER, greedy)


def test_a_request_over_the_context_is_refused_before_any_work(pipe):
    engine = Engine(pipe, max_batch=2)
    request = pipe.prepare("Hi", None)
    room = pipe.manifest.max_context - len(request.ids)
    with pytest.raises(InputError, match=f"the prompt is {len(request.ids)} tokens and max_tokens {room + 1}"):
        engine.add(request, GenerationConfig(max_new_tokens=room + 1), refuse_overlong=True)
    assert not engine.has_work


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_load_cache_resumes_a_decoder_exactly(bundle_fp32, backend):
    options = {"precision": "f32"} if backend == "openvino" else {}
    if backend == "openvino":
        pytest.importorskip("openvino")
    pipe = Pipeline.from_bundle(bundle_fp32, backend=backend, threads=1, **options)
    ids = np.array(pipe.prepare("Tell me a story.", None).ids)
    embeds, decoder = pipe.embed(ids)[None], pipe.decoder
    n = len(ids)
    decoder.reset(1, n + 4)
    decoder.forward(embeds[:, :-1], np.ones((1, n - 1), np.int64), np.arange(n - 1)[None], np.zeros((1, 1), np.int64))
    saved = decoder.cache()
    want = decoder.forward(embeds[:, -1:], np.ones((1, n), np.int64), np.array([[n - 1]]), np.zeros((1, 1), np.int64))
    decoder.reset(2, 8)  # something else ran in between
    decoder.load_cache(saved, n + 4)
    assert decoder.past_len == n - 1 and decoder.batch == 1
    got = decoder.forward(embeds[:, -1:], np.ones((1, n), np.int64), np.array([[n - 1]]), np.zeros((1, 1), np.int64))
    np.testing.assert_array_equal(got, want)


# --- the caches alone (pure) ----------------------------------------------------------------------------------------


def kv(n, value=0.0):
    return [np.full((2, n, 4), value, np.float32) for _ in range(2)]  # two tensors, (kv_heads, n, d)


def test_prefix_cache_finds_the_longest_common_prefix_and_keeps_one_entry_per_conversation():
    cache = PrefixCache(1 << 20)
    cache.store(np.arange(10), kv(10, 1.0))
    n, prefix = cache.lookup(np.r_[np.arange(6), 99, 100], limit=7)
    assert n == 6 and prefix[0].shape == (1, 2, 6, 4) and (prefix[0] == 1.0).all()
    assert cache.lookup(np.arange(20), limit=5)[0] == 5  # never more than asked (one position stays to prefill)
    cache.store(np.arange(15), kv(15, 2.0))  # the next round extends the first: it replaces it
    assert len(cache) == 1 and cache.lookup(np.arange(15), limit=14)[1][0][0, 0, 0, 0] == 2.0
    cache.store(np.arange(12), kv(12))  # covered already: not stored twice
    assert len(cache) == 1
    assert cache.lookup(np.array([5, 6]), limit=1) == (0, None)
    assert (cache.stats.hits, cache.stats.misses) == (3, 1)


def test_prefix_cache_evicts_least_recently_used_within_its_byte_budget():
    entry_bytes = sum(t.nbytes for t in kv(10)) + 10 * 8
    cache = PrefixCache(2 * entry_bytes)
    cache.store(np.arange(10), kv(10))
    cache.store(np.arange(100, 110), kv(10))
    cache.lookup(np.arange(10), limit=9)  # the first one is used again
    cache.store(np.arange(200, 210), kv(10))
    assert cache.bytes <= cache.budget_bytes and cache.stats.evictions == 1
    assert cache.lookup(np.arange(100, 110), limit=9)[0] == 0 and cache.lookup(np.arange(10), limit=9)[0] == 9
    cache.store(np.arange(50), kv(50))  # bigger than the whole budget: never stored
    assert len(cache) == 2


def test_image_cache_counts_hits_and_misses_and_stays_in_budget():
    cache = ImageCache(3 * 1024)
    assert cache.get(b"a") is None
    for key in (b"a", b"b", b"c", b"d"):
        cache.put(key, np.zeros(256, np.float32))  # 1 KiB each
    assert cache.get(b"a") is None and cache.get(b"d") is not None
    assert cache.describe() | {"budget_bytes": 0} == {"entries": 3, "bytes": 3072, "budget_bytes": 0, "hits": 1,
                                                       "misses": 2, "evictions": 1}


def test_tensorrt_load_cache_lays_out_a_new_batch_that_decodes_on(monkeypatch):
    """On the fake GPU (trt_fakes): the engine's relayout of two rows, then one decode step on top of it."""
    from test_tensorrt import expected_cache, step_inputs, toy_decoder

    decoder, cuda = toy_decoder(monkeypatch, max_context=16, max_batch=2)
    rng = np.random.default_rng(3)
    decoder.reset(batch=1, capacity=8)
    prompt = step_inputs(rng, 1, 0, 5)
    decoder.forward(*prompt)
    mine = decoder.cache()  # (1, 2, 5, 4) each
    both = [np.concatenate([c, np.full_like(c, 3.0)]) for c in mine]  # a second row beside it
    decoder.load_cache(both, capacity=8)
    assert (decoder.batch, decoder.past_len) == (2, 5)
    for got, want in zip(decoder.cache(), both):
        np.testing.assert_array_equal(got, want)
    step = step_inputs(rng, 2, 5, 1)
    decoder.forward(*step)
    for got, old, new in zip(decoder.cache(), both, expected_cache(step[0])):
        np.testing.assert_array_equal(got[:, :, :5], old)
        np.testing.assert_allclose(got[:, :, 5:], new, rtol=1e-6)
    with pytest.raises(InputError, match="built for batch <= 2"):
        decoder.load_cache([np.concatenate([c] * 3) for c in mine], capacity=8)


def test_vl_export_chat_reuses_the_conversation_cache_with_identical_answers(bundle_fp32, tmp_path, monkeypatch):
    import io

    import vl_export.runtime.interactive as interactive
    from vl_export.cli import main

    seen = {}
    monkeypatch.setattr(interactive, "chat_loop", lambda pipe, *a, **k: seen.update(pipe=pipe) or 0)
    assert main(["chat", "--bundle", str(bundle_fp32), "--kv-cache-mb", "16", "--image-cache-mb", "8"]) == 0
    assert seen["pipe"].engine.prefix_cache.budget_bytes == 16 << 20
    assert seen["pipe"].engine.image_cache.budget_bytes == 8 << 20
    monkeypatch.undo()

    path = tmp_path / "wide.png"
    WIDE.save(path)
    script = f"/image {path}\nWhat is it?\nAnd the colour?\nWhy?\n/exit\n"
    transcripts = []
    for budget in (16, 0):
        pipe = Pipeline.from_bundle(bundle_fp32, threads=1, kv_cache_mb=budget)
        out = io.StringIO()
        assert interactive.chat_loop(pipe, GenerationConfig(max_new_tokens=6), stdin=io.StringIO(script), stdout=out) == 0
        transcripts.append(out.getvalue())
        if budget:
            stats = pipe.engine.prefix_cache.describe()
            assert (stats["hits"], stats["misses"]) == (2, 1)  # the second and third rounds reuse the first
    assert transcripts[0] == transcripts[1]
