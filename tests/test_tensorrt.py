"""TensorRT: profiles, engines.json refusals, buffer planning and session cache logic on CPU; real engines on a GPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from trt_fakes import FakeCuda, FakeDecoderEngine, FakeProjectorEngine, fake_tensorrt
from vl_export.engines import ENGINES_DIR, EngineRecord, Engines, Profile, Target, file_sha256, select_profile
from vl_export.errors import BackendUnavailableError, BundleError, InputError, VlExportError
from vl_export.export import trt_steps
from vl_export.export.onnx_export import graph_io
from vl_export.export.trt_build import build_engines, initial_timing_cache
from vl_export.export.trt_profiles import BuildOptions, decoder_profiles, graph_profiles, resolve_sizes
from vl_export.manifest import GraphEntry, Manifest, Preprocessing
from vl_export.runtime.backends import cuda_rt
from vl_export.runtime.backends.trt import Bindings, TensorRTBackend, TrtDecoder, TrtGraph
from vl_export.runtime.backends.trt_plan import (
    axis_sizes,
    grown_bytes,
    kv_bytes,
    numpy_dtype,
    resolve_shape,
    tensor_bytes,
)
from vl_export.spec import ModelSpec, TextSpec, VisionSpec

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "TensorRT is not installable on this machine: its wheels fetch from a host this network does not reach, " \
         "and there is no NVIDIA GPU"

# InternVL2.5-1B's dimensions (its config.json), so the profile numbers below are the real model's.
SPEC_1B = ModelSpec(
    layout="original",
    vision=VisionSpec(1024, 4096, 24, 16, 448, 14, 3, 1e-6, True),
    text=TextSpec(896, 4864, 24, 14, 2, 64, 1e-6, 1e6, 32768, 151674, False),
    downsample_ratio=0.5,
    template="internvl2_5",
    use_thumbnail=True,
    min_dynamic_patch=1,
    max_dynamic_patch=12,
    dynamic_image_size=True,
)
# A toy decoder/projector for the fake-GPU session tests: 2 layers, 2 KV heads of 4, hidden 8, vocab 11.
SPEC_TOY = dataclasses.replace(
    SPEC_1B,
    vision=VisionSpec(16, 32, 1, 2, 448, 14, 3, 1e-6, True),
    text=TextSpec(8, 16, 2, 4, 2, 4, 1e-6, 1e6, 64, 11, False),
)


def entry(role: str, spec: ModelSpec = SPEC_1B, precision: str = "fp32") -> GraphEntry:
    inputs, outputs = graph_io(role, spec, precision)
    return GraphEntry(role, f"{role}.onnx", precision, inputs, outputs, sha256="ab" * 32)


def manifest(spec: ModelSpec = SPEC_1B, use_thumbnail: bool = True) -> Manifest:
    return Manifest(
        model=spec,
        special_tokens={},
        system_message="",
        preprocessing=Preprocessing(448, 1, spec.max_dynamic_patch, use_thumbnail),
        graphs=[entry(r, spec) for r in ("vision_encoder", "projector", "decoder")],
        embed_tokens={},
        max_context=spec.text.max_position_embeddings,
    )


# ---- optimization profiles ------------------------------------------------------------------------------------------


def test_default_sizes_of_internvl2_5_1b_follow_the_manifest():
    sizes = resolve_sizes(manifest(), BuildOptions())
    assert (sizes.max_tiles, sizes.opt_tiles, sizes.max_batch, sizes.max_context) == (13, 13, 1, 32768)
    assert sizes.prefill_opt_seq == 13 * 256 + 128 == 3456  # one photo's tiles of image tokens, plus its question
    assert sizes.decode_opt_past == 3456


def test_without_thumbnail_a_vision_run_holds_max_tiles():
    assert resolve_sizes(manifest(use_thumbnail=False), BuildOptions()).max_tiles == 12


def test_vision_profile_shapes():
    [profile] = graph_profiles("vision_encoder", resolve_sizes(manifest(), BuildOptions(opt_tiles=5)), BuildOptions())
    shapes = profile.shapes(entry("vision_encoder").inputs)
    assert shapes == {"pixel_values": ((1, 3, 448, 448), (5, 3, 448, 448), (13, 3, 448, 448))}
    [profile] = graph_profiles("projector", resolve_sizes(manifest(), BuildOptions(max_tiles=26)), BuildOptions())
    assert profile.shapes(entry("projector").inputs) == {
        "vision_features": ((1, 1025, 1024), (13, 1025, 1024), (26, 1025, 1024))
    }


def test_decoder_has_a_prefill_and_a_decode_profile():
    sizes = resolve_sizes(manifest(), BuildOptions(max_batch=4, max_context=4096))
    prefill, decode = decoder_profiles(sizes)
    shapes = prefill.shapes(entry("decoder").inputs)
    assert shapes["inputs_embeds"] == ((1, 1, 896), (1, 3456, 896), (4, 4096, 896))
    assert shapes["attention_mask"] == ((1, 1), (1, 3456), (4, 4096))
    assert shapes["logits_positions"] == ((1, 1), (1, 1), (4, 4096))
    assert shapes["past_key_values.23.value"] == ((1, 2, 0, 64), (1, 2, 0, 64), (4, 2, 4095, 64))
    shapes = decode.shapes(entry("decoder").inputs)
    assert shapes["inputs_embeds"] == ((1, 1, 896), (1, 1, 896), (4, 1, 896))
    assert shapes["position_ids"] == ((1, 1), (1, 1), (4, 1))
    assert shapes["attention_mask"] == ((1, 1), (1, 3457), (4, 4096))
    assert shapes["past_key_values.0.key"] == ((1, 2, 0, 64), (1, 2, 3456, 64), (4, 2, 4095, 64))
    assert len(shapes) == 4 + 2 * 24


def test_a_small_context_cap_clamps_the_opt_shapes():
    sizes = resolve_sizes(manifest(), BuildOptions(max_context=2048))
    assert (sizes.prefill_opt_seq, sizes.decode_opt_past) == (2048, 2047)
    prefill, decode = decoder_profiles(sizes)
    assert prefill.axes["seq"] == (1, 2048, 2048) and decode.axes["total"] == (1, 2048, 2048)


def test_one_decoder_profile_when_asked():
    sizes = resolve_sizes(manifest(), BuildOptions())
    [profile] = graph_profiles("decoder", sizes, BuildOptions(split_decoder_profiles=False))
    assert profile.name == "prefill" and profile.axes["seq"] == (1, 3456, 32768)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_context=40000), "max_context 40000 is more than the model's 32768 positions"),
        (dict(opt_tiles=14), "opt_tiles 14 is more than max_tiles 13"),
    ],
)
def test_sizes_refuse_impossible_options(options, message):
    with pytest.raises(VlExportError, match=message):
        resolve_sizes(manifest(), BuildOptions(**options))


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(max_batch=0), "max_batch must be at least 1, got 0"), (dict(optimization_level=6), "must be 0..5, got 6")],
)
def test_build_options_are_checked(options, message):
    with pytest.raises(VlExportError, match=message):
        BuildOptions(**options)


def test_decode_steps_pick_the_decode_profile_and_prompts_the_prefill_one():
    profiles = decoder_profiles(resolve_sizes(manifest(), BuildOptions(max_context=4096)))
    step = {"batch": 1, "seq": 1, "past": 700, "total": 701, "num_logits": 1}
    prompt = {"batch": 1, "seq": 700, "past": 0, "total": 700, "num_logits": 1}
    assert select_profile(profiles, step, "decoder") == 1
    assert select_profile(profiles, prompt, "decoder") == 0
    assert select_profile(profiles[:1], step, "decoder") == 0


def test_a_request_outside_every_profile_says_which_axis():
    profiles = decoder_profiles(resolve_sizes(manifest(), BuildOptions(max_context=4096)))
    too_long = {"batch": 1, "seq": 5000, "past": 0, "total": 5000, "num_logits": 1}
    with pytest.raises(InputError) as error:
        select_profile(profiles, too_long, "decoder")
    assert str(error.value) == (
        "the decoder engine cannot run batch 1, seq 5000, past 0, total 5000, num_logits 1 "
        "(profile prefill: seq 5000 is outside 1..4096; profile decode: seq 5000 is outside 1..1); "
        "rebuild the engines with larger limits"
    )


def test_a_profile_with_opt_outside_its_range_is_a_bug():
    with pytest.raises(ValueError, match="seq needs 0 <= min <= opt <= max, got 1, 9, 4"):
        Profile("broken", {"seq": (1, 9, 4)})


# ---- engines.json: what built the plans, and refusals ---------------------------------------------------------------

H100 = Target("11.0.0.13", "NVIDIA H100 80GB HBM3", "9.0")


def engines_for(bundle, target=H100, sha256="ab" * 32) -> Engines:
    """An engines.json (and empty plan files) as build_engines writes them."""
    sizes = resolve_sizes(manifest(), BuildOptions())
    records = {}
    for role in ("vision_encoder", "projector", "decoder"):
        profiles = tuple(graph_profiles(role, sizes, BuildOptions()))
        records[role] = EngineRecord(role, f"{role}.plan", f"{role}.onnx", sha256, profiles, 10)
    engines = Engines(target, records, BuildOptions().to_dict(), "2026-01-01T00:00:00+00:00")
    (bundle / ENGINES_DIR).mkdir(parents=True, exist_ok=True)
    for record in records.values():
        (bundle / ENGINES_DIR / record.file).write_bytes(b"plan")
    engines.save(bundle / ENGINES_DIR)
    return engines


def test_engines_json_round_trips(tmp_path):
    written = engines_for(tmp_path)
    loaded = Engines.load(tmp_path)
    assert loaded == written
    data = json.loads((tmp_path / ENGINES_DIR / "engines.json").read_text())
    assert data["tensorrt_version"] == "11.0.0.13"
    assert data["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert data["engines"]["decoder"]["profiles"][1]["axes"]["seq"] == [1, 1, 1]
    assert data["engines"]["decoder"]["onnx_sha256"] == "ab" * 32


def test_plans_load_on_the_target_that_built_them(tmp_path):
    engines_for(tmp_path)
    Engines.load(tmp_path).check_target(H100)  # no error


def test_plans_from_another_tensorrt_are_refused(tmp_path):
    engines_for(tmp_path, target=Target("10.9.0.34", H100.gpu_name, "9.0"))
    with pytest.raises(BackendUnavailableError) as error:
        Engines.load(tmp_path).check_target(H100)
    assert str(error.value) == (
        "the bundle's TensorRT engines were built with TensorRT 10.9.0.34 but this is TensorRT 11.0.0.13; "
        "rebuild them on this machine (vl-export build --backend trt)"
    )


@pytest.mark.parametrize("gpu", [("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA H200", "9.0")])
def test_plans_from_another_gpu_are_refused(tmp_path, gpu):
    engines_for(tmp_path, target=Target(H100.tensorrt_version, *gpu))
    with pytest.raises(BackendUnavailableError) as error:
        Engines.load(tmp_path).check_target(H100)
    assert str(error.value) == (
        f"the bundle's TensorRT engines were built for {gpu[0]} (compute capability {gpu[1]}) but this GPU is "
        "NVIDIA H100 80GB HBM3 (compute capability 9.0); rebuild them on this machine (vl-export build --backend trt)"
    )


def test_a_plan_built_from_an_older_onnx_is_refused(tmp_path):
    engines = engines_for(tmp_path, sha256="cd" * 32)
    with pytest.raises(BundleError) as error:
        engines.record_for(entry("decoder"), "ab" * 32)
    assert str(error.value) == (
        "engines/decoder.plan was built from decoder.onnx (sha256 cdcdcdcdcdcd) but the bundle's decoder graph is now "
        "decoder.onnx (sha256 abababababab); rebuild them on this machine (vl-export build --backend trt)"
    )
    assert engines.record_for(entry("decoder"), "cd" * 32).file == "decoder.plan"


def test_missing_or_foreign_engines_are_bundle_errors(tmp_path):
    with pytest.raises(BundleError, match="has no TensorRT engines"):
        Engines.load(tmp_path)
    engines_for(tmp_path)
    (tmp_path / ENGINES_DIR / "projector.plan").unlink()
    with pytest.raises(BundleError, match="is incomplete: engines/projector.plan is missing"):
        Engines.load(tmp_path)
    path = tmp_path / ENGINES_DIR / "engines.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 9}))
    with pytest.raises(BundleError, match="has schema version 9; this vl-export reads version 1"):
        Engines.load(tmp_path)


# ---- timing cache ---------------------------------------------------------------------------------------------------


def test_timing_cache_is_reused_only_for_the_same_target(tmp_path):
    assert initial_timing_cache(tmp_path, BuildOptions(), H100) == (b"", "empty")
    engines_for(tmp_path)
    (tmp_path / ENGINES_DIR / "timing.cache").write_bytes(b"tactics")
    assert initial_timing_cache(tmp_path, BuildOptions(), H100) == (b"tactics", "engines/timing.cache")
    other = Target(H100.tensorrt_version, "NVIDIA L4", "8.9")
    assert initial_timing_cache(tmp_path, BuildOptions(), other) == (b"", "empty")


def test_an_explicit_timing_cache_is_read_and_written_whole(tmp_path):
    path = tmp_path / "caches" / "h100.cache"
    assert initial_timing_cache(tmp_path, BuildOptions(timing_cache=path), H100)[0] == b""
    trt_steps.write_file_atomically(path, b"\x01\x02tactics")
    assert initial_timing_cache(tmp_path, BuildOptions(timing_cache=path), H100)[0] == b"\x01\x02tactics"
    assert [p.name for p in path.parent.iterdir()] == ["h100.cache"]  # no temporary file left behind


def fake_trt(version: str, **flags) -> SimpleNamespace:
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(**flags))


def test_networks_are_strongly_typed_by_flag_on_tensorrt_10_and_by_default_on_11():
    assert trt_steps.network_flags(fake_trt("10.9.0", STRONGLY_TYPED=1)) == 2
    assert trt_steps.network_flags(fake_trt("11.0.0", STRONGLY_TYPED=1)) == 0
    with pytest.raises(VlExportError, match="has no strongly typed networks"):
        trt_steps.network_flags(fake_trt("10.0.0"))


def test_the_network_must_take_the_manifests_inputs():
    trt_steps.check_network_inputs(["pixel_values"], entry("vision_encoder"))
    with pytest.raises(BundleError, match=r"takes inputs \['images'\] but the manifest says \['pixel_values'\]"):
        trt_steps.check_network_inputs(["images"], entry("vision_encoder"))


class FakeConfig:
    """IBuilderConfig as far as configure() uses it; set_flag is absent, as precision flags are in TensorRT 11."""

    def __init__(self, cache_matches: bool):
        self.cache_matches = cache_matches
        self.pools, self.profiles, self.cache = {}, [], None

    def set_memory_pool_limit(self, pool, nbytes):
        self.pools[pool] = nbytes

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes):
        return SimpleNamespace(data=data)

    def set_timing_cache(self, cache, ignore_mismatch: bool):
        assert ignore_mismatch is False  # a cache from another GPU must fail loudly, not be half-used
        self.cache = cache
        return self.cache_matches


def configure_decoder(options: BuildOptions, cache_matches: bool = True):
    config = FakeConfig(cache_matches)

    def create_optimization_profile():
        shapes = {}
        return SimpleNamespace(shapes=shapes, set_shape=lambda n, lo, opt, hi: shapes.__setitem__(n, (lo, opt, hi)))

    builder = SimpleNamespace(
        create_builder_config=lambda: config, create_optimization_profile=create_optimization_profile
    )
    decoder = entry("decoder")
    network = SimpleNamespace(num_inputs=len(decoder.inputs), get_input=lambda i: decoder.inputs[i])
    trt = SimpleNamespace(
        MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"), ProfilingVerbosity=SimpleNamespace(DETAILED="detailed")
    )
    profiles = decoder_profiles(resolve_sizes(manifest(), options))
    return trt_steps.configure(trt, builder, network, decoder, profiles, options, b"tactics")


def test_configure_adds_the_profiles_in_order_with_limits_and_the_timing_cache():
    options = BuildOptions(max_context=4096, workspace_bytes=8 << 30, optimization_level=2, inspect=True)
    config = configure_decoder(options)
    assert [p["inputs_embeds"] for p in config.profiles] == [
        ((1, 1, 896), (1, 3456, 896), (1, 4096, 896)),  # profile 0: prefill
        ((1, 1, 896), (1, 1, 896), (1, 1, 896)),  # profile 1: decode
    ]
    assert all(len(p) == 52 for p in config.profiles)  # every input: 4 step inputs + 48 past keys/values
    assert config.pools == {"workspace": 8 << 30}
    assert (config.builder_optimization_level, config.profiling_verbosity) == (2, "detailed")
    assert config.cache.data == b"tactics"
    with pytest.raises(VlExportError, match="the timing cache was made by another TensorRT version or GPU"):
        configure_decoder(BuildOptions(max_context=4096), cache_matches=False)


# ---- buffer planning ------------------------------------------------------------------------------------------------


def test_buffer_sizes_of_internvl2_5_1b():
    assert kv_bytes(1, 4096, 2, 64, np.float16) == 1 << 20  # one layer's keys for 4096 positions: 1 MiB
    assert kv_bytes(4, 32768, 2, 64, np.float32) == 4 * 2 * 32768 * 64 * 4 == 67_108_864
    assert tensor_bytes((1, 1, 151674), np.float32) == 606_696  # one decode step's logits
    assert tensor_bytes((13, 3, 448, 448), np.float32) == 31_309_824  # a photo's pixel_values


def test_buffers_grow_to_reusable_sizes():
    assert grown_bytes(10, 0) == 256
    assert grown_bytes(300, 256) == 512
    assert grown_bytes(606_696, 0) == 1 << 20
    assert grown_bytes((1 << 20) + 1, 1 << 20) == 2 << 20
    assert grown_bytes(500, 1 << 20) == 1 << 20  # never shrinks


def test_tensorrt_dtypes_map_to_numpy():
    assert numpy_dtype("HALF", "present.0.key") == np.float16
    assert numpy_dtype("INT64", "attention_mask") == np.int64
    with pytest.raises(BundleError, match="logits has TensorRT type BF16, which has no numpy type"):
        numpy_dtype("BF16", "logits")


def test_axis_sizes_are_read_from_a_request_and_checked():
    decoder = entry("decoder").inputs[:4]
    shapes = {
        "inputs_embeds": (2, 5, 896),
        "attention_mask": (2, 9),
        "position_ids": (2, 5),
        "logits_positions": (2, 1),
    }
    assert axis_sizes(decoder, shapes, "decoder") == {"batch": 2, "seq": 5, "total": 9, "num_logits": 1}
    with pytest.raises(InputError, match="position_ids has batch 1, another input has batch 2"):
        axis_sizes(decoder, {**shapes, "position_ids": (1, 5)}, "decoder")
    with pytest.raises(InputError, match="inputs_embeds dimension 2 is 64, the decoder graph takes 896"):
        axis_sizes(decoder, {**shapes, "inputs_embeds": (2, 5, 64)}, "decoder")
    with pytest.raises(InputError, match="the decoder graph needs inputs logits_positions"):
        axis_sizes(decoder, {k: v for k, v in shapes.items() if k != "logits_positions"}, "decoder")
    assert resolve_shape(("batch", 2, "past", 64), {"batch": 1, "past": 7}) == (1, 2, 7, 64)


# ---- sessions on a fake GPU: buffers allocated once, ping-pong KV cache, profile switches ---------------------------


def toy_decoder(max_context: int = 16, max_batch: int = 2):
    cuda = FakeCuda()
    decoder = entry("decoder", SPEC_TOY)
    sizes = resolve_sizes(manifest(SPEC_TOY), BuildOptions(max_context=max_context, max_batch=max_batch))
    profiles = decoder_profiles(sizes)
    engine = FakeDecoderEngine(decoder, profiles, cuda)
    record = EngineRecord("decoder", "decoder.plan", "decoder.onnx", "ab" * 32, tuple(profiles), 1)
    return TrtDecoder(Bindings(engine, record, decoder, cuda), decoder), cuda


def step_inputs(rng, batch: int, past: int, seq: int):
    embeds = rng.standard_normal((batch, seq, 8)).astype(np.float32)
    mask = np.ones((batch, past + seq), np.int64)
    positions = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy()
    return embeds, mask, positions, np.full((batch, 1), seq - 1, np.int64)


def expected_cache(all_embeds: np.ndarray) -> list[np.ndarray]:
    """What FakeDecoderEngine's cache holds after seeing `all_embeds` (b, total, hidden)."""
    heads = np.arange(2)[None, :, None, None]
    return [all_embeds[:, None, :, :4] + 10 * i + heads for i in range(4)]  # 2 layers x key, value


def test_decoder_cache_ping_pongs_and_switches_profile_only_between_prefill_and_decode():
    decoder, cuda = toy_decoder()
    rng = np.random.default_rng(0)
    decoder.reset(batch=2, capacity=12)
    allocated = cuda.mallocs
    seen = []
    for past, seq in ((0, 5), (5, 1), (6, 1), (7, 1)):
        embeds, mask, positions, last = step_inputs(rng, 2, past, seq)
        logits = decoder.forward(embeds, mask, positions, last)
        seen.append(embeds)
        assert logits.shape == (2, 1, 11)
        np.testing.assert_allclose(logits[:, 0, :], embeds[:, -1, :1] * np.arange(1, 12) + past, rtol=1e-6)
    assert decoder.past_len == 8
    assert decoder.io.context.switches == [1]  # prefill ran on profile 0 (a new context's), decode steps on 1
    cache = decoder.cache()
    assert [c.shape for c in cache] == [(2, 2, 8, 4)] * 4
    for got, want in zip(cache, expected_cache(np.concatenate(seen, axis=1))):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # Step inputs grew only once (prefill is the largest); the four KV pairs were allocated by reset alone.
    assert cuda.mallocs - allocated == 5  # 4 step inputs + logits

    # A second, shorter request reuses every buffer and starts from an empty cache.
    before = cuda.mallocs
    decoder.reset(batch=1, capacity=6)
    embeds, mask, positions, last = step_inputs(rng, 1, 0, 3)
    decoder.forward(embeds, mask, positions, last)
    assert cuda.mallocs == before
    np.testing.assert_allclose(decoder.cache()[3], expected_cache(embeds)[3], rtol=1e-6)
    assert decoder.io.context.switches == [1, 0]


def test_decoder_refuses_what_its_engine_or_cache_cannot_hold():
    decoder, _ = toy_decoder(max_context=16, max_batch=2)
    with pytest.raises(InputError, match="built for batch <= 2 and <= 16 positions, asked for batch 3 x 8"):
        decoder.reset(batch=3, capacity=8)
    decoder.reset(batch=1, capacity=4)
    rng = np.random.default_rng(1)
    capacity = decoder.capacity  # whole power-of-two buffers hold more than asked: 256 bytes = 8 positions
    assert capacity == 8
    with pytest.raises(RuntimeError, match=f"decoder cache holds 1x{capacity}, asked for 1x9"):
        decoder.forward(*step_inputs(rng, 1, 0, 9))
    embeds, mask, positions, last = step_inputs(rng, 1, 0, 3)
    with pytest.raises(InputError, match="attention_mask covers 4 positions, the cache and the new tokens 3"):
        decoder.forward(embeds, np.ones((1, 4), np.int64), positions, last)
    with pytest.raises(InputError, match="position_ids is int32, the decoder engine takes int64"):
        decoder.forward(embeds, mask, positions.astype(np.int32), last)


def toy_projector():
    cuda = FakeCuda()
    projector = entry("projector", SPEC_TOY)
    profiles = graph_profiles("projector", resolve_sizes(manifest(SPEC_TOY), BuildOptions(max_tiles=4)), BuildOptions())
    engine = FakeProjectorEngine(projector, profiles, cuda)
    record = EngineRecord("projector", "projector.plan", "projector.onnx", "ab" * 32, tuple(profiles), 1)
    return TrtGraph(Bindings(engine, record, projector, cuda)), cuda


def test_graph_runs_reuse_their_buffers():
    graph, cuda = toy_projector()
    rng = np.random.default_rng(2)
    features = rng.standard_normal((3, 1025, 16)).astype(np.float32)
    out = graph.run({"vision_features": features})["image_embeds"]
    assert out.shape == (3, 256, 8)
    np.testing.assert_allclose(out, 2 * features[:, :256, :8])
    allocated = cuda.mallocs
    smaller = features[:2] + 1
    np.testing.assert_allclose(graph.run({"vision_features": smaller})["image_embeds"], 2 * smaller[:, :256, :8])
    assert cuda.mallocs == allocated == 2
    with pytest.raises(InputError, match="profile tiles: tiles 5 is outside 1..4"):
        graph.run({"vision_features": np.zeros((5, 1025, 16), np.float32)})


def test_an_engine_with_other_io_than_the_manifest_is_refused():
    cuda = FakeCuda()
    projector = entry("projector", SPEC_TOY)
    renamed = dataclasses.replace(projector, outputs=(dataclasses.replace(projector.outputs[0], name="embeds"),))
    engine = FakeProjectorEngine(renamed, [Profile("tiles", {"tiles": (1, 1, 4)})], cuda)
    record = EngineRecord("projector", "projector.plan", "projector.onnx", "ab" * 32, (), 1)
    with pytest.raises(BundleError, match=r"projector.plan has IO tensors \['embeds', 'vision_features'\]"):
        Bindings(engine, record, projector, cuda)


# ---- TensorRT or a GPU missing --------------------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt imports here; the GPU tests below cover the backend")
def test_without_tensorrt_build_and_backend_say_so(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"needs TensorRT: pip install 'vl-export\[trt\]'"):
        build_engines(tmp_path / "bundle", progress=lambda _: None)
    with pytest.raises(BackendUnavailableError, match="needs TensorRT"):
        TensorRTBackend()


class FakeCudart(ModuleType):
    """cuda.bindings.runtime as seen on a machine without a GPU, or with one H100."""

    def __init__(self, devices: int):
        super().__init__("cuda.bindings.runtime")
        self.devices = devices
        self.cudaError_t = SimpleNamespace(cudaSuccess=0, cudaErrorNoDevice=100)

    def cudaGetDeviceCount(self):
        return (0, self.devices) if self.devices else (100, 0)

    def cudaGetErrorName(self, err):
        return 0, {100: b"cudaErrorNoDevice"}[err]

    def cudaSetDevice(self, device):
        return (0,)

    def cudaGetDeviceProperties(self, device):
        return 0, SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\x00", major=9, minor=0, totalGlobalMem=85 << 30)


def test_gpu_probe_reads_name_and_compute_capability():
    assert cuda_rt.probe_gpu(FakeCudart(1)) == cuda_rt.GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 85 << 30)
    with pytest.raises(BackendUnavailableError, match=r"GPU 2 was asked for but 1 GPU\(s\) are visible \(0..0\)"):
        cuda_rt.probe_gpu(FakeCudart(1), device=2)


def test_devices_are_cuda_ordinals():
    assert [cuda_rt.device_index(d) for d in (0, 3, "cuda", "cuda:1")] == [0, 3, 0, 1]
    with pytest.raises(BackendUnavailableError, match="device must be cuda or cuda:N, not 'cpu'"):
        cuda_rt.device_index("cpu")


def test_with_tensorrt_but_no_gpu_build_and_backend_say_so(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, SimpleNamespace(__version__="11.0.0.13"), devices=0)
    message = r"no CUDA GPU is visible \(cudaGetDeviceCount: cudaErrorNoDevice\); TensorRT needs an NVIDIA GPU"
    with pytest.raises(BackendUnavailableError, match=message):
        build_engines(tmp_path, progress=lambda _: None)
    with pytest.raises(BackendUnavailableError, match=message):
        TensorRTBackend()


def fake_gpu(monkeypatch, trt, devices: int = 1) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cuda.bindings", SimpleNamespace(runtime=FakeCudart(devices)))


def fake_bundle(path) -> Manifest:
    """A bundle whose files are placeholders: what build_engines reads besides the graphs TensorRT parses."""
    path.mkdir()
    m = manifest(SPEC_TOY)
    # Manifest.load checks every field (#13): the toy's special tokens and table shape, placeholders all the same.
    m.special_tokens = {t: i for i, t in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"))}
    m.embed_tokens = {"file": "embed_tokens.npy", "dtype": "float32", "shape": [11, 8]}
    for name in ("tokenizer.json", "embed_tokens.npy"):
        (path / name).write_text("")
    for i, g in enumerate(m.graphs):
        (path / g.file).write_bytes(f"onnx {i}".encode())
    m.graphs = [dataclasses.replace(g, sha256=file_sha256(path / g.file)) for g in m.graphs]
    m.save(path)
    return m


def test_build_engines_writes_plans_engines_json_and_the_manifest_link(monkeypatch, tmp_path):
    m = fake_bundle(tmp_path / "bundle")
    built: list[str] = []
    fake_gpu(monkeypatch, fake_tensorrt("11.0.0.13", {g.file: [t.name for t in g.inputs] for g in m.graphs}, built))
    cache = tmp_path / "shared.cache"
    trt_steps.write_file_atomically(cache, b"old")
    lines: list[str] = []
    result = build_engines(tmp_path / "bundle", BuildOptions(max_context=32, timing_cache=cache), lines.append)

    engines = tmp_path / "bundle" / ENGINES_DIR
    assert built == ["vision_encoder.onnx", "projector.onnx", "decoder.onnx"]
    assert (engines / "decoder.plan").read_bytes() == b"plan:decoder.onnx"
    assert sorted(p.name for p in engines.iterdir()) == [
        "decoder.plan", "engines.json", "projector.plan", "timing.cache", "vision_encoder.plan"
    ]
    assert Engines.load(tmp_path / "bundle").to_dict() == result
    assert result["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    decoder = result["engines"]["decoder"]
    assert decoder["onnx_sha256"] == file_sha256(tmp_path / "bundle" / "decoder.onnx")
    assert [p["axes"]["total"] for p in decoder["profiles"]] == [[1, 32, 32], [1, 32, 32]]
    assert result["build_options"]["max_context"] == 32
    # Each build grows the cache it was given; the last one is saved in the bundle and to the shared file.
    assert cache.read_bytes() == (engines / "timing.cache").read_bytes() == b"old+tactics+tactics+tactics"
    assert Manifest.load(tmp_path / "bundle").engines == "engines/engines.json"
    assert lines[0] == (
        "building TensorRT 11.0.0.13 engines for NVIDIA H100 80GB HBM3 (compute capability 9.0); timing cache: "
        f"{cache}"
    )
    assert [p.name for p in (tmp_path / "bundle").iterdir() if p.name.startswith(".")] == []  # no staging left


def test_build_engines_refuses_a_graph_changed_behind_the_manifest(monkeypatch, tmp_path):
    m = fake_bundle(tmp_path / "bundle")
    fake_gpu(monkeypatch, fake_tensorrt("11.0.0.13", {g.file: [t.name for t in g.inputs] for g in m.graphs}, []))
    (tmp_path / "bundle" / "projector.onnx").write_bytes(b"edited")
    with pytest.raises(BundleError, match="projector.onnx does not match the sha256 in the manifest"):
        build_engines(tmp_path / "bundle", BuildOptions(max_context=32), lambda _: None)
    assert not (tmp_path / "bundle" / ENGINES_DIR).exists()  # nothing half-built left in place


# ---- real engines (a GPU with TensorRT) -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trt_bundle(tmp_path_factory):
    """A tiny fp32 bundle with engines built for small limits (a copy: building rewrites its manifest)."""
    from vl_export.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("trt") / "bundle"
    export_bundle("random:tiny", out, progress=lambda _: None)
    build_engines(out, BuildOptions(max_batch=2, max_tiles=3, max_context=64, optimization_level=0), lambda _: None)
    return out


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
def test_engines_match_onnxruntime(trt_bundle):
    from vl_export.runtime.backends.ort import OrtBackend

    m = Manifest.load(trt_bundle)
    assert m.engines == "engines/engines.json"
    trt_backend, ort_backend = TensorRTBackend(), OrtBackend()
    rng = np.random.default_rng(3)
    feeds = {"pixel_values": rng.standard_normal((3, 3, 448, 448)).astype(np.float32)}
    for role in ("vision_encoder", "projector"):
        got = trt_backend.open_graph(trt_bundle, m.graph(role)).run(feeds)
        want = ort_backend.open_graph(trt_bundle, m.graph(role)).run(feeds)
        [name] = want
        np.testing.assert_allclose(got[name], want[name], atol=2e-3, rtol=2e-3)
        feeds = {"vision_features": want[name]}  # the projector's input
    sessions = [b.open_decoder(trt_bundle, m.graph("decoder")) for b in (trt_backend, ort_backend)]
    hidden = m.model.text.hidden_size
    for session in sessions:
        session.reset(batch=2, capacity=16)
    for past, seq in ((0, 6), (6, 1), (7, 1)):
        embeds = rng.standard_normal((2, seq, hidden)).astype(np.float32)
        mask = np.ones((2, past + seq), np.int64)
        positions = np.broadcast_to(np.arange(past, past + seq), (2, seq)).copy()
        last = np.full((2, 1), seq - 1, np.int64)
        got, want = (s.forward(embeds, mask, positions, last) for s in sessions)
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
    for got, want in zip(*(s.cache() for s in sessions)):
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
def test_real_engines_from_another_tensorrt_are_refused(trt_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(trt_bundle, bundle)
    path = bundle / ENGINES_DIR / "engines.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tensorrt_version": "10.0.0"}))
    m = Manifest.load(bundle)
    with pytest.raises(BackendUnavailableError, match="built with TensorRT 10.0.0 but this is TensorRT"):
        TensorRTBackend().open_graph(bundle, m.graph("projector"))
