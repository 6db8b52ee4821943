"""The bundle's manifest.json: the one contract between build time and run time, versioned."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError
from .files import read_json_with_version
from .spec import ModelSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROLES = ("vision_encoder", "projector", "decoder")

# The model card's preprocessing: ImageNet statistics, bicubic tiles of 448.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: tuple[int | str, ...]  # symbolic axes by name: tiles, batch, seq, past, total, num_logits

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class GraphEntry:
    role: str  # vision_encoder | projector | decoder
    file: str
    precision: str  # fp32 | fp16 | int8
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    recipe: str | None = None  # how the precision was reached, e.g. "w8a8-minmax" or "weight-only-int8"
    backends: tuple[str, ...] | None = None  # None: any backend; else only these (a backend-specific variant)
    sha256: str | None = None
    data_sha256: str | None = None  # the ONNX external data file `<file>.data`, when the graph has one
    # How the graph was made, where its IO alone does not say: None for the exported graphs, "gqa" for the ONNX
    # Runtime decoder built from the weights with GroupQueryAttention (export/graphs_gqa.py). Left out of the JSON
    # when None, so bundles without it read as before.
    form: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphEntry:
        data = dict(data)
        data["inputs"] = tuple(TensorSpec.from_dict(t) for t in data["inputs"])
        data["outputs"] = tuple(TensorSpec.from_dict(t) for t in data["outputs"])
        if data.get("backends") is not None:
            data["backends"] = tuple(data["backends"])
        return cls(**data)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class Manifest:
    model: ModelSpec
    special_tokens: dict[str, int]
    system_message: str
    preprocessing: Preprocessing
    graphs: list[GraphEntry]
    embed_tokens: dict[str, Any]  # {"file", "dtype", "shape"}
    max_context: int
    tokenizer: str = "tokenizer.json"
    template: str = "internvl2_5"
    provenance: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    engines: str | None = None  # engines/engines.json when TensorRT plans were built
    schema_version: int = SCHEMA_VERSION

    def graph(self, role: str, backend: str | None = None) -> GraphEntry:
        """The graph for `role`: a variant made for `backend` if the bundle holds one, else the generic one."""
        candidates = [g for g in self.graphs if g.role == role]
        for g in candidates:
            if backend is not None and g.backends and backend in g.backends:
                return g
        for g in candidates:
            if g.backends is None:
                return g
        raise BundleError(f"the bundle has no {role} graph for backend {backend or 'any'}")

    @property
    def num_layers(self) -> int:
        return self.model.text.num_layers

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        for graph in data["graphs"]:
            if graph["form"] is None:
                del graph["form"]
        return {"schema_version": self.schema_version, **{k: v for k, v in data.items() if k != "schema_version"}}

    def save(self, bundle: Path) -> None:
        (bundle / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["model"] = ModelSpec.from_dict(data["model"])
        data["preprocessing"] = Preprocessing(**{
            k: tuple(v) if isinstance(v, list) else v for k, v in data["preprocessing"].items()
        })
        data["graphs"] = [GraphEntry.from_dict(g) for g in data["graphs"]]
        return cls(**data)

    @classmethod
    def load(cls, bundle: Path | str) -> Manifest:
        bundle = Path(bundle)
        path = bundle / MANIFEST
        if not bundle.is_dir():
            raise BundleError(f"bundle {bundle} not found: no such directory")
        if not path.is_file():
            raise BundleError(f"{bundle} is not a vl-export bundle: it has no {MANIFEST}")
        from .manifest_checks import inside

        inside(bundle, MANIFEST, MANIFEST)  # a manifest.json symlinked elsewhere is not read
        data, version = read_json_with_version(path)
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {version} is not supported by this vl-export (it reads version "
                f"{SCHEMA_VERSION}); rebuild the bundle with this version"
            )
        from .manifest_checks import check_raw

        check_raw(data, bundle)  # types, ranges, hashes, and every named file inside the bundle
        try:
            manifest = cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{path} is malformed: {exc}") from None
        for name in [manifest.tokenizer, manifest.embed_tokens["file"], *(g.file for g in manifest.graphs)]:
            if not (bundle / name).is_file():
                raise BundleError(f"bundle {bundle} is incomplete: {name} is missing")
        return manifest
