"""OpenVINO backend: the same bundles as ONNX Runtime, equal to PyTorch at f32, close at bf16, INT8 that verifies."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import reference_impl as ref
from cpu_features import openvino_has_bf16
from vl_export.errors import BackendUnavailableError
from vl_export.runtime import GenerationConfig, Pipeline

pytest.importorskip("openvino")

from vl_export.runtime.backends import ov_cache  # noqa: E402  (after the skip: it is only useful with openvino)

FP32_RTOL = 1e-4  # max abs diff <= 1e-4 x the reference's largest magnitude, as ONNX Runtime is held to
BF16_MIN_COSINE = 0.999
NEW_TOKENS = 32



def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def image(width, height, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ov_f32(bundle_fp32):
    return Pipeline.from_bundle(bundle_fp32, backend="openvino", threads=2, precision="f32")


@pytest.fixture(scope="module")
def ov_f32_shared(bundle_fp32):
    """The decoder's cache in shared host buffers (stateful=0) instead of the default plugin variables."""
    return Pipeline.from_bundle(bundle_fp32, backend="openvino", threads=2, precision="f32", stateful=0)


@pytest.fixture(scope="module")
def ov_bf16(bundle_fp32):
    return Pipeline.from_bundle(bundle_fp32, backend="openvino", threads=2, precision="bf16")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["original"])


def pytorch_vision(model, px):
    with torch.no_grad():
        t = torch.from_numpy(px)
        return (model.model.vision_tower(pixel_values=t).last_hidden_state.numpy(),
                model.model.get_image_features(pixel_values=t).pooler_output.numpy())


def pytorch_prefill(tiny, batch=2, seq=9, seed=0):
    """Left-padded prefill inputs (row 1 padded by 3) and PyTorch's logits and cache for them."""
    hidden = tiny["spec"].text.hidden_size
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, :3] = 0
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
    embeds = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    with torch.no_grad():
        out = tiny["model"](inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(positions), use_cache=True)
    return embeds, mask, positions, out


# --- f32: the ONNX Runtime tolerances ------------------------------------------------------------------------


def test_vision_and_projector_match_pytorch_f32(tiny, ov_f32):
    px = np.random.default_rng(3).standard_normal((3, 3, 448, 448)).astype(np.float32)
    want_features, want_embeds = pytorch_vision(tiny["model"], px)
    features = ov_f32.vision.run({"pixel_values": px})["vision_features"]
    embeds = ov_f32.projector.run({"vision_features": features})["image_embeds"]
    assert features.shape == want_features.shape and embeds.shape == want_embeds.shape
    assert rel_err(features, want_features) <= FP32_RTOL
    assert rel_err(embeds, want_embeds) <= FP32_RTOL


def test_decoder_prefill_decode_and_cache_match_pytorch_f32(tiny, ov_f32):
    embeds, mask, positions, out = pytorch_prefill(tiny)
    decoder, valid = ov_f32.decoder, mask.astype(bool)
    decoder.reset(2, 12)
    every = np.broadcast_to(np.arange(9), (2, 9))
    logits = decoder.forward(embeds, mask, positions, every)
    assert rel_err(logits[valid], out.logits.numpy()[valid]) <= FP32_RTOL
    past, pos = out.past_key_values, positions[:, -1:]
    for step in range(3):  # the cache grows in place across steps; compare logits and every cached tensor
        token = np.random.default_rng(10 + step).standard_normal((2, 1, embeds.shape[-1])).astype(np.float32)
        mask, pos = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1), pos + 1
        logits = decoder.forward(token, mask, pos, np.zeros((2, 1), np.int64))
        with torch.no_grad():
            out = tiny["model"](inputs_embeds=torch.from_numpy(token), attention_mask=torch.from_numpy(mask),
                                position_ids=torch.from_numpy(pos), past_key_values=past, use_cache=True)
        past = out.past_key_values
        assert rel_err(logits, out.logits.numpy()) <= FP32_RTOL, f"step {step}"
    want_cache = [t.numpy() for layer in past.layers for t in (layer.keys, layer.values)]
    got_cache = decoder.cache()
    assert decoder.past_len == 12 and len(got_cache) == len(want_cache)
    for got, want in zip(got_cache, want_cache):  # row 1's padding positions are garbage in both
        assert got.shape == want.shape
        assert rel_err(got[:, :, 3:], want[:, :, 3:]) <= FP32_RTOL


def test_greedy_tokens_equal_pytorch_f32(tiny, ov_f32, hf_tokenizer):
    stop = {tiny["specials"]["<|im_end|>"], tiny["specials"]["<|endoftext|>"]}
    pad = tiny["specials"]["<|endoftext|>"]
    picture = image(1000, 600, 11)
    result = ov_f32.chat("Describe the image.", images=picture, generation=GenerationConfig(max_new_tokens=NEW_TOKENS))
    query, _ = ref.chat_query("Describe the image.", [len(ref.load_image(picture))])
    want = ref.hf_generate(tiny["model"], hf_tokenizer, [query], ref.load_image(picture), NEW_TOKENS, stop, pad)[0]
    assert len(want) == NEW_TOKENS and result.token_ids == want
    # A left-padded batch of two with different tile counts reuses the same request and buffers.
    pictures, questions = [image(1600, 500, 15), image(448, 448, 16)], ["What is shown?", "Describe it in detail please."]
    counts = [len(ref.load_image(p)) for p in pictures]
    results = ov_f32.batch_chat(questions, pictures, GenerationConfig(max_new_tokens=NEW_TOKENS))
    px = torch.cat([ref.load_image(p) for p in pictures])
    assert [r.token_ids for r in results] == ref.hf_generate(tiny["model"], hf_tokenizer, ref.batch_queries(questions, counts),
                                                             px, NEW_TOKENS, stop, pad)


def test_stateful_decoder_equals_shared_buffers_f32(tiny, ov_f32, ov_f32_shared):
    """The same graph with its cache kept in the plugin (MakeStateful) or passed in and out in shared buffers: equal
    logits and caches through a left-padded prefill, decode steps, and the engine's relayout (one row resumed alone
    from a host copy, as a request that stays when its neighbour leaves)."""
    from vl_export.runtime.backends.ov import OvDecoder, OvStatefulDecoder

    stateful, shared = ov_f32.decoder, ov_f32_shared.decoder
    assert isinstance(stateful, OvStatefulDecoder) and isinstance(shared, OvDecoder)
    embeds, mask, positions, out = pytorch_prefill(tiny, seed=2)
    want_scale = float(np.abs(out.logits.numpy()).max())
    every = np.broadcast_to(np.arange(9), (2, 9))
    got = []
    for decoder in (stateful, shared):
        decoder.reset(2, 16)
        got.append(decoder.forward(embeds, mask, positions, every))
    assert np.abs(got[0] - got[1]).max() <= FP32_RTOL * want_scale
    pos = positions[:, -1:]
    for step in range(3):
        token = np.random.default_rng(20 + step).standard_normal((2, 1, embeds.shape[-1])).astype(np.float32)
        mask, pos = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1), pos + 1
        got = [d.forward(token, mask, pos, np.zeros((2, 1), np.int64)) for d in (stateful, shared)]
        assert np.abs(got[0] - got[1]).max() <= FP32_RTOL * want_scale, f"step {step}"
    caches = [d.cache() for d in (stateful, shared)]
    assert stateful.past_len == shared.past_len == 12 and len(caches[0]) == len(caches[1])
    for a, b in zip(*caches):
        assert a.shape == b.shape == (2, a.shape[1], 12, a.shape[3])
        assert np.abs(a[:, :, 3:] - b[:, :, 3:]).max() <= FP32_RTOL * max(float(np.abs(b).max()), 1.0)
    row = [c[1:2].copy() for c in caches[1]]  # row 1 alone, from the shared decoder's copy into both
    token = np.random.default_rng(30).standard_normal((1, 1, embeds.shape[-1])).astype(np.float32)
    got = []
    for decoder in (stateful, shared):
        decoder.load_cache(row, 20)
        assert decoder.batch == 1 and decoder.past_len == 12
        got.append(decoder.forward(token, np.concatenate([mask[1:], np.ones((1, 1), np.int64)], axis=1), pos[1:] + 1,
                                   np.zeros((1, 1), np.int64)))
    assert np.abs(got[0] - got[1]).max() <= FP32_RTOL * want_scale
    assert [c.shape[2] for c in stateful.cache()] == [13] * len(row)


# --- bf16: close, not equal ------------------------------------------------------------------------------------


@pytest.mark.skipif(not openvino_has_bf16(), reason="this CPU has no bf16 instructions: OpenVINO refuses precision=bf16 "
                    "here (as it should: no silent fallback), so there is nothing to compare")
def test_bf16_stays_close_to_pytorch(tiny, ov_bf16):
    assert ov_bf16.backend.describe()["precision"] == "bf16"
    px = np.random.default_rng(7).standard_normal((2, 3, 448, 448)).astype(np.float32)
    want_features, want_embeds = pytorch_vision(tiny["model"], px)
    features = ov_bf16.vision.run({"pixel_values": px})["vision_features"]
    assert cosine(features, want_features) >= BF16_MIN_COSINE
    assert cosine(ov_bf16.projector.run({"vision_features": want_features})["image_embeds"], want_embeds) >= BF16_MIN_COSINE
    embeds, mask, positions, out = pytorch_prefill(tiny, seed=1)
    ov_bf16.decoder.reset(2, 9)
    logits = ov_bf16.decoder.forward(embeds, mask, positions, np.broadcast_to(np.arange(9), (2, 9)))
    valid = mask.astype(bool)
    assert cosine(logits[valid], out.logits.numpy()[valid]) >= BF16_MIN_COSINE


# --- INT8: the portable Q/DQ graphs, really run in int8 ------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_int8(tiny, tmp_path_factory):
    from vl_export.export.build import BuildConfig, build_bundle

    out = tmp_path_factory.mktemp("ov-int8") / "bundle"
    build_bundle(str(tiny["original"]), out, BuildConfig(precision="int8", verify=False), progress=lambda _: None)
    return out


def test_int8_bundle_verifies_on_openvino(tiny, bundle_int8):
    from vl_export.export.verify import default_images, verify_bundle

    report = verify_bundle(bundle_int8, str(tiny["original"]), images=default_images()[:1], prompts=["Describe the image."],
                           backend="openvino", progress=lambda _: None, threads=2)
    assert report["precision"] == "int8" and report["backend"]["backend"] == "openvino"
    assert report["passed"], [r for r in report["stages"] if not r["pass"]]


def test_int8_graphs_run_int8_kernels(tiny, bundle_int8):
    pipe = Pipeline.from_bundle(bundle_int8, backend="openvino", threads=2)
    files = {role: pipe.manifest.graph(role, "openvino").file for role in ("vision_encoder", "projector", "decoder")}
    assert files == {"vision_encoder": "vision_encoder.int8.onnx", "projector": "projector.int8.onnx",
                     "decoder": "decoder.int8.onnx"}  # the ORT-only variants are not OpenVINO's

    def matmuls(session):
        """(runtime precision, activation type, weight type) of each compiled matmul with weights."""
        out = []
        for op in session.compiled.get_runtime_model().get_ordered_ops():
            info = {k: v.astype(str) for k, v in op.get_rt_info().items()}
            if info["layerType"].startswith("FullyConnected"):
                out.append((info["runtimePrecision"], *(op.input(i).get_element_type().get_type_name() for i in (0, 1))))
        return out

    # W8A8: every vision and projector matmul multiplies int8 activations by int8 weights (not dequantized floats).
    vision = matmuls(pipe.vision)
    assert len(vision) == 6 * tiny["spec"].vision.num_layers and set(vision) == {("i8", "i8", "i8")}
    assert set(matmuls(pipe.projector)) == {("i8", "i8", "i8")}
    # Weight-only: each DequantizeLinear is folded into a compressed-weight matmul: int8 weights, float activations.
    decoder = matmuls(pipe.decoder)
    assert len(decoder) == 7 * tiny["spec"].text.num_layers + 1
    assert all(weights == "i8" and activations in ("f32", "bf16") for _, activations, weights in decoder)


# --- the IR cache ----------------------------------------------------------------------------------------------


def test_ir_cache_is_beside_the_graphs_keyed_and_exact(bundle_fp32):
    import openvino

    entry = Pipeline.from_bundle(bundle_fp32, backend="openvino", precision="f32").manifest.graph("projector")
    name = ov_cache.ir_name(bundle_fp32, entry, openvino.get_version())
    assert entry.sha256[:16] in name and ov_cache.version_tag(openvino.get_version()) in name
    assert (bundle_fp32 / "openvino" / name).is_file() and (bundle_fp32 / "openvino" / name).with_suffix(".bin").is_file()
    # The cached IR keeps fp32 weights: it gives the same numbers as compiling the ONNX with no cache at all.
    features = np.random.default_rng(0).standard_normal((1, 1025, 32)).astype(np.float32)
    cached = Pipeline.from_bundle(bundle_fp32, backend="openvino", precision="f32").projector
    uncached = Pipeline.from_bundle(bundle_fp32, backend="openvino", precision="f32", cache_dir="off").projector
    np.testing.assert_array_equal(cached.run({"vision_features": features})["image_embeds"],
                                  uncached.run({"vision_features": features})["image_embeds"])


def test_read_only_bundle_is_never_written(bundle_fp32, tmp_path, monkeypatch):
    import shutil

    bundle = tmp_path / "ro"
    shutil.copytree(bundle_fp32, bundle, ignore=shutil.ignore_patterns("openvino"))
    before = sorted(p.name for p in bundle.iterdir())
    real_access = ov_cache.os.access
    # Tests run as root, for whom chmod does not stop writes: the check the backend makes is what is simulated.
    monkeypatch.setattr(ov_cache.os, "access", lambda p, mode: False if str(p).startswith(str(bundle)) else real_access(p, mode))
    monkeypatch.setenv("VL_EXPORT_CACHE", str(tmp_path / "user-cache"))
    pipe = Pipeline.from_bundle(bundle, backend="openvino", precision="f32")
    assert sorted(p.name for p in bundle.iterdir()) == before
    assert pipe.backend.describe()["ir_cache"] == str(tmp_path / "user-cache" / "openvino")
    assert len(list((tmp_path / "user-cache" / "openvino").glob("*.xml"))) == 3


def test_mapped_weight_pages_are_given_back_after_the_first_run(bundle_fp32, tmp_path):
    """Regression: OpenVINO copies the weights into its own layouts at the first run and the mapped IR pages it read
    stayed resident, doubling the weights in RSS (+0.77 GiB on the 1B INT8 bundle)."""
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from pathlib import Path
        from vl_export.runtime import GenerationConfig, Pipeline
        from vl_export.runtime.backends.ov_pages import release_pages

        def resident_kib(files):
            names, total, counting = {{str(Path(f).resolve()) for f in files}}, 0, False
            for line in open("/proc/self/smaps"):
                if "-" in line.split(" ", 1)[0]:
                    counting = line.split()[-1] in names
                elif counting and line.startswith("Rss:"):
                    total += int(line.split()[1])
            return total

        pipe = Pipeline.from_bundle({str(bundle_fp32)!r}, backend="openvino", precision="f32", cache_dir={str(tmp_path)!r})
        vision = pipe.vision
        files, vision.weight_files = vision.weight_files, []  # hold the release back, to see what it does
        px = np.random.default_rng(0).standard_normal((1, 3, 448, 448)).astype(np.float32)
        first = vision.run({{"pixel_values": px}})["vision_features"]
        held = resident_kib(files)
        release_pages(files)
        released = resident_kib(files)
        again = vision.run({{"pixel_values": px}})["vision_features"]  # re-reads nothing it needs, or reads it back
        decoder_files = pipe.decoder.weight_files
        pipe.chat("Hi", generation=GenerationConfig(max_new_tokens=2))  # the decoder releases its own at its first run
        print(json.dumps([held, released, resident_kib(decoder_files), bool(np.array_equal(first, again)), str(files[0])]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    held, released, decoder_left, same, path = json.loads(done.stdout.strip().splitlines()[-1])
    assert path.endswith(".bin") and path.startswith(str(tmp_path))
    assert held > 0 and released == 0 and decoder_left == 0 and same


# --- bad input -----------------------------------------------------------------------------------------------


def test_missing_openvino_is_one_clear_line(bundle_fp32):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["openvino"] = None  # as if it were not installed
        from vl_export.cli import main
        code = main(["run", "--bundle", {str(bundle_fp32)!r}, "--prompt", "Hi", "--backend", "openvino"])
        print(code, "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"]
    assert done.stderr.strip() == ("vl-export: error: the openvino backend needs OpenVINO: "
                                   "pip install 'vl-export[openvino]'")


@pytest.mark.parametrize("options, message", [
    ({"device": "npu7"}, "OpenVINO cannot use device 'npu7' here (available: CPU"),
    ({"precision": "fp8"}, "unknown OpenVINO precision 'fp8' (choose from f32, bf16)"),
    ({"hint": "fastest"}, "unknown OpenVINO hint 'fastest'"),
    ({"stateful": "maybe"}, "OpenVINO option stateful='maybe' is not a switch (use 1 or 0)"),
])
def test_bad_options_are_clear_errors(bundle_fp32, options, message):
    with pytest.raises(BackendUnavailableError) as error:
        Pipeline.from_bundle(bundle_fp32, backend="openvino", **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_options_reach_the_openvino_backend(bundle_fp32, capsys):
    from vl_export.cli import main

    base = ["run", "--bundle", str(bundle_fp32), "--prompt", "Hi", "--max-new-tokens", "2", "--backend", "openvino"]
    assert main([*base, "--option", "precision=f32", "--option", "hint=latency", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) >= 1
    assert main([*base, "--option", "precision=fp8"]) == 2
    assert "unknown OpenVINO precision 'fp8'" in capsys.readouterr().err
    assert main([*base, "--option", "precision"]) == 2
    assert capsys.readouterr().err.strip() == "vl-export: error: backend option 'precision' is not key=value"


def test_runtime_on_openvino_imports_neither_torch_nor_transformers(bundle_fp32):
    script = textwrap.dedent(f"""
        import json, sys
        from vl_export.runtime import GenerationConfig, Pipeline
        pipe = Pipeline.from_bundle({str(bundle_fp32)!r}, backend="ov", threads=2)
        result = pipe.chat("Hi", generation=GenerationConfig(max_new_tokens=4))
        print(json.dumps([len(result.token_ids), "torch" in sys.modules, "transformers" in sys.modules]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [4, False, False], done.stderr[-2000:]
