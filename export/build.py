"""`vl-export build`: export, calibrate and quantize where INT8 asks for it, build TensorRT engines where TensorRT is
the backend, verify against PyTorch, and leave one bundle the runtime can load."""

from __future__ import annotations

import dataclasses
import gc
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

from vl_export.calibration import DEFAULT_MAX_TILES
from vl_export.errors import InputError, VerificationFailed
from vl_export.files import Progress, stderr_progress, step
from vl_export.manifest import ROLES, GraphEntry, Manifest

from .bundle import with_hashes, check_out, load_checkpoint, output_directory, write_bundle
from .trt_profiles import BuildOptions

PRECISIONS = ("fp32", "fp16", "int8", "int4")  # int4: decoder weights 4-bit, vision INT8
BACKENDS = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "trt": "tensorrt", "tensorrt": "tensorrt"}
DECODER_RECIPES = ("weight-only", "w8a8", "w8a8-smoothquant")


@dataclass(frozen=True)
class BuildConfig:
    precision: str = "fp32"
    backend: str = "onnxruntime"
    calib_images: str | None = None
    calib_prompts: str | None = None
    calib_method: str = "minmax"
    calib_tiles: int | None = DEFAULT_MAX_TILES  # at most this many calibration tiles; None: all of them
    decoder_recipe: str = "weight-only"
    int4_lm_head: str | None = None  # ONNX Runtime's INT4 decoder: lm_head "int4" (None: the default) or "int8"
    int4_block: int | None = None  # INT4 decoders' block along K (None: decoder_variants.INT4_BLOCK_SIZE)
    ort_int8_decoder: str | None = None  # ONNX Runtime's INT8 decoder (decoder_variants.ORT_INT8_DECODERS; None: the default)
    verify: bool = True
    verify_tokens: int = 16
    trt: BuildOptions = field(default_factory=BuildOptions)
    overwrite: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if self.backend not in BACKENDS:
            raise InputError(f"unknown build backend {self.backend!r} (choose from ort, trt)")
        object.__setattr__(self, "backend", BACKENDS[self.backend])
        if self.decoder_recipe not in DECODER_RECIPES:
            raise InputError(f"unknown decoder recipe {self.decoder_recipe!r} (choose from {', '.join(DECODER_RECIPES)})")
        from vl_export.calibration.quantize import METHODS

        if self.calib_method not in METHODS:
            raise InputError(f"unknown calibration method {self.calib_method!r} (choose from {', '.join(METHODS)})")
        for flag, value in (("--int4-lm-head", self.int4_lm_head), ("--int4-block", self.int4_block)):
            if value is not None and self.precision != "int4":
                raise InputError(f"{flag} applies to --precision int4, not {self.precision}")
        from .decoder_variants import ORT_INT8_DECODERS

        if self.ort_int8_decoder not in (None, *ORT_INT8_DECODERS):
            raise InputError(f"--ort-int8-decoder {self.ort_int8_decoder!r} is not one of {', '.join(ORT_INT8_DECODERS)}")
        if self.ort_int8_decoder is not None and (self.precision, self.backend) != ("int8", "onnxruntime"):
            raise InputError(f"--ort-int8-decoder applies to --precision int8 --backend ort, not {self.precision} "
                             f"for {self.backend}")
        if self.precision == "int4":
            from .decoder_variants import check_int4

            check_int4(self)


def build_bundle(model: str, out: Path, config: BuildConfig = BuildConfig(), progress: Progress = stderr_progress) -> Manifest:
    """The one-shot path. Raises VerificationFailed (exit 1) after writing the bundle when it does not verify."""
    from vl_export.memory import frozen_heap

    with frozen_heap("torch", "transformers", "onnx", "onnx_ir", "onnxruntime"), \
            step(progress, f"building {config.precision} for {config.backend}"):
        return _build_bundle(model, out, config, progress)


def _build_bundle(model: str, out: Path, config: BuildConfig, progress: Progress) -> Manifest:
    if config.backend == "tensorrt":
        from .trt_build import build_target

        build_target(config.trt.device)  # no TensorRT or no GPU: say so before any work
    check_out(model, Path(out), config.overwrite)
    calibration = None
    if config.precision in ("int8", "int4"):
        from vl_export.calibration.data import CalibrationSet

        calibration = CalibrationSet.from_paths(config.calib_images, config.calib_prompts,  # bad data fails first
                                                config.calib_tiles)
    ck = load_checkpoint(model, progress, stored_dtype=True)  # each graph's weights upcast when it is exported
    path, sha = ck.path, ck.sha256
    with output_directory(ck, Path(out), config.overwrite) as staging:
        graph_precision = "fp16" if config.precision == "fp16" else "fp32"
        made, quantized = {}, {}
        if calibration is not None:
            from .decoder_variants import weight_only_int8

            # INT8 decoders that need no calibration are written quantized as they are built from the weights.
            if config.precision == "int8" and config.decoder_recipe == "weight-only":
                quantized["decoder"] = weight_only_int8()
        # Each graph's torch weights go as soon as it is written; verify loads the checkpoint again at the end.
        manifest = write_bundle(ck, staging, graph_precision, progress, embed_precision=config.precision,
                                release_weights=True, quantized=quantized,
                                before_decoder=None if calibration is None else partial(
                                    _ort_variant_source, ck, staging, config, progress, made))
        inplace = made.get("inplace")
        del ck
        if calibration is not None:
            manifest = quantize_bundle(staging, manifest, sha, calibration, config, progress, inplace)
        if config.backend == "tensorrt":
            from .trt_build import build_engines

            build_engines(staging, config.trt, progress)
            manifest = Manifest.load(staging)
        if config.verify:
            manifest.verification = quick_verify(staging, load_checkpoint(str(path), progress), config, progress)
            manifest.save(staging)
    progress(f"bundle written to {Path(out).absolute()}")
    if manifest.verification is not None and not manifest.verification["passed"]:
        failed = sorted({s["stage"] for s in manifest.verification["stages"] if not s["pass"]})
        raise VerificationFailed(f"the bundle was written but does not verify against PyTorch: {', '.join(failed)} "
                                 f"(run vl-export verify for the full table)")
    return manifest


def _ort_variant_source(ck, staging: Path, config: BuildConfig, progress: Progress, made: dict) -> None:
    """ONNX Runtime's decoder variants' source (the GQA decoder; for INT8 its dynamic-INT8 form itself, straight from
    the weights), made while the language model's weights are still loaded: into made["inplace"]."""
    from .decoder_variants import export_inplace_source, ort_int8

    made["inplace"] = export_inplace_source(ck, staging, config.backend, progress,
                                            ort_int8(config.ort_int8_decoder) if config.precision == "int8" else None)


def quick_verify(bundle: Path, ck, config: BuildConfig, progress: Progress) -> dict:
    from .reference import Reference
    from .verify import DEFAULT_PROMPTS, default_images, summary, table, verify_bundle

    label, image = default_images()[0]
    with step(progress, f"verifying against PyTorch ({label}, {config.verify_tokens} greedy tokens)"):
        report = verify_bundle(bundle, str(ck.path), images=[(label, image)], prompts=[DEFAULT_PROMPTS[0]],
                               new_tokens=config.verify_tokens, backend=config.backend,
                               reference=Reference(ck), progress=lambda _: None)
    for line in table(report).splitlines():
        progress(line)
    return summary(report)


def quantize_bundle(staging: Path, manifest: Manifest, source_sha: str, data, config: BuildConfig,
                    progress: Progress, inplace: GraphEntry | None = None) -> Manifest:
    """Replace the fp32 graphs in `staging` by INT8 (INT4) ones; returns the updated manifest (saved). `inplace`:
    the fp32 in-place-cache decoder that the ONNX Runtime decoder variants are made from, if exported."""
    from vl_export.calibration import quantize
    from vl_export.export.random_model import cache_root
    from vl_export.runtime import Pipeline

    pipe = Pipeline.from_bundle(staging, lazy=True)  # the fp32 graphs produce the later graphs' calibration inputs
    method = config.calib_method
    data_sha = data.sha256()
    cache_dir = cache_root() / "calibration"
    cache_dir.mkdir(parents=True, exist_ok=True)
    reused = []

    # CPU bundles get 7-bit Q/DQ weights (no int16 saturation on CPUs without int8 dot products); TensorRT's keep 8.
    seven_bit = config.backend == "onnxruntime"
    w8a8_recipe = f"w8a8-{method}" + ("-w7" if seven_bit else "")

    def cache_of(variant: str, graph: Path) -> Path:
        """Ranges are keyed by the weights (the checkpoint), the graph they are ranges of (its nodes and tensor names:
        ranges from another vl-export's graph name other tensors), the method and the data."""
        structure = quantize.structure_sha256(graph)
        return cache_dir / f"{source_sha[:16]}-{variant}-{structure[:12]}-{method}-{data_sha[:16]}.json"

    def calibrated(role: str, feeds, smooth: bool = False):
        variant = f"{role}-smoothquant" if smooth else role  # a smoothed graph has other activation ranges

        def quantize_w8a8(src: Path, dst: Path, feeds, graph: Path) -> None:
            cache = cache_of(variant, graph)
            if quantize.w8a8(src, dst, feeds, method, cache, seven_bit_weights=seven_bit):
                reused.append(role)
                progress(f"{role}: activation ranges reused from the calibration cache ({cache.name})")

        def make(src: Path, dst: Path) -> None:
            if not smooth:
                return quantize_w8a8(src, dst, feeds, src)
            # The smoothed fp32 graph replaces src for calibration and Q/DQ; both passes read the same inputs,
            # so the feeds (which run the vision encoder) are computed once.
            from vl_export.calibration import smoothquant

            once = list(feeds())
            smoothed = src.with_name(src.stem + ".smoothed.onnx")
            try:
                smoothquant.smooth(src, smoothed, lambda: iter(once))
                quantize_w8a8(smoothed, dst, lambda: iter(once), src)
            finally:
                for path in smoothed.parent.glob(smoothed.name + "*"):
                    path.unlink()

        return make

    fp32 = {role: manifest.graph(role) for role in ROLES}
    # Graphs already quantized as they were built from the weights (decoder_variants.Quantized) ship as they are.
    made = [fp32.pop(role) for role in ROLES if fp32[role].precision != "fp32"]
    if inplace is not None and inplace.precision != "fp32":
        made.append(inplace)
        inplace = None
    reused += _calibrate_vision_and_projector(staging, fp32, data, pipe, method, cache_of, progress)

    def from_cache(role: str):
        return lambda src, dst: quantize.w8a8(src, dst, None, method, cache_of(role, src), seven_bit_weights=seven_bit)

    if inplace is not None:
        from .decoder_variants import INPLACE

        fp32[INPLACE] = inplace  # a source like the others: its fp32 file goes at the end
    # (role, file, recipe, backends, how); the calibrated steps come first, so the fp32 sessions can go after them.
    calibrated_steps = [
        ("vision_encoder", "vision_encoder.int8.onnx", w8a8_recipe, None, from_cache("vision_encoder")),
        ("projector", "projector.int8.onnx", w8a8_recipe, None, from_cache("projector")),
    ]
    other_steps = []
    if config.precision == "int4":
        from .decoder_variants import int4_steps

        other_steps += int4_steps(inplace, config.int4_lm_head, config.int4_block)
    elif config.decoder_recipe == "weight-only":
        if "decoder" in fp32:
            other_steps.append(("decoder", "decoder.int8.onnx", "weight-only-int8", None, quantize.weight_only_int8))
    else:
        smooth = config.decoder_recipe == "w8a8-smoothquant"
        calibrated_steps.append(("decoder", "decoder.int8.onnx", f"{config.decoder_recipe}-{method}" + ("-w7" if seven_bit else ""), None,
                                 calibrated("decoder", lambda: data.decoder_feeds(pipe), smooth)))
    if config.backend == "onnxruntime":
        from .decoder_variants import INPLACE, ort_int8_from_file

        # ONNX Runtime's CPU kernels run Q/DQ matmuls slowly; its own dynamic INT8 is the fast form there.
        other_steps.append(("vision_encoder", "vision_encoder.ort-int8.onnx", "fused-dynamic-int8-w7", ("onnxruntime",),
                            quantize.fused_dynamic_int8))
        if config.precision == "int8" and not any(g.backends == ("onnxruntime",) for g in made):
            # made from the in-place-cache decoder where one was exported
            recipe, make = ort_int8_from_file(config.ort_int8_decoder)
            other_steps.append((INPLACE if inplace else "decoder", "decoder.ort-int8.onnx", recipe, ("onnxruntime",), make))

    graphs: list[GraphEntry] = []
    steps = calibrated_steps + other_steps
    for i, (role, file, recipe, backends, make) in enumerate(steps):
        if i == len(calibrated_steps):
            pipe = None  # the fp32 sessions' memory goes back before the large ORT-only passes
            gc.collect()
        for_whom = ", ".join(backends) if backends else "any backend"
        with step(progress, f"[{i + 1}/{len(steps)}] quantizing {role} ({recipe}, for {for_whom})"):
            make(staging / fp32[role].file, staging / file)
        precision = "int4" if "int4" in recipe else "int8"
        graphs.append(with_hashes(dataclasses.replace(fp32[role], file=file, precision=precision, recipe=recipe,
                                                     backends=backends), staging))
    for entry in fp32.values():
        for path in staging.glob(entry.file + "*"):
            path.unlink()
    manifest.graphs = graphs + made
    manifest.calibration = {
        "method": method,
        "data_sha256": data_sha,
        "data": data.source,
        "images": len(data.images),
        "max_tiles": data.max_tiles,
        "prompts": len(data.prompts),
        "decoder_recipe": config.decoder_recipe,
        "cache_reused_for": reused,
        "quantizer": "onnxruntime.quantization (static QDQ, dynamic); weight-only Q/DQ by vl_export.calibration",
    }
    manifest.save(staging)
    return manifest


def _calibrate_vision_and_projector(staging: Path, fp32: dict[str, GraphEntry], data, pipe, method: str, cache_of,
                                    progress: Progress) -> list[str]:
    """Both graphs' activation ranges into the calibration cache, from one vision pass; returns the roles whose
    ranges the cache already held (a rebuild, or a build resumed after a crash)."""
    from vl_export.calibration.ranges import VisionCalibration, calibrate_vision_and_projector

    vision, projector = staging / fp32["vision_encoder"].file, staging / fp32["projector"].file
    job = VisionCalibration(vision, projector, cache_of("vision_encoder", vision), cache_of("projector", projector))
    tiles = data.tiles(pipe)
    of = f" of {tiles.total}" if len(tiles) < tiles.total else ""
    with step(progress, f"calibrating vision_encoder and projector ({len(tiles)}{of} tiles, one vision pass)"):
        reused = calibrate_vision_and_projector(job, tiles, method, progress)
    for role in reused:
        cache = job.vision_cache if role == "vision_encoder" else job.projector_cache
        progress(f"{role}: activation ranges reused from the calibration cache ({cache.name})")
    return reused
