"""The runtime answers like InternVL2.5's chat()/batch_chat(): same prompt ids, same tiles, same greedy tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import reference_impl as ref
from vl_export.errors import BundleError, InputError
from vl_export.runtime import GenerationConfig, Pipeline
from vl_export.runtime.preprocess import count_video_frames, read_video_frames

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def pipe(bundle_fp32):
    return Pipeline.from_bundle(bundle_fp32, threads=2)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["original"])


def image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def ids_of(hf_tokenizer, query):
    return hf_tokenizer.encode(query, add_special_tokens=False)


# --- prompt parity -----------------------------------------------------------------------------------------


def test_single_image_prompt(pipe, hf_tokenizer):
    picture = image(900, 500, 1)
    request = pipe.prepare("What is in the image?", images=picture)
    query, _ = ref.chat_query("What is in the image?", [len(ref.load_image(picture))])
    assert request.ids == ids_of(hf_tokenizer, query)
    np.testing.assert_allclose(request.pixel_values, ref.load_image(picture).numpy(), atol=1e-6, rtol=0)


def test_multi_image_prompt_with_and_without_placeholders(pipe, hf_tokenizer):
    pictures = [image(1200, 400, 2), image(448, 448, 3)]
    counts = [len(ref.load_image(p)) for p in pictures]
    question = "Image-1: <image>\nImage-2: <image>\nDescribe the two images in detail."
    want = ids_of(hf_tokenizer, ref.chat_query(question, counts)[0])
    assert pipe.prepare(question, images=pictures).ids == want
    # Without markers the runtime writes the model card's Image-N prefixes (the reference would fail).
    assert pipe.prepare("Describe the two images in detail.", images=pictures).ids == want


def test_multi_round_prompt(pipe, hf_tokenizer):
    picture = image(700, 700, 4)
    tiles = [len(ref.load_image(picture))]
    query1, stored = ref.chat_query("Please describe the image shortly.", tiles)
    history = [(stored, "A picture.")]
    query2, _ = ref.chat_query("Please write a poem according to the image.", tiles, history=history)
    first = pipe.prepare("Please describe the image shortly.", images=picture)
    assert first.ids == ids_of(hf_tokenizer, query1) and first.question == stored
    second = pipe.prepare("Please write a poem according to the image.", images=picture, history=history)
    assert second.ids == ids_of(hf_tokenizer, query2)
    # An empty earlier answer renders as the reference's `if message:` does.
    query3, _ = ref.chat_query("Again?", tiles, history=[(stored, "")])
    assert pipe.prepare("Again?", images=picture, history=[(stored, "")]).ids == ids_of(hf_tokenizer, query3)


def test_text_only_prompt_and_system_message(pipe, hf_tokenizer):
    assert pipe.prepare("Hello, who are you?").ids == ids_of(hf_tokenizer, ref.chat_query("Hello, who are you?", [])[0])
    query, _ = ref.chat_query("Hi", [], system_message="You are terse.")
    assert pipe.prepare("Hi", system_message="You are terse.").ids == ids_of(hf_tokenizer, query)


def write_video(path, frames: int, size=(320, 240), fps=10):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            data = np.full((size[1], size[0], 3), (i * 9) % 256, np.uint8)
            data[:, : (i * 7) % size[0]] = 255 - data[:, : (i * 7) % size[0]]
            for packet in stream.encode(av.VideoFrame.from_ndarray(data, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_prompt_and_frames(pipe, hf_tokenizer, tmp_path):
    video = write_video(tmp_path / "clip.mp4", frames=40)
    request = pipe.prepare("What happens?", video=video, num_frames=8)
    total, fps = count_video_frames(video)
    frames = read_video_frames(video)
    assert len(frames) == total == 40
    indices = ref.get_index(None, fps, total - 1, num_segments=8)
    want = torch.cat([ref.load_image(frames[i], max_num=1) for i in indices]).numpy()
    np.testing.assert_allclose(request.pixel_values, want, atol=1e-6, rtol=0)
    prefix = "".join(f"Frame{i + 1}: <image>\n" for i in range(8))
    assert request.ids == ids_of(hf_tokenizer, ref.chat_query(prefix + "What happens?", [1] * 8)[0])
    with pytest.raises(InputError, match="has 40 frames, fewer than the 64 asked for"):
        pipe.prepare("What happens?", video=video, num_frames=64)


def test_placeholder_count_must_match_images(pipe):
    with pytest.raises(InputError, match="2 <image> placeholders but 1 images"):
        pipe.prepare("<image> and <image>", images=image(448, 448, 0))
    with pytest.raises(InputError, match="1 <image> placeholders but 0 images"):
        pipe.prepare("Again?", history=[("<image>\nDescribe.", "A cat.")])


# --- end to end: greedy tokens equal transformers' generate ----------------------------------------------------


def reference_tokens(tiny, hf_tokenizer, queries, pixel_values, new_tokens=NEW_TOKENS):
    stop = {tiny["specials"]["<|im_end|>"], tiny["specials"]["<|endoftext|>"]}
    px = None if pixel_values is None else torch.from_numpy(np.asarray(pixel_values))
    return ref.hf_generate(tiny["model"], hf_tokenizer, queries, px, new_tokens, stop, tiny["specials"]["<|endoftext|>"])


def test_greedy_single_image_equals_pytorch(tiny, pipe, hf_tokenizer):
    picture = image(1000, 600, 11)
    result = pipe.chat("Describe the image.", images=picture, generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    query, _ = ref.chat_query("Describe the image.", [len(ref.load_image(picture))])
    want = reference_tokens(tiny, hf_tokenizer, [query], ref.load_image(picture))[0]
    assert result.token_ids == want
    assert len(want) == NEW_TOKENS and result.finish_reason == "length"
    assert result.text == hf_tokenizer.decode(want, skip_special_tokens=True).split("<|im_end|>")[0].strip()


def test_greedy_multi_image_equals_pytorch(tiny, pipe, hf_tokenizer):
    pictures = [image(500, 900, 12), image(800, 800, 13)]
    result = pipe.chat("Compare them.", images=pictures, generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    counts = [len(ref.load_image(p)) for p in pictures]
    query, _ = ref.chat_query("Image-1: <image>\nImage-2: <image>\nCompare them.", counts)
    px = torch.cat([ref.load_image(p) for p in pictures])
    assert result.token_ids == reference_tokens(tiny, hf_tokenizer, [query], px)[0]
    assert len(result.token_ids) == NEW_TOKENS


def test_greedy_multi_round_equals_pytorch(tiny, pipe, hf_tokenizer):
    picture = image(640, 480, 14)
    tiles = [len(ref.load_image(picture))]
    first = pipe.chat("Describe the image.", images=picture, generation=GenerationConfig(max_new_tokens=8))
    second = pipe.chat("And the colours?", images=picture, history=first.history,
                       generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    query, _ = ref.chat_query("And the colours?", tiles, history=[(first.history[0][0], first.text)])
    assert second.token_ids == reference_tokens(tiny, hf_tokenizer, [query], ref.load_image(picture))[0]
    assert len(second.history) == 2 and second.history[0] == first.history[0]


def test_batch_of_two_with_different_tile_counts_equals_pytorch(tiny, pipe, hf_tokenizer):
    pictures = [image(1600, 500, 15), image(448, 448, 16)]
    counts = [len(ref.load_image(p)) for p in pictures]
    assert counts[0] != counts[1]
    questions = ["What is shown?", "Describe it in detail please."]
    results = pipe.batch_chat(questions, pictures, GenerationConfig(max_new_tokens=NEW_TOKENS))
    px = torch.cat([ref.load_image(p) for p in pictures])
    want = reference_tokens(tiny, hf_tokenizer, ref.batch_queries(questions, counts), px)
    assert [r.token_ids for r in results] == want
    assert all(len(r.token_ids) == NEW_TOKENS for r in results)


def test_text_only_greedy_equals_pytorch(tiny, pipe, hf_tokenizer):
    result = pipe.chat("Tell me a story.", generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    want = reference_tokens(tiny, hf_tokenizer, [ref.chat_query("Tell me a story.", [])[0]], None)[0]
    assert result.token_ids == want


# --- sampling, streaming, stopping --------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed_and_varies_across_seeds(pipe):
    picture = image(600, 600, 20)

    def sample(seed):
        config = GenerationConfig.sampling(temperature=1.5, top_p=0.95, seed=seed, max_new_tokens=24)
        return pipe.chat("Describe.", images=picture, generation=config).token_ids

    assert sample(1) == sample(1)
    assert len({tuple(sample(seed)) for seed in range(2, 6)}) >= 3
    assert sample(1) != pipe.chat("Describe.", images=picture, generation=GenerationConfig(max_new_tokens=24)).token_ids


def test_stream_pieces_add_up_to_the_answer(pipe):
    picture = image(700, 400, 21)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    stream = pipe.stream("Describe the image.", images=picture, generation=config)
    pieces = list(stream)
    whole = pipe.chat("Describe the image.", images=picture, generation=config)
    assert stream.result.token_ids == whole.token_ids
    assert "".join(pieces).strip() == whole.text
    assert len(pieces) > 1


def test_stop_strings_cut_the_answer(pipe):
    picture = image(700, 400, 21)
    full = pipe.chat("Describe the image.", images=picture, generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    stop = full.text[5:8]
    cut = pipe.chat("Describe the image.", images=picture, generation=GenerationConfig(max_new_tokens=NEW_TOKENS, stop=(stop,)))
    assert cut.finish_reason == "stop_string"
    assert cut.text == full.text[: full.text.find(stop)].strip()
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


# --- bad input and bad bundles ------------------------------------------------------------------------------


def test_prompt_over_the_context_fails_before_any_work(pipe):
    words = " ".join(["word"] * 5000)
    with pytest.raises(InputError, match=r"the prompt is \d+ tokens, over the model's context of 4096"):
        pipe.chat(words)


def test_bundle_of_another_schema_version_is_refused(bundle_fp32, tmp_path):
    other = shutil.copytree(bundle_fp32, tmp_path / "old")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["schema_version"] = 0
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle schema version 0 is not supported"):
        Pipeline.from_bundle(other)


def test_bundle_missing_a_graph_is_refused(bundle_fp32, tmp_path):
    other = shutil.copytree(bundle_fp32, tmp_path / "partial")
    (other / "projector.onnx").unlink()
    with pytest.raises(BundleError, match="projector.onnx is missing"):
        Pipeline.from_bundle(other)


def test_runtime_imports_neither_torch_nor_transformers(bundle_fp32):
    """In a subprocess where only the runtime extra's packages import, a whole chat runs."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        ALLOWED_THIRD_PARTY = {{"numpy", "PIL", "tokenizers", "onnxruntime"}}
        BLOCKED = {{"torch", "transformers", "onnx", "onnxscript", "safetensors", "huggingface_hub", "openvino", "tensorrt", "av"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from PIL import Image
        import numpy as np
        from vl_export.runtime import Pipeline, GenerationConfig
        pipe = Pipeline.from_bundle({str(bundle_fp32)!r})
        image = Image.fromarray(np.zeros((500, 700, 3), np.uint8))
        result = pipe.chat("What is this?", images=image, generation=GenerationConfig(max_new_tokens=4))
        heavy = [m for m in ("torch", "transformers", "onnx") if m in sys.modules]
        print(len(result.token_ids), heavy)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4 []"


def test_each_graph_can_run_on_its_own_backend(pipe, bundle_fp32, tmp_path):
    """vision on OpenVINO (f32), the decoder on ONNX Runtime: the same greedy tokens as all on ONNX Runtime."""
    pytest.importorskip("openvino")
    mixed = Pipeline.from_bundle(bundle_fp32, backend="vision=openvino,decoder=onnxruntime", precision="f32",
                                 threads=2, cache_dir=str(tmp_path / "ov"))
    assert mixed.backend.name == "vision_encoder=openvino,projector=openvino,decoder=onnxruntime"
    assert {r: b.name for r, b in mixed.backends.items()} == {
        "vision_encoder": "openvino", "projector": "openvino", "decoder": "onnxruntime"}
    picture = image(900, 450, 30)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)
    assert mixed.chat("Describe.", images=picture, generation=config).token_ids == \
        pipe.chat("Describe.", images=picture, generation=config).token_ids
    with pytest.raises(Exception, match="no chosen backend takes the option 'precision'"):
        Pipeline.from_bundle(bundle_fp32, precision="f32")


def test_onnxruntime_decoder_spins_vision_and_servers_sleep(bundle_fp32):
    """A decode step is hundreds of small parallel parts (spinning saves ~5 ms a step); the vision encoder's big ones
    do not care, and a server runs vision beside the decoder, where spinning pools steal each other's cores."""
    from vl_export.errors import BackendUnavailableError
    from vl_export.runtime.backends import serving_options

    def spinning(session) -> str:
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: ONNX Runtime's default, which spins
            return "default"

    def pools(**options) -> tuple[str, str]:
        pipe = Pipeline.from_bundle(bundle_fp32, threads=2, **options)
        return spinning(pipe.decoder.session), spinning(pipe.vision.session)

    assert pools() == ("default", "0")
    assert pools(spin=1) == ("default", "default")
    assert pools(spin=0) == ("0", "0")
    assert serving_options("onnxruntime", {"threads": 2}) == {"threads": 2, "spin": 0}
    assert serving_options("vision=openvino,decoder=onnxruntime", {"spin": 1}) == {"spin": 1}  # the caller's choice
    assert serving_options("openvino", {"threads": 2}) == {"threads": 2}  # no ONNX Runtime: no option it would refuse
    with pytest.raises(BackendUnavailableError, match="spin takes 0, 1 or decoder"):
        Pipeline.from_bundle(bundle_fp32, spin=2)


def test_cpu_vision_runs_two_tiles_at_a_time_unless_asked(bundle_fp32):
    """On a CPU a vision run's activations grow with its tiles and its time per tile does not (README #16), so the
    pipeline sends 2 tiles a run by default; max_tiles_per_run overrides it; the embeddings do not depend on it."""
    pixels = np.random.default_rng(5).standard_normal((5, 3, 448, 448)).astype(np.float32)
    outputs = {}
    for per_run, want_runs in ((None, [2, 2, 1]), (8, [5])):
        pipe = Pipeline.from_bundle(bundle_fp32, threads=2, max_tiles_per_run=per_run)
        runs, run = [], pipe.vision.run
        pipe.vision.run = lambda feeds, run=run: runs.append(len(feeds["pixel_values"])) or run(feeds)
        outputs[per_run] = pipe.encode_images(pixels)
        assert runs == want_runs
    np.testing.assert_allclose(outputs[None], outputs[8], rtol=0, atol=1e-4 * np.abs(outputs[8]).max())
