"""engines/engines.json: the TensorRT plans a bundle holds, what built them, and whether this machine may load them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BackendUnavailableError, BundleError, InputError
from .files import file_sha256, read_json_with_version
from .manifest import GraphEntry, TensorSpec

BACKEND = "tensorrt"  # the backend name a manifest uses for TensorRT-specific graph variants
ENGINES_DIR = "engines"
ENGINES_FILE = "engines.json"
SCHEMA_VERSION = 1
REBUILD = "rebuild them on this machine (vl-export build --backend trt)"

Range = tuple[int, int, int]  # (min, opt, max) of one symbolic axis


def onnx_sha256(bundle: Path, entry: GraphEntry) -> str:
    """The graph's hash as the manifest records it; hashed from the file only when the manifest has none."""
    return entry.sha256 or file_sha256(bundle / entry.file)


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile, as ranges of the manifest's symbolic axes (tiles, batch, seq, ...)."""

    name: str
    axes: Mapping[str, Range]

    def __post_init__(self):
        for axis, (low, opt, high) in self.axes.items():
            if not 0 <= low <= opt <= high:
                raise ValueError(f"profile {self.name}: {axis} needs 0 <= min <= opt <= max, got {low}, {opt}, {high}")

    def shapes(self, specs: Sequence[TensorSpec]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shape of each tensor, its symbolic axes filled from this profile, for set_shape."""
        return {
            t.name: tuple(tuple(self.axes[d][k] if isinstance(d, str) else d for d in t.shape) for k in range(3))
            for t in specs
        }

    def misfit(self, sizes: Mapping[str, int]) -> str | None:
        """None when every axis size lies in this profile, else the first one that does not, in words."""
        for axis, size in sizes.items():
            low, _, high = self.axes[axis]
            if not low <= size <= high:
                return f"{axis} {size} is outside {low}..{high}"
        return None

    def span(self) -> int:
        return sum(high - low for low, _, high in self.axes.values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "axes": {axis: list(r) for axis, r in self.axes.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(name=data["name"], axes={axis: tuple(r) for axis, r in data["axes"].items()})


def select_profile(profiles: Sequence[Profile], sizes: Mapping[str, int], what: str) -> int:
    """Index of the tightest profile holding every axis size, so that seq 1 runs on kernels tuned for decode."""
    fitting = [i for i, p in enumerate(profiles) if p.misfit(sizes) is None]
    if not fitting:
        asked = ", ".join(f"{axis} {size}" for axis, size in sizes.items())
        why = "; ".join(f"profile {p.name}: {p.misfit(sizes)}" for p in profiles)
        raise InputError(f"the {what} engine cannot run {asked} ({why}); rebuild the engines with larger limits")
    return min(fitting, key=lambda i: profiles[i].span())


@dataclass(frozen=True)
class Target:
    """What a plan is tied to: TensorRT loads a plan only in the version and on the GPU model that built it."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def refusal(self, here: Target) -> str | None:
        """Why plans built for self cannot run `here`, or None when they can."""
        if self.tensorrt_version != here.tensorrt_version:
            return (
                f"were built with TensorRT {self.tensorrt_version} but this is TensorRT {here.tensorrt_version}"
            )
        if self.compute_capability != here.compute_capability or self.gpu_name != here.gpu_name:
            return (
                f"were built for {self.gpu_name} (compute capability {self.compute_capability}) "
                f"but this GPU is {here.gpu_name} (compute capability {here.compute_capability})"
            )
        return None


@dataclass(frozen=True)
class EngineRecord:
    role: str
    file: str  # plan file, relative to engines/
    onnx_file: str  # graph it was built from, relative to the bundle
    onnx_sha256: str
    profiles: tuple[Profile, ...]
    plan_bytes: int
    device_memory_bytes: tuple[int, ...] = ()  # each profile's context memory, as the build measured it

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "file": self.file,
            "onnx_file": self.onnx_file,
            "onnx_sha256": self.onnx_sha256,
            "profiles": [p.to_dict() for p in self.profiles],
            "plan_bytes": self.plan_bytes,
            "device_memory_bytes": list(self.device_memory_bytes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineRecord:
        data = dict(data)
        data["profiles"] = tuple(Profile.from_dict(p) for p in data["profiles"])
        data["device_memory_bytes"] = tuple(data.get("device_memory_bytes", ()))
        return cls(**data)


@dataclass(frozen=True)
class Engines:
    """The whole engines.json: the target the plans were built for and one record per graph role."""

    target: Target
    engines: Mapping[str, EngineRecord]
    build_options: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def check_target(self, here: Target) -> None:
        """Refuse plans from another TensorRT version or another GPU before TensorRT fails on them obscurely."""
        why = self.target.refusal(here)
        if why is not None:
            raise BackendUnavailableError(f"the bundle's TensorRT engines {why}; {REBUILD}")

    def record_for(self, entry: GraphEntry, sha256: str) -> EngineRecord:
        """The plan for `entry`, refused when it was built from another graph than the one the bundle holds now."""
        record = self.engines.get(entry.role)
        if record is None:
            raise BundleError(f"{ENGINES_DIR}/{ENGINES_FILE} has no engine for the {entry.role} graph; {REBUILD}")
        if record.onnx_file != entry.file or record.onnx_sha256 != sha256:
            raise BundleError(
                f"{ENGINES_DIR}/{record.file} was built from {record.onnx_file} (sha256 {record.onnx_sha256[:12]}) "
                f"but the bundle's {entry.role} graph is now {entry.file} (sha256 {sha256[:12]}); {REBUILD}"
            )
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tensorrt_version": self.target.tensorrt_version,
            "gpu": {"name": self.target.gpu_name, "compute_capability": self.target.compute_capability},
            "created": self.created,
            "build_options": dict(self.build_options),
            "engines": {role: r.to_dict() for role, r in self.engines.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Engines:
        return cls(
            target=Target(data["tensorrt_version"], data["gpu"]["name"], data["gpu"]["compute_capability"]),
            engines={role: EngineRecord.from_dict(r) for role, r in data["engines"].items()},
            build_options=data.get("build_options", {}),
            created=data.get("created", ""),
            schema_version=data["schema_version"],
        )

    def save(self, engines_dir: Path) -> None:
        (engines_dir / ENGINES_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, bundle: Path) -> Engines:
        path = Path(bundle) / ENGINES_DIR / ENGINES_FILE
        if not path.is_file():
            raise BundleError(
                f"bundle {bundle} has no TensorRT engines ({ENGINES_DIR}/{ENGINES_FILE}); build them first "
                "(vl-export build --backend trt)"
            )
        data, version = read_json_with_version(path)
        if version != SCHEMA_VERSION:
            raise BundleError(f"{path} has schema version {version}; this vl-export reads version {SCHEMA_VERSION}; "
                              f"{REBUILD}")
        try:
            engines = cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path} is malformed: {exc!r}") from None
        from .manifest_checks import inside

        inside(bundle, f"{ENGINES_DIR}/{ENGINES_FILE}", ENGINES_FILE)
        for record in engines.engines.values():
            inside(bundle, f"{ENGINES_DIR}/{record.file}", f"{ENGINES_FILE} engines.{record.role}.file")  # no plan from elsewhere
            if not (path.parent / record.file).is_file():
                raise BundleError(f"bundle {bundle} is incomplete: {ENGINES_DIR}/{record.file} is missing; {REBUILD}")
        return engines
