"""Activation ranges of the vision encoder and the projector in one pass over the calibration tiles.

Each tile runs through the vision encoder once: its calibrator collects the encoder's statistics and hands the
encoder's own output on to the projector's calibrator, which needs exactly those features. Both keep running
statistics only (ONNX Runtime's min/max or histograms, merged feed by feed), never the intermediate tensors of
every feed. The ranges are ONNX Runtime's own calibrators' (the same code `quantize.calibrate` runs graph by graph:
a test holds them equal), written to the calibration cache, one file per graph, as soon as they are complete, so a
later build on the same checkpoint and data reuses every finished graph.

Why ONNX Runtime's calibrator on the fp32 graphs rather than hooks on the torch model: the ranges must be those of
the ONNX tensors the Q/DQ nodes go on (hooks would need a name map through the exporter's decompositions, and the
wrappers call F.linear, which module hooks do not see), and the torch model is released before calibration so
that only one full-precision copy of the weights is ever resident.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vl_export.errors import InputError
from vl_export.files import Progress
from vl_export.progress_bar import counted

VISION_OP_TYPES = ("MatMul", "Gemm", "Conv")


class _Recording:
    """An InferenceSession that also keeps the graph's own outputs of its last run (the calibrator drops them)."""

    def __init__(self, session, keep: tuple[str, ...]):
        self._session = session
        self._keep = keep
        self.kept: dict[str, np.ndarray] = {}

    def run(self, names, feed, *args, **kwargs):
        values = self._session.run(names, feed, *args, **kwargs)
        produced = names or [o.name for o in self._session.get_outputs()]
        self.kept = {n: v for n, v in zip(produced, values) if n in self._keep}
        return values

    def __getattr__(self, name):
        return getattr(self._session, name)


class GraphRanges:
    """ONNX Runtime's calibrator for one graph, fed one input at a time; `add` returns the graph's own outputs."""

    def __init__(self, src: Path, method: str, op_types: tuple[str, ...], stack: ExitStack):
        from .quantize import lean_calibrator

        self.seen = 0
        self._calibrator = stack.enter_context(lean_calibrator(src, op_types, method))
        outputs = tuple(o.name for o in self._calibrator.infer_session.get_outputs()[: self._calibrator.num_model_outputs])
        self._session = _Recording(self._calibrator.infer_session, outputs)
        self._calibrator.infer_session = self._session

    def add(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._calibrator.collect_data(_One(feed))
        self.seen += 1
        return self._session.kept

    def save(self, cache: Path) -> None:
        from onnxruntime.quantization.calibrate import save_tensors_data

        if not self.seen:
            raise InputError("the calibration data produced no inputs")
        save_tensors_data(self._calibrator.compute_data(), cache)  # atomic: a crash leaves no half-written cache


class _One:
    """ONNX Runtime's CalibrationDataReader over a single feed."""

    def __init__(self, feed):
        self._feed = feed

    def get_next(self):
        feed, self._feed = self._feed, None
        return feed

    def rewind(self):
        pass


@dataclass(frozen=True)
class VisionCalibration:
    """Where one pass reads its graphs and writes its ranges."""

    vision: Path  # fp32 vision encoder
    projector: Path  # fp32 projector
    vision_cache: Path
    projector_cache: Path


def calibrate_vision_and_projector(job: VisionCalibration, tiles: Collection[np.ndarray], method: str,
                                   progress: Progress) -> list[str]:
    """Ranges for both graphs from one vision pass over `tiles` (each (1, 3, H, W)); returns the roles whose
    ranges were already in the cache (nothing is recomputed for them)."""
    reused = [role for role, cache in (("vision_encoder", job.vision_cache), ("projector", job.projector_cache))
              if cache.is_file()]
    if len(reused) == 2:
        return reused
    with ExitStack() as stack:  # the calibrators' augmented graphs are removed on the way out
        vision = None if "vision_encoder" in reused else GraphRanges(job.vision, method, VISION_OP_TYPES, stack)
        plain = _plain_session(job.vision) if vision is None else None  # features only, for the projector
        projector = None if "projector" in reused else GraphRanges(job.projector, method, VISION_OP_TYPES, stack)
        for tile in counted(tiles, progress, "calibrating", "tiles"):
            feed = {"pixel_values": tile}
            features = vision.add(feed) if vision is not None else dict(zip(["vision_features"], plain.run(["vision_features"], feed)))
            if projector is not None:
                projector.add({"vision_features": features["vision_features"]})
        if vision is not None:
            vision.save(job.vision_cache)
        if projector is not None:
            projector.save(job.projector_cache)
    return reused


def _plain_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
