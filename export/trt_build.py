"""`build_engines`: one TensorRT plan per graph of a bundle, into BUNDLE/engines/ with engines.json beside them.

Torch-free on purpose: plans only run on the GPU model that built them, so a Jetson builds its own from a bundle
exported elsewhere, with only the runtime and trt extras installed.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from vl_export.engines import (
    BACKEND,
    ENGINES_DIR,
    ENGINES_FILE,
    EngineRecord,
    Engines,
    Target,
    file_sha256,
)
from vl_export.errors import BundleError
from vl_export.files import Progress, staged_directory, stderr_progress
from vl_export.manifest import ROLES, GraphEntry, Manifest
from vl_export.runtime.backends.cuda_rt import Cuda, GpuInfo, import_cudart, probe_gpu, tensorrt_cuda_major
from vl_export.runtime.backends.trt import gib, import_tensorrt

from . import trt_steps
from .trt_profiles import BuildOptions, ProfileSizes, graph_profiles, resolve_sizes

TIMING_CACHE = "timing.cache"


def build_target(device: int = 0) -> tuple[object, Target, GpuInfo, Cuda]:
    """TensorRT, the GPU the plans are built for, and a stream on it; BackendUnavailableError when one is missing."""
    trt = import_tensorrt()
    cudart = import_cudart()
    gpu = probe_gpu(cudart, device, tensorrt_cuda_major())
    cuda = Cuda(cudart, device)  # makes the device current: the builder builds for the current device
    return trt, Target(trt.__version__, gpu.name, gpu.compute_capability), gpu, cuda


def initial_timing_cache(bundle: Path, options: BuildOptions, target: Target) -> tuple[bytes, str]:
    """The timing cache to start from, and where it came from (for the progress line).

    An explicit cache is used as given (TensorRT refuses one from another GPU). The bundle's own cache is reused
    only when its engines.json says it was made for this target, since rebuilding on a new GPU must start afresh.
    """
    if options.timing_cache is not None:
        data = trt_steps.read_timing_cache(options.timing_cache)
        return data, f"{options.timing_cache}" if data else f"empty (new file {options.timing_cache})"
    own = bundle / ENGINES_DIR / TIMING_CACHE
    try:
        previous = Engines.load(bundle).target if own.is_file() else None
    except BundleError:
        previous = None  # an unreadable engines.json: its cache is of unknown provenance
    if previous == target:
        return own.read_bytes(), f"{ENGINES_DIR}/{TIMING_CACHE}"
    return b"", "empty"


def build_one(trt, logger, bundle: Path, entry: GraphEntry, sizes: ProfileSizes, options: BuildOptions,
              timing_cache: bytes, out_dir: Path, cuda, progress: Progress) -> tuple[EngineRecord, bytes]:
    """Build one graph's plan into out_dir; returns its record and the grown timing cache."""
    onnx = bundle / entry.file
    sha256 = file_sha256(onnx)
    if entry.sha256 is not None and entry.sha256 != sha256:
        raise BundleError(f"{entry.file} does not match the sha256 in the manifest; the bundle was changed by hand")
    profiles = graph_profiles(entry.role, sizes, options)
    builder, network, _parser = trt_steps.parse_onnx(trt, logger, onnx)
    config = trt_steps.configure(trt, builder, network, entry, profiles, options, timing_cache)
    plan = trt_steps.build_plan(builder, network, config, entry.role)
    plan_file = f"{entry.role}.plan"
    memory = trt_steps.context_memory(trt, logger, plan, entry, profiles, plan_file, cuda)
    progress(f"{entry.role} engine: {gib(len(plan))} of weights and kernels; device memory per context profile: "
             + ", ".join(f"{p.name} {gib(n)}" for p, n in zip(profiles, memory)))
    (out_dir / plan_file).write_bytes(plan)
    if options.inspect:
        (out_dir / f"{entry.role}.layers.json").write_text(trt_steps.layer_information(trt, logger, plan))
    record = EngineRecord(entry.role, plan_file, entry.file, sha256, tuple(profiles), len(plan), tuple(memory))
    return record, trt_steps.serialized_timing_cache(config)


def build_engines(bundle_dir: Path | str, options: BuildOptions = BuildOptions(), progress: Progress = stderr_progress) -> dict:
    """Build every graph of the bundle into BUNDLE/engines/, replacing what was there only once all plans built.

    Returns the engines.json content. Raises BackendUnavailableError without TensorRT, cuda-python or a CUDA GPU.
    """
    trt, target, gpu, cuda = build_target(options.device)
    bundle = Path(bundle_dir)
    manifest = Manifest.load(bundle)
    sizes = resolve_sizes(manifest, options, gpu.memory_bytes)
    timing_cache, source = initial_timing_cache(bundle, options, target)
    progress(f"building TensorRT {target.tensorrt_version} engines for {target.gpu_name} "
             f"(compute capability {target.compute_capability}, {gib(gpu.memory_bytes)}); timing cache: {source}")
    progress(f"limits: {sizes.max_context} positions per sequence (prefill chunks of {sizes.prefill_chunk}), "
             f"batch {sizes.max_batch}, {sizes.max_tiles} tiles per vision run")
    logger = trt.Logger(trt.Logger.WARNING)
    with staged_directory(bundle / ENGINES_DIR, overwrite=True) as staging:
        records = {}
        for role in ROLES:
            start = time.perf_counter()
            entry = manifest.graph(role, BACKEND)
            progress(f"building the {role} engine from {entry.file} ...")
            records[role], timing_cache = build_one(trt, logger, bundle, entry, sizes, options, timing_cache, staging,
                                                    cuda, progress)
            progress(f"building the {role} engine: done in {time.perf_counter() - start:.1f} s")
        (staging / TIMING_CACHE).write_bytes(timing_cache)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        engines = Engines(target, records, options.to_dict(), created)
        engines.save(staging)
    if options.timing_cache is not None:
        trt_steps.write_file_atomically(options.timing_cache, timing_cache)
    manifest.engines = f"{ENGINES_DIR}/{ENGINES_FILE}"
    manifest.save(bundle)
    progress(f"engines written to {(bundle / ENGINES_DIR).absolute()}")
    return engines.to_dict()

