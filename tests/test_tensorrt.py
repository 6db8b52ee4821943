"""TensorRT: profiles, engines.json refusals, buffer planning and session cache logic on CPU; real engines on a GPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import shutil
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from trt_fakes import (
    STRATEGIES,
    FakeCudart,
    FakeDecoderEngine,
    FakeProjectorEngine,
    FakeStream,
    fake_cuda_python,
    fake_tensorrt,
)
from vl_export.engines import ENGINES_DIR, EngineRecord, Engines, Profile, Target, file_sha256, select_profile
from vl_export.errors import BackendUnavailableError, BundleError, InputError, VlExportError
from vl_export.export import trt_steps
from vl_export.export.onnx_export import graph_io
from vl_export.export.trt_build import build_engines, initial_timing_cache
from vl_export.export.trt_profiles import (
    BuildOptions,
    context_for_memory,
    decoder_profiles,
    graph_profiles,
    resolve_sizes,
)
from vl_export.manifest import GraphEntry, Manifest, Preprocessing
from vl_export.runtime.backends import cuda_rt
from vl_export.runtime.backends.trt import Bindings, TensorRTBackend, TrtDecoder, TrtGraph
from vl_export.runtime.generate import generate
from vl_export.runtime.pipeline import Pipeline
from vl_export.runtime.sampling import GenerationConfig
from vl_export.runtime.backends.trt_plan import (
    axis_sizes,
    grown_bytes,
    kv_bytes,
    numpy_dtype,
    chunks,
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


def test_default_sizes_of_internvl2_5_1b_follow_the_manifest_and_the_pipeline():
    sizes = resolve_sizes(manifest(), BuildOptions())
    # Vision runs hold what the pipeline sends: a 13-tile photo (12 + thumbnail) runs as 8 + 5 tiles.
    assert (sizes.max_tiles, sizes.opt_tiles, sizes.max_batch, sizes.max_context) == (8, 8, 1, 32768)
    assert sizes.prefill_chunk == 4096
    assert sizes.prefill_opt_seq == 13 * 256 + 128 == 3456  # one photo's tiles of image tokens, plus its question
    assert sizes.decode_opt_past == 3456


def test_vision_profile_optimum_is_the_size_the_pipeline_runs():
    assert inspect.signature(Pipeline.from_bundle).parameters["max_tiles_per_run"].default is None  # the session's
    assert TrtGraph.tiles_per_run == 8  # the pipeline's tiles per vision run on TensorRT, which the profile is tuned for
    [profile] = graph_profiles("vision_encoder", resolve_sizes(manifest(), BuildOptions()), BuildOptions())
    assert profile.axes["tiles"] == (1, 8, 8)


def test_a_photo_smaller_than_a_run_bounds_the_vision_profile():
    small = dataclasses.replace(SPEC_1B, max_dynamic_patch=4)
    assert resolve_sizes(manifest(small), BuildOptions()).max_tiles == 5  # 4 tiles + the thumbnail
    assert resolve_sizes(manifest(small, use_thumbnail=False), BuildOptions()).max_tiles == 4


def test_vision_profile_shapes():
    [profile] = graph_profiles("vision_encoder", resolve_sizes(manifest(), BuildOptions(opt_tiles=5)), BuildOptions())
    shapes = profile.shapes(entry("vision_encoder").inputs)
    assert shapes == {"pixel_values": ((1, 3, 448, 448), (5, 3, 448, 448), (8, 3, 448, 448))}
    [profile] = graph_profiles("projector", resolve_sizes(manifest(), BuildOptions(max_tiles=26)), BuildOptions())
    assert profile.shapes(entry("projector").inputs) == {
        "vision_features": ((1, 1025, 1024), (26, 1025, 1024), (26, 1025, 1024))
    }


@pytest.mark.parametrize(("gpu_gib", "context"), [(80, 32768), (24, 16384), (16, 8192), (8, 4096)])
def test_default_context_is_what_half_the_gpu_holds_at_a_prefill_chunk(gpu_gib, context):
    # 1B: 14 heads x 4096 x 4 bytes x 3 tensors of attention + 48 KiB of fp32 KV per position: 720 KiB per position
    assert resolve_sizes(manifest(), BuildOptions(), gpu_memory_bytes=gpu_gib << 30).max_context == context
    prefill, decode = decoder_profiles(resolve_sizes(manifest(), BuildOptions(), gpu_memory_bytes=gpu_gib << 30))
    assert prefill.axes["seq"][2] == 4096 and prefill.axes["total"][2] == decode.axes["total"][2] == context


def test_default_profiles_no_longer_reach_the_full_context_in_one_prefill():
    """Regression: the prefill profile went to seq = total = 32,768, a ~28 GiB mask no GPU context can hold."""
    prefill, _ = decoder_profiles(resolve_sizes(manifest(), BuildOptions(), gpu_memory_bytes=80 << 30))
    seq, total = prefill.axes["seq"][2], prefill.axes["total"][2]
    mask_bytes = 7 * seq * total * 4  # the tiled fp32 mask: 7 query heads per KV head stacked along the sequence
    assert mask_bytes <= 4 << 30
    assert context_for_memory(SPEC_1B.text, 1, 4096, 4 << 30) == 2048  # a 4 GiB GPU cannot hold a 4096 chunk


def test_a_gpu_too_small_for_the_prefill_chunk_is_refused():
    with pytest.raises(VlExportError, match=r"50% of the GPU's 4.0 GiB holds 2048 positions at batch 1, less than "
                                            r"one prefill chunk of 4096; pass a smaller --prefill-chunk"):
        resolve_sizes(manifest(), BuildOptions(), gpu_memory_bytes=4 << 30)
    assert resolve_sizes(manifest(), BuildOptions(prefill_chunk=1024), gpu_memory_bytes=4 << 30).max_context == 8192


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
    assert profile.name == "prefill" and profile.axes["seq"] == (1, 3456, 4096)
    assert profile.axes["total"] == (1, 3456, 32768)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(max_context=40000), "max_context 40000 is more than the model's 32768 positions"),
        (dict(opt_tiles=9), "opt_tiles 9 is more than max_tiles 8"),
        (dict(max_context=2048, prefill_chunk=4096), "prefill_chunk 4096 is more than max_context 2048"),
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
    """IBuilderConfig as far as configure() uses it: TF32 is the one precision flag left in TensorRT 11, on by default."""

    def __init__(self, cache_matches: bool):
        self.cache_matches = cache_matches
        self.pools, self.profiles, self.cache = {}, [], None
        self.flags = {"TF32"}

    def clear_flag(self, flag):
        self.flags.discard(flag)

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


def configure_decoder(options: BuildOptions, cache_matches: bool = True, precision: str = "fp32"):
    config = FakeConfig(cache_matches)

    def create_optimization_profile():
        shapes = {}
        return SimpleNamespace(shapes=shapes, set_shape=lambda n, lo, opt, hi: shapes.__setitem__(n, (lo, opt, hi)))

    builder = SimpleNamespace(
        create_builder_config=lambda: config, create_optimization_profile=create_optimization_profile
    )
    decoder = entry("decoder", precision=precision)
    network = SimpleNamespace(num_inputs=len(decoder.inputs), get_input=lambda i: decoder.inputs[i])
    trt = SimpleNamespace(
        MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"), ProfilingVerbosity=SimpleNamespace(DETAILED="detailed"),
        BuilderFlag=SimpleNamespace(TF32="TF32"),
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


def test_fp32_engines_do_not_compute_in_tf32():
    """Regression: TF32 is on by default in TensorRT 11 and was never cleared, so "fp32" engines ran TF32 matmuls."""
    assert configure_decoder(BuildOptions(max_context=4096)).flags == set()
    assert configure_decoder(BuildOptions(max_context=4096), precision="fp16").flags == {"TF32"}


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


def toy_engine(monkeypatch, role: str, options: BuildOptions, devices: int = 1, device: int = 0,
               record_options: BuildOptions | None = None):
    """A fake GPU (`devices` of them) and a toy `role` engine deserialized on `device`; engines.json's record may
    claim other profiles (record_options) than the engine was built with."""
    cudart = FakeCudart(devices)
    fake_cuda_python(monkeypatch, cudart)
    cuda = cuda_rt.Cuda(cudart, device)
    graph = entry(role, SPEC_TOY)
    profiles = graph_profiles(role, resolve_sizes(manifest(SPEC_TOY), options), options)
    claimed = graph_profiles(role, resolve_sizes(manifest(SPEC_TOY), record_options or options), options)
    engine = (FakeDecoderEngine if role == "decoder" else FakeProjectorEngine)(graph, profiles, cudart)
    record = EngineRecord(role, f"{role}.plan", f"{role}.onnx", "ab" * 32, tuple(claimed), 1)
    return Bindings(engine, record, graph, cuda, STRATEGIES.USER_MANAGED), graph, cudart


def toy_decoder(monkeypatch, max_context: int = 16, max_batch: int = 2, prefill_chunk: int | None = None, **kwargs):
    options = BuildOptions(max_context=max_context, max_batch=max_batch, prefill_chunk=prefill_chunk)
    bindings, graph, cudart = toy_engine(monkeypatch, "decoder", options, **kwargs)
    return TrtDecoder(bindings, graph), cudart


def step_inputs(rng, batch: int, past: int, seq: int):
    embeds = rng.standard_normal((batch, seq, 8)).astype(np.float32)
    mask = np.ones((batch, past + seq), np.int64)
    positions = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).copy()
    return embeds, mask, positions, np.full((batch, 1), seq - 1, np.int64)


def expected_cache(all_embeds: np.ndarray) -> list[np.ndarray]:
    """What FakeDecoderEngine's cache holds after seeing `all_embeds` (b, total, hidden)."""
    heads = np.arange(2)[None, :, None, None]
    return [all_embeds[:, None, :, :4] + 10 * i + heads for i in range(4)]  # 2 layers x key, value


def test_decoder_cache_ping_pongs_and_each_profile_runs_on_its_own_context(monkeypatch):
    decoder, cudart = toy_decoder(monkeypatch)
    engine = decoder.io.engine
    rng = np.random.default_rng(0)
    decoder.reset(batch=2, capacity=12)
    allocated = cudart.mallocs
    seen = []
    for past, seq in ((0, 5), (5, 1), (6, 1), (7, 1)):
        embeds, mask, positions, last = step_inputs(rng, 2, past, seq)
        logits = decoder.forward(embeds, mask, positions, last)
        seen.append(embeds)
        assert logits.shape == (2, 1, 11)
        np.testing.assert_allclose(logits[:, 0, :], embeds[:, -1, :1] * np.arange(1, 12) + past + seq - 1, rtol=1e-6)
    assert decoder.past_len == 8
    assert engine.runs == [0, 1, 1, 1]  # prefill on profile 0, decode steps on profile 1
    # Regression: one context switched profiles (a resource update per switch); now each profile has its context,
    # set once when it was made, on one user-managed allocation sized for the largest profile.
    prefill, decode = engine.contexts
    assert (prefill.switches, decode.switches) == ([], [1])
    assert prefill.memory == decode.memory and prefill.memory[1] == max(engine.memory_per_profile)
    cache = decoder.cache()
    assert [c.shape for c in cache] == [(2, 2, 8, 4)] * 4
    for got, want in zip(cache, expected_cache(np.concatenate(seen, axis=1))):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # Step inputs grew only once (prefill is the largest); the four KV pairs were allocated by reset alone.
    assert cudart.mallocs - allocated == 5  # 4 step inputs + logits

    # A second, shorter request reuses every buffer and starts from an empty cache.
    before = cudart.mallocs
    decoder.reset(batch=1, capacity=6)
    embeds, mask, positions, last = step_inputs(rng, 1, 0, 3)
    decoder.forward(embeds, mask, positions, last)
    assert cudart.mallocs == before
    np.testing.assert_allclose(decoder.cache()[3], expected_cache(embeds)[3], rtol=1e-6)
    assert engine.runs[-1] == 0 and (prefill.switches, decode.switches) == ([], [1])


def test_a_profile_tensorrt_refuses_raises_instead_of_returning_false(monkeypatch):
    """set_optimization_profile_async raises RuntimeError on failure (pyCore.cpp); it never returns False."""
    from trt_fakes import FakeContext

    def refuse(self, index, stream):
        raise RuntimeError("Error in set optimization profile async.")

    monkeypatch.setattr(FakeContext, "set_optimization_profile_async", refuse)
    with pytest.raises(RuntimeError, match="Error in set optimization profile async"):
        toy_decoder(monkeypatch)


def test_decoder_limits_come_from_the_engine_not_engines_json(monkeypatch):
    decoder, _ = toy_decoder(monkeypatch, max_context=16, max_batch=2, prefill_chunk=8)
    assert (decoder.max_positions, decoder.max_batch, decoder.max_seq) == (16, 2, 8)
    claimed = BuildOptions(max_context=64, max_batch=4)  # an engines.json that says more than the plan holds
    options = BuildOptions(max_context=16, max_batch=2, prefill_chunk=8)
    bindings, graph, _ = toy_engine(monkeypatch, "decoder", options, record_options=claimed)
    decoder = TrtDecoder(bindings, graph)
    assert (decoder.max_positions, decoder.max_batch) == (16, 2)
    assert [p.name for p in bindings.profiles] == ["prefill", "decode"]


def test_decoder_refuses_what_its_engine_or_cache_cannot_hold(monkeypatch):
    decoder, _ = toy_decoder(monkeypatch, max_context=16, max_batch=2)
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


def test_a_prompt_longer_than_the_prefill_chunk_is_prefilled_in_chunks(monkeypatch):
    whole, _ = toy_decoder(monkeypatch, max_context=16, prefill_chunk=16)
    chunked, _ = toy_decoder(monkeypatch, max_context=16, prefill_chunk=4)
    assert chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    rng = np.random.default_rng(4)
    embeds, mask, positions, _ = step_inputs(rng, 2, 0, 10)
    picks = np.array([[9, 2], [5, 9]])  # logits asked for positions in several chunks
    step = step_inputs(rng, 2, 10, 1)
    results = []
    for decoder in (whole, chunked):
        decoder.reset(batch=2, capacity=12)
        logits = decoder.forward(embeds, mask, positions, picks)
        results.append((logits, decoder.forward(*step), decoder.cache()))
    assert chunked.io.engine.runs == [0, 0, 0, 1] and whole.io.engine.runs == [0, 1]
    for got, want in zip(results[1], results[0]):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6)
    np.testing.assert_allclose(results[1][0][1, 0], embeds[1, 5, 0] * np.arange(1, 12) + 5, rtol=1e-6)


def toy_generate(decoder, prompt_len: int, max_new_tokens: int = 1024):
    """generate() on the toy decoder: embeddings from a fixed table, no stop token, greedy."""
    table = np.random.default_rng(5).standard_normal((11, 8)).astype(np.float32)
    embeds = table[np.arange(prompt_len) % 11][None]  # (1, s, 8)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    return generate(decoder, embeds, np.ones((1, prompt_len), np.int64), lambda ids: table[ids], config,
                    frozenset(), 0, max_context=32768)


def test_generate_clamps_new_tokens_to_the_engines_positions_not_the_manifests(monkeypatch):
    """Regression: generate asked for prompt + min(1024, manifest.max_context - prompt), which the engine refused
    although the prompt fit (an engine built with --max-context 4096, a 3,456-token photo prompt); scaled down."""
    decoder, _ = toy_decoder(monkeypatch, max_context=64, max_batch=1, prefill_chunk=16)
    generated = toy_generate(decoder, prompt_len=54)
    assert len(generated.token_ids[0]) == 10 and generated.finish_reasons == ["length"]  # 54 + 10 = the engine's 64
    assert decoder.past_len == 63  # the last token is sampled, never fed back
    with pytest.raises(InputError, match=r"the prompt is 64 tokens and the decoder holds at most 64 positions "
                                         r"\(the model's context is 32768, the decoder engine's 64\)"):
        toy_generate(decoder, prompt_len=64)


def test_generate_refuses_a_batch_larger_than_the_engine(monkeypatch):
    decoder, _ = toy_decoder(monkeypatch, max_context=16, max_batch=1)
    table = np.zeros((11, 8), np.float32)
    with pytest.raises(InputError, match="2 sequences in one batch, the decoder takes at most 1"):
        generate(decoder, np.zeros((2, 3, 8), np.float32), np.ones((2, 3), np.int64), lambda ids: table[ids],
                 GenerationConfig(max_new_tokens=2), frozenset(), 0, max_context=32768)


def test_sessions_used_from_another_thread_stay_on_their_gpu(monkeypatch):
    """Regression: cudaSetDevice holds for the calling thread only, and serve's worker threads start on GPU 0, so
    buffers grown there went to GPU 0 while the engine ran on GPU 1 (serve --device cuda:1)."""
    decoder, cudart = toy_decoder(monkeypatch, devices=2, device=1)
    rng = np.random.default_rng(6)
    steps = [step_inputs(rng, 1, 0, 5), step_inputs(rng, 1, 5, 1)]
    outcome = {}

    def worker():
        try:
            decoder.reset(batch=1, capacity=8)
            outcome["logits"] = [decoder.forward(*step) for step in steps]
            outcome["cache"] = decoder.cache()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which fails the test with it
            outcome["error"] = error

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert cudart.current() == 1  # this thread made the session on GPU 1 and stays there
    assert {device for _, _, device in cudart.allocations.values()} == {1}
    np.testing.assert_allclose(outcome["cache"][0], expected_cache(np.concatenate([steps[0][0], steps[1][0]], 1))[0])


def test_the_fake_gpu_catches_a_thread_left_on_gpu_0(monkeypatch):
    """The check above can fail: without cudaSetDevice in the worker, its copies use GPU 1's stream from GPU 0."""
    decoder, _ = toy_decoder(monkeypatch, devices=2, device=1)
    monkeypatch.setattr(cuda_rt.Cuda, "activate", lambda self: None)
    outcome = {}

    def worker():
        try:
            decoder.reset(batch=1, capacity=8)
            decoder.forward(*step_inputs(np.random.default_rng(7), 1, 0, 5))
        except BaseException as error:  # noqa: BLE001
            outcome["error"] = error

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert isinstance(outcome.get("error"), (RuntimeError, AssertionError))


def toy_projector(monkeypatch):
    bindings, _, cudart = toy_engine(monkeypatch, "projector", BuildOptions(max_tiles=4))
    return TrtGraph(bindings), cudart


def test_graph_runs_reuse_their_buffers(monkeypatch):
    graph, cudart = toy_projector(monkeypatch)
    rng = np.random.default_rng(2)
    features = rng.standard_normal((3, 1025, 16)).astype(np.float32)
    out = graph.run({"vision_features": features})["image_embeds"]
    assert out.shape == (3, 256, 8)
    np.testing.assert_allclose(out, 2 * features[:, :256, :8])
    allocated = cudart.mallocs
    smaller = features[:2] + 1
    np.testing.assert_allclose(graph.run({"vision_features": smaller})["image_embeds"], 2 * smaller[:, :256, :8])
    assert cudart.mallocs == allocated == 3  # the context's scratch, the input and the output
    assert graph.max_tiles == 4
    with pytest.raises(InputError, match="profile tiles: tiles 5 is outside 1..4"):
        graph.run({"vision_features": np.zeros((5, 1025, 16), np.float32)})


class CountingGraph:
    def __init__(self, max_tiles, key_in, key_out):
        self.max_tiles, self.key_in, self.key_out, self.runs = max_tiles, key_in, key_out, []

    def run(self, feeds):
        self.runs.append(len(feeds[self.key_in]))
        return {self.key_out: feeds[self.key_in] * 2}


def test_pipeline_runs_no_more_tiles_than_the_vision_engines_take():
    vision = CountingGraph(None, "pixel_values", "vision_features")
    projector = CountingGraph(3, "vision_features", "image_embeds")
    pipe = SimpleNamespace(vision=vision, projector=projector, max_tiles_per_run=8)
    pipe.tiles_per_run = Pipeline.tiles_per_run.fget(pipe)
    pixels = np.arange(13, dtype=np.float32).reshape(13, 1, 1, 1)
    out = Pipeline.encode_images(pipe, pixels)
    assert vision.runs == projector.runs == [3, 3, 3, 3, 1]
    np.testing.assert_array_equal(out, 4 * pixels)


def test_an_engine_with_other_io_than_the_manifest_is_refused(monkeypatch):
    cudart = FakeCudart()
    fake_cuda_python(monkeypatch, cudart)
    projector = entry("projector", SPEC_TOY)
    renamed = dataclasses.replace(projector, outputs=(dataclasses.replace(projector.outputs[0], name="embeds"),))
    engine = FakeProjectorEngine(renamed, [Profile("tiles", {"tiles": (1, 1, 4)})], cudart)
    record = EngineRecord("projector", "projector.plan", "projector.onnx", "ab" * 32, (), 1)
    with pytest.raises(BundleError, match=r"projector.plan has IO tensors \['embeds', 'vision_features'\]"):
        Bindings(engine, record, projector, cuda_rt.Cuda(cudart, 0), STRATEGIES.USER_MANAGED)


# ---- TensorRT, cuda-python or a GPU missing -------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt imports here; the GPU tests below cover the backend")
def test_without_tensorrt_build_and_backend_say_so(tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"needs TensorRT: pip install 'vl-export\[trt\]'"):
        build_engines(tmp_path / "bundle", progress=lambda _: None)
    with pytest.raises(BackendUnavailableError, match="needs TensorRT"):
        TensorRTBackend()


def test_tensorrt_before_10_1_is_refused(monkeypatch):
    """The contexts need get_device_memory_size_for_profile_v2 and set_device_memory(memory, size), new in 10.1."""
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.0.1.6"))
    with pytest.raises(BackendUnavailableError, match="TensorRT 10.0.1.6 is too old; vl-export needs TensorRT 10.1"):
        TensorRTBackend()
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0.30"))
    from vl_export.runtime.backends.trt import import_tensorrt

    assert import_tensorrt().__version__ == "10.3.0.30"  # JetPack 6's TensorRT


def test_gpu_probe_reads_name_and_compute_capability():
    assert cuda_rt.probe_gpu(FakeCudart(1)) == cuda_rt.GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0", 80 << 30)
    with pytest.raises(BackendUnavailableError, match=r"GPU 2 was asked for but 1 GPU\(s\) are visible \(0..0\)"):
        cuda_rt.probe_gpu(FakeCudart(1), device=2)


def test_an_old_driver_is_named_as_the_cause_not_a_missing_gpu():
    """Regression: cuda-python 13 on a driver before 580 reported 'no CUDA GPU is visible'."""
    with pytest.raises(BackendUnavailableError) as error:
        cuda_rt.probe_gpu(FakeCudart(1, runtime=13000, driver=12080))
    assert str(error.value) == (
        "the NVIDIA driver supports CUDA 12.8 but cuda-python is built for CUDA 13.0, which needs driver >= 580: "
        "update the driver, or use TensorRT and cuda-python for CUDA 12 (pip install 'vl-export[trt-cu12]')"
    )
    cuda_rt.probe_gpu(FakeCudart(1, runtime=12090, driver=12020))  # a newer 12.x runtime on a 12.x driver runs
    with pytest.raises(BackendUnavailableError, match=r"no NVIDIA driver is loaded \(cudaDriverGetVersion: 0\)"):
        cuda_rt.probe_gpu(FakeCudart(1, driver=0))


def test_cuda_python_must_match_tensorrts_cuda_major():
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is built for CUDA 12 but cuda-python for CUDA 13; "
                                                      r"install the matching one: pip install 'cuda-python>=12.9.1,<13'"):
        cuda_rt.probe_gpu(FakeCudart(1), tensorrt_major=12)
    cuda_rt.probe_gpu(FakeCudart(1), tensorrt_major=13)


def test_the_stream_handle_comes_from_the_native_handle_accessor(monkeypatch):
    """Regression: int(stream) is deprecated in cuda-python 12.9.1+/13 (FakeStream refuses it)."""
    cudart = FakeCudart()
    fake_cuda_python(monkeypatch, cudart)
    cuda = cuda_rt.Cuda(cudart, 0)
    assert isinstance(cuda.stream, FakeStream) and cuda.stream_handle == cuda.stream.handle == 0x5001


def test_devices_are_cuda_ordinals():
    assert [cuda_rt.device_index(d) for d in (0, 3, "cuda", "cuda:1")] == [0, 3, 0, 1]
    with pytest.raises(BackendUnavailableError, match="device must be cuda or cuda:N, not 'cpu'"):
        cuda_rt.device_index("cpu")


def test_with_tensorrt_but_no_gpu_build_and_backend_say_so(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, SimpleNamespace(__version__="11.0.0.13"), FakeCudart(0))
    message = r"no CUDA GPU is visible \(cudaGetDeviceCount: cudaErrorNoDevice\); TensorRT needs an NVIDIA GPU"
    with pytest.raises(BackendUnavailableError, match=message):
        build_engines(tmp_path, progress=lambda _: None)
    with pytest.raises(BackendUnavailableError, match=message):
        TensorRTBackend()


def fake_gpu(monkeypatch, trt, cudart: FakeCudart) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    fake_cuda_python(monkeypatch, cudart)


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


def fake_build(monkeypatch, m: Manifest, built: list, cudart: FakeCudart | None = None) -> FakeCudart:
    cudart = cudart or FakeCudart()
    inputs = {g.file: [t.name for t in g.inputs] for g in m.graphs}
    fake_gpu(monkeypatch, fake_tensorrt("11.0.0.13", inputs, built, cudart, {g.file: g for g in m.graphs}), cudart)
    return cudart


def test_build_engines_writes_plans_engines_json_and_the_manifest_link(monkeypatch, tmp_path):
    m = fake_bundle(tmp_path / "bundle")
    built: list = []
    cudart = fake_build(monkeypatch, m, built)
    cache = tmp_path / "shared.cache"
    trt_steps.write_file_atomically(cache, b"old")
    lines: list[str] = []
    result = build_engines(tmp_path / "bundle", BuildOptions(max_context=32, timing_cache=cache), lines.append)

    engines = tmp_path / "bundle" / ENGINES_DIR
    # fp32 graphs: TF32 cleared on every one
    assert built == [("vision_encoder.onnx", False), ("projector.onnx", False), ("decoder.onnx", False)]
    assert (engines / "decoder.plan").read_bytes() == b"plan:decoder.onnx"
    assert sorted(p.name for p in engines.iterdir()) == [
        "decoder.plan", "engines.json", "projector.plan", "timing.cache", "vision_encoder.plan"
    ]
    assert Engines.load(tmp_path / "bundle").to_dict() == result
    assert result["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    decoder = result["engines"]["decoder"]
    assert decoder["onnx_sha256"] == file_sha256(tmp_path / "bundle" / "decoder.onnx")
    assert [p["axes"]["total"] for p in decoder["profiles"]] == [[1, 32, 32], [1, 32, 32]]
    assert [p["axes"]["seq"] for p in decoder["profiles"]] == [[1, 32, 32], [1, 1, 1]]
    # Each profile's context memory, measured by opening the contexts as the runtime does, printed and recorded.
    prefill_bytes = 14 * 32 * 32 * 4 * 3
    assert decoder["device_memory_bytes"] == [prefill_bytes, 14 * 1 * 32 * 4 * 3]
    assert "decoder engine: 0.00 GiB of weights and kernels; device memory per context profile: prefill 0.00 GiB, " \
           "decode 0.00 GiB" in lines
    assert result["engines"]["vision_encoder"]["device_memory_bytes"] == [8 * (64 << 20)]
    assert "vision_encoder engine: 0.00 GiB of weights and kernels; device memory per context profile: tiles 0.50 GiB" \
        in lines
    assert cudart.allocations == {}  # the check's contexts and scratch are gone
    assert result["build_options"]["max_context"] == 32
    # Each build grows the cache it was given; the last one is saved in the bundle and to the shared file.
    assert cache.read_bytes() == (engines / "timing.cache").read_bytes() == b"old+tactics+tactics+tactics"
    assert Manifest.load(tmp_path / "bundle").engines == "engines/engines.json"
    assert lines[0] == (
        "building TensorRT 11.0.0.13 engines for NVIDIA H100 80GB HBM3 (compute capability 9.0, 80.00 GiB); "
        f"timing cache: {cache}"
    )
    assert lines[1] == "limits: 32 positions per sequence (prefill chunks of 32), batch 1, 8 tiles per vision run"
    assert [p.name for p in (tmp_path / "bundle").iterdir() if p.name.startswith(".")] == []  # no staging left


def test_build_engines_defaults_the_context_to_the_gpus_memory(monkeypatch, tmp_path):
    m = fake_bundle(tmp_path / "bundle")
    fake_build(monkeypatch, m, [], FakeCudart(memory_bytes=1 << 30))
    result = build_engines(tmp_path / "bundle", BuildOptions(), lambda _: None)
    # toy text: 4 heads x 64-position chunk x 12 bytes + 2 KiB of KV per position -> the model's 64 fit in 1 GiB
    assert result["engines"]["decoder"]["profiles"][0]["axes"]["total"] == [1, 64, 64]


def test_build_engines_refuses_an_engine_whose_context_cannot_be_created(monkeypatch, tmp_path):
    m = fake_bundle(tmp_path / "bundle")
    fake_build(monkeypatch, m, [], FakeCudart(memory_bytes=256 << 20))
    with pytest.raises(BackendUnavailableError) as error:
        build_engines(tmp_path / "bundle", BuildOptions(max_context=32), lambda _: None)
    assert str(error.value) == (
        "vision_encoder.plan needs 0.50 GiB of device memory for its execution context (per profile: tiles 0.50 GiB) "
        "and the GPU has 0.25 GiB free (cudaMalloc of 536870912 bytes failed: cudaErrorMemoryAllocation); rebuild "
        "the engines with a smaller --max-context or --prefill-chunk"
    )
    assert not (tmp_path / "bundle" / ENGINES_DIR).exists()  # nothing half-built left in place


def test_build_engines_refuses_a_graph_changed_behind_the_manifest(monkeypatch, tmp_path):
    m = fake_bundle(tmp_path / "bundle")
    fake_build(monkeypatch, m, [])
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
    options = BuildOptions(max_batch=2, max_tiles=3, max_context=64, prefill_chunk=16, optimization_level=0)
    build_engines(out, options, lambda _: None)
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


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_TRT, reason=NO_TRT)
def test_real_engine_limits_memory_and_chunked_prefill(trt_bundle):
    """On the real API: limits read back from the plan, per-profile memory recorded, a prompt longer than the
    prefill chunk (16) equal to ONNX Runtime's, and the session driven from a thread that never set the device."""
    from vl_export.runtime.backends.ort import OrtBackend

    m = Manifest.load(trt_bundle)
    record = Engines.load(trt_bundle).engines["decoder"]
    assert len(record.device_memory_bytes) == 2 and all(n > 0 for n in record.device_memory_bytes)
    trt_decoder = TensorRTBackend().open_decoder(trt_bundle, m.graph("decoder"))
    assert (trt_decoder.max_positions, trt_decoder.max_batch, trt_decoder.max_seq) == (64, 2, 16)
    ort_decoder = OrtBackend().open_decoder(trt_bundle, m.graph("decoder"))
    rng = np.random.default_rng(8)
    hidden = m.model.text.hidden_size
    embeds = rng.standard_normal((1, 40, hidden)).astype(np.float32)
    feeds = (embeds, np.ones((1, 40), np.int64), np.arange(40)[None].astype(np.int64), np.array([[39, 3]]))
    results = {}

    def run(name, session):
        session.reset(batch=1, capacity=48)
        results[name] = (session.forward(*feeds), session.cache())

    thread = threading.Thread(target=run, args=("trt", trt_decoder))
    thread.start()
    thread.join()
    run("ort", ort_decoder)
    np.testing.assert_allclose(results["trt"][0], results["ort"][0], atol=2e-3, rtol=2e-3)
    for got, want in zip(results["trt"][1], results["ort"][1]):
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
