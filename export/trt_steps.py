"""The TensorRT build as small steps, as Polygraphy composes them: parse ONNX -> configure -> build -> serialize.

Every step takes the `tensorrt` module as an argument, so nothing here imports TensorRT and each step can be driven
(or replaced) alone. Networks are strongly typed: precision comes from the ONNX (fp16 types, Q/DQ nodes), never from
builder flags, which TensorRT 11 removed.

The one precision flag left, BuilderFlag.TF32, is on by default (NvInfer.h: "Enabled by default"): fp32 matmuls would
round their inputs to 10-bit mantissas. It is cleared for fp32 graphs, so an "fp32" engine computes in fp32 and is
verified against the fp32 thresholds; fp16 and int8 graphs keep TensorRT's default, as their fp32 islands
(LayerNorm, Softmax, residual sums) are not matmuls and their thresholds are set for reduced precision anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vl_export.engines import Profile
from vl_export.errors import BundleError, VlExportError
from vl_export.files import write_file_atomically  # noqa: F401  (the build and tests call it from here)
from vl_export.manifest import GraphEntry
from vl_export.runtime.backends.cuda_rt import DeviceBuffer
from vl_export.runtime.backends.trt import engine_profiles, open_contexts

from .trt_profiles import BuildOptions

STRONGLY_TYPED_BY_DEFAULT = 11  # from TensorRT 11 every network is strongly typed and the flag is deprecated


def network_flags(trt) -> int:
    """create_network flags: STRONGLY_TYPED on TensorRT 10 (opt-in there), none on 11+ (always on, flag ignored)."""
    if int(trt.__version__.split(".")[0]) >= STRONGLY_TYPED_BY_DEFAULT:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise VlExportError(f"TensorRT {trt.__version__} has no strongly typed networks; vl-export needs TensorRT 10+")
    return 1 << int(flag)


def parse_onnx(trt, logger, path: Path):
    """Step 1: a builder and a network parsed from `path` (from the file, so external weights are found beside it)."""
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors else "no error recorded"
        raise BundleError(f"TensorRT cannot parse {path.name} ({len(errors)} error(s)); first: {first}")
    return builder, network, parser


def check_network_inputs(names: Sequence[str], entry: GraphEntry) -> None:
    """The parsed network must take exactly the manifest's inputs, or the profiles would name missing tensors."""
    expected = [t.name for t in entry.inputs]
    if sorted(names) != sorted(expected):
        raise BundleError(f"{entry.file} takes inputs {sorted(names)} but the manifest says {sorted(expected)}")


def configure(trt, builder, network, entry: GraphEntry, profiles: Sequence[Profile], options: BuildOptions,
              timing_cache: bytes):
    """Step 2: the builder config: profiles in order (their index is what the runtime selects), limits, cache."""
    check_network_inputs([network.get_input(i).name for i in range(network.num_inputs)], entry)
    config = builder.create_builder_config()
    if entry.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # see the module docstring
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.inspect:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes(entry.inputs).items():
            trt_profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(trt_profile) < 0:
            raise VlExportError(f"TensorRT refused optimization profile {profile.name} of {entry.file}")
    cache = config.create_timing_cache(timing_cache)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise VlExportError(
            "the timing cache was made by another TensorRT version or GPU; delete it or pass another timing cache"
        )
    return config


def build_plan(builder, network, config, what: str) -> bytes:
    """Step 3: the serialized engine (a plan)."""
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise VlExportError(f"TensorRT could not build the {what} engine (its log above says why)")
    return bytes(plan)


def context_memory(trt, logger, plan: bytes, entry: GraphEntry, profiles: Sequence[Profile], file: str,
                   cuda) -> list[int]:
    """Step 3b: deserialize the plan and create its execution contexts exactly as the runtime will (one per profile
    on one user-managed allocation), so a plan the GPU cannot run is refused now. Returns each profile's device
    memory (getDeviceMemorySizeForProfileV2)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise VlExportError(f"TensorRT cannot deserialize the {entry.role} engine it just built (its log says why)")
    names = [p.name for p in profiles]
    scratch = DeviceBuffer(cuda)
    try:
        contexts = open_contexts(engine, file, engine_profiles(engine, entry, names),
                                 trt.ExecutionContextAllocationStrategy.USER_MANAGED, scratch, cuda)
        del contexts  # before their memory goes
    finally:
        scratch.release()
    return [int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(engine.num_optimization_profiles)]


def serialized_timing_cache(config) -> bytes:
    """Step 4a: the config's timing cache after a build, grown by every tactic it timed."""
    return bytes(config.get_timing_cache().serialize())


def layer_information(trt, logger, plan: bytes) -> str:
    """Step 4b: IEngineInspector's JSON of every layer (kernels, precisions), to check what the ONNX asked for."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def read_timing_cache(path: Path | None) -> bytes:
    """A saved timing cache, or b'' (TensorRT's empty cache) when there is none yet."""
    return path.read_bytes() if path is not None and path.is_file() else b""


