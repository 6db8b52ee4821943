"""`vl-export export`: checkpoint -> bundle directory, written aside and moved into place only when whole."""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

import vl_export
from vl_export.errors import VlExportError
from vl_export.files import Progress, check_output, file_sha256, staged_directory, stderr_progress, step
from vl_export.manifest import MANIFEST, ROLES, GraphEntry, Manifest, Preprocessing
from vl_export.runtime.prompt import DEFAULT_SYSTEM_MESSAGE

from . import checkpoint
from .tokenizer import write_tokenizer

PRECISIONS = ("fp32", "fp16")
EMBED_FILE = "embed_tokens.npy"

def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"vl-export": vl_export.__version__, "python": sys.version.split()[0]}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


EMBED_CHUNK_ROWS = 8192


def write_embeddings(model, staging: Path, precision: str) -> dict:
    """The embedding table as .npy (fp16 rows for fp16, int8 and int4 bundles), converted and written a chunk of rows
    at a time: the same file np.save writes, without a whole fp32 copy and a whole converted copy beside the model
    (0.8 GB at Qwen2.5-0.5B's 151,674 x 896, on top of the decoder's fp32 weights during a build)."""
    weight = model.model.language_model.embed_tokens.weight.detach()  # (vocab, hidden), the checkpoint's dtype
    dtype = np.dtype(np.float32 if precision == "fp32" else np.float16)
    shape = tuple(weight.shape)
    with open(staging / EMBED_FILE, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": shape})
        for start in range(0, shape[0], EMBED_CHUNK_ROWS):
            f.write(weight[start : start + EMBED_CHUNK_ROWS].float().numpy().astype(dtype, copy=False).tobytes())
    return {"file": EMBED_FILE, "dtype": str(dtype), "shape": list(shape)}


def new_manifest(ck: checkpoint.Checkpoint, specials: dict[str, int], graphs: list[GraphEntry], embed: dict) -> Manifest:
    spec = ck.spec
    return Manifest(
        model=spec,
        special_tokens=specials,
        system_message=DEFAULT_SYSTEM_MESSAGE,
        preprocessing=Preprocessing(
            image_size=spec.image_size,
            min_tiles=spec.min_dynamic_patch,
            max_tiles=spec.max_dynamic_patch,
            use_thumbnail=spec.use_thumbnail,
        ),
        graphs=graphs,
        embed_tokens=embed,
        max_context=spec.text.max_position_embeddings,
        template=spec.template,
        provenance={
            "source": str(ck.path),
            "source_sha256": ck.sha256,
            "layout": spec.layout,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
        },
    )


# Each graph's torch weights are freed once it is written, the vision tower's and the projector's first: the decoder
# graphs (the largest, and those quantized as they are built, which hold their int8 graph and one fp32 weight beside
# the torch weights) are then made with only the language model's weights left.
EXPORT_ORDER = ("vision_encoder", "projector", "decoder")


def export_graphs(ck: checkpoint.Checkpoint, precision: str, staging: Path, progress: Progress,
                  release_weights: bool = False, quantized: dict | None = None,
                  before_decoder: Callable[[], object] | None = None) -> list[GraphEntry]:
    """The three graphs in `staging`; with `release_weights`, ck.model cannot run afterwards (weights on meta).
    `quantized` ({role: decoder_variants.Quantized}): those graphs are written quantized, straight from the weights.
    `before_decoder` runs just before the decoder is exported (other graphs made from the language model's weights)."""
    from .onnx_export import export_graph

    graphs = {}
    quantized = quantized or {}
    for role in EXPORT_ORDER:
        if role == "decoder" and before_decoder is not None:
            before_decoder()
        q = quantized.get(role)
        what = f"{q.recipe}, straight from the weights" if q else precision
        with step(progress, f"exporting {role} ({what})"):
            entry = export_graph(role, ck.model, ck.spec, precision, staging, release_weights=release_weights,
                                 quantized=q)
            graphs[role] = with_hashes(entry, staging)
    return [graphs[role] for role in ROLES]


def with_hashes(entry: GraphEntry, staging: Path) -> GraphEntry:
    data = staging / (entry.file + ".data")  # ONNX external data of a large graph: its weights, hashed too
    return dataclasses.replace(entry, sha256=file_sha256(staging / entry.file),
                               data_sha256=file_sha256(data) if data.is_file() else None)


def check_out(model: str, out: Path, overwrite: bool) -> None:
    """Before any work: --out must not overlap a local checkpoint, be a symlink, or replace a non-bundle."""
    local = Path(model).expanduser()
    check_output(out, overwrite, [local] if local.exists() else [], must_hold=MANIFEST)


def output_directory(ck: checkpoint.Checkpoint, out: Path, overwrite: bool):
    """The staging directory for `out`, checked again against the resolved checkpoint (a hub id, random:...)."""
    return staged_directory(Path(out), overwrite, protect=[ck.path], must_hold=MANIFEST)


def load_checkpoint(model: str, progress: Progress, stored_dtype: bool = False) -> checkpoint.Checkpoint:
    """The checkpoint in fp32, or (`stored_dtype`, for export) in its stored dtype until each graph is exported."""
    path = checkpoint.resolve(model)
    with step(progress, f"loading {path}"):
        return checkpoint.load(path, stored_dtype)


def write_bundle(ck: checkpoint.Checkpoint, staging: Path, graph_precision: str, progress: Progress,
                 embed_precision: str | None = None, release_weights: bool = False,
                 quantized: dict | None = None, before_decoder: Callable[[], object] | None = None) -> Manifest:
    """Tokenizer, embedding table, the three graphs and the manifest, into `staging`.

    `release_weights` frees each graph's torch weights once it is exported (ck.model is spent afterwards);
    `quantized`, `before_decoder`: see export_graphs."""
    with step(progress, "writing tokenizer.json and proving it against the checkpoint's tokenizer"):
        specials = write_tokenizer(ck.path, staging)
    with step(progress, "writing the embedding table"):
        embed = write_embeddings(ck.model, staging, embed_precision or graph_precision)
    graphs = export_graphs(ck, graph_precision, staging, progress, release_weights, quantized, before_decoder)
    manifest = new_manifest(ck, specials, graphs, embed)
    manifest.save(staging)
    return manifest


def export_bundle(
    model: str, out: Path, precision: str = "fp32", overwrite: bool = False, progress: Progress = stderr_progress
) -> Manifest:
    """Export the checkpoint `model` (a directory, a cached hub id, or random:<preset>) to the bundle `out`."""
    if precision not in PRECISIONS:
        raise VlExportError(f"unknown dtype {precision!r} for export (choose from {', '.join(PRECISIONS)})")
    check_out(model, Path(out), overwrite)
    ck = load_checkpoint(model, progress, stored_dtype=True)
    with output_directory(ck, Path(out), overwrite) as staging:
        manifest = write_bundle(ck, staging, precision, progress, release_weights=True)
    progress(f"bundle written to {Path(out).absolute()}")
    return manifest
