"""Session backends: ONNX Runtime, OpenVINO, TensorRT; chosen by name (per graph if asked), imported only when chosen."""

from __future__ import annotations

import inspect
from pathlib import Path

from vl_export.errors import BackendUnavailableError
from vl_export.manifest import ROLES, Manifest

from .base import Backend

ALIASES = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "ov": "openvino", "openvino": "openvino",
           "trt": "tensorrt", "tensorrt": "tensorrt"}
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
# `vision=` in a per-graph spec names the backend of both image graphs.
ROLE_ALIASES = {"vision": ("vision_encoder", "projector"), "vision_encoder": ("vision_encoder",),
                "projector": ("projector",), "decoder": ("decoder",)}


def canonical(name: str) -> str:
    if name not in ALIASES:
        raise BackendUnavailableError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    return ALIASES[name]


def backend_class(name: str) -> type[Backend]:
    name = canonical(name)
    if name == "onnxruntime":
        from .ort import OrtBackend as cls
    elif name == "openvino":
        from .ov import OpenVinoBackend as cls
    else:
        from .trt import TensorRTBackend as cls
    return cls


def open_backend(name: str, bundle: Path, manifest: Manifest, **options) -> Backend:
    """The backend `name`, configured by `options` (threads=, device=, ...); a missing package is a clear error."""
    cls = backend_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise BackendUnavailableError(f"bad option for the {canonical(name)} backend: {exc}") from None


def parse_spec(spec: str) -> dict[str, str]:
    """`onnxruntime` -> every graph on it; `vision=openvino,decoder=onnxruntime` -> per graph (unnamed: onnxruntime)."""
    if "=" not in spec:
        return {role: canonical(spec) for role in ROLES}
    roles = {role: "onnxruntime" for role in ROLES}
    for part in spec.split(","):
        role, _, name = part.partition("=")
        if role.strip() not in ROLE_ALIASES:
            raise BackendUnavailableError(f"unknown graph {role.strip()!r} in backend spec {spec!r} "
                                          f"(use {', '.join(ROLE_ALIASES)})")
        for r in ROLE_ALIASES[role.strip()]:
            roles[r] = canonical(name.strip())
    return roles


def open_backends(spec: str, bundle: Path, manifest: Manifest, **options) -> dict[str, Backend]:
    """One backend per graph role, shared where the names agree. Each backend gets the options its constructor
    takes (threads= to the CPU ones, say); an option no chosen backend takes is an error."""
    roles = parse_spec(spec)
    opened: dict[str, Backend] = {}
    used: set[str] = set()
    for name in dict.fromkeys(roles.values()):
        accepted = set(inspect.signature(backend_class(name).__init__).parameters) - {"self"}
        mine = {k: v for k, v in options.items() if k in accepted}
        used |= set(mine)
        opened[name] = open_backend(name, bundle, manifest, **mine)
    unused = set(options) - used
    if unused:
        raise BackendUnavailableError(f"no chosen backend takes the option {sorted(unused)[0]!r}")
    return {role: opened[name] for role, name in roles.items()}


def serving_options(spec: str, options: dict) -> dict:
    """A server's backend options: ONNX Runtime's pools sleep when idle (spin=0) unless the caller chose, because the
    engine runs vision beside the decoder (see OrtBackend); measured in README Serving."""
    if "spin" in options or "onnxruntime" not in parse_spec(spec).values():
        return dict(options)
    return {**options, "spin": 0}
