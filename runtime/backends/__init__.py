"""Session backends: ONNX Runtime, OpenVINO, TensorRT; chosen by name, imported only when chosen."""

from __future__ import annotations

from pathlib import Path

from vl_export.errors import BackendUnavailableError
from vl_export.manifest import Manifest

from .base import Backend

ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "ov": "openvino", "openvino": "openvino",
           "trt": "tensorrt", "tensorrt": "tensorrt"}
BACKENDS = ("onnxruntime", "openvino", "tensorrt")


def canonical(name: str) -> str:
    if name not in ALIASES:
        raise BackendUnavailableError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return ALIASES[name]


def open_backend(name: str, bundle: Path, manifest: Manifest, **options) -> Backend:
    """The backend `name`, configured by `options` (threads=, device=, ...); a missing package is a clear error."""
    name = canonical(name)
    if name == "onnxruntime":
        from .ort import OrtBackend as cls
    elif name == "openvino":
        from .ov import OpenVinoBackend as cls
    else:
        from .trt import TensorRTBackend as cls
    try:
        return cls(**options)
    except TypeError as exc:
        raise BackendUnavailableError(f"bad option for the {name} backend: {exc}") from None
