"""TensorRT build options and the optimization profiles of each graph, computed from the bundle's manifest.

Why two decoder profiles: TensorRT picks every kernel for the profile's opt shape. Prefill runs thousands of
positions at once (GEMMs); decode runs one position per step (GEMVs over the whole KV cache) and is where generation
spends its time. One profile spanning seq 1..max tunes for one of the two and leaves the other on kernels chosen for
shapes it never sees, so the default builds a prefill profile (opt: one image plus a short question) and a decode
profile (seq pinned to 1, opt: a cache of that prompt). The runtime picks the tightest profile holding a request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vl_export.engines import Profile
from vl_export.errors import VlExportError
from vl_export.manifest import Manifest

# Tokens of template, system message and question around the image tokens of a typical single-image prompt.
TYPICAL_TEXT_TOKENS = 128
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's builder_optimization_level: 0 fastest build .. 5 slowest; default 3


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 1  # sequences per decoder run (batch_chat pads them to one batch)
    max_tiles: int | None = None  # tiles per vision run; None: the manifest's max_tiles + 1 for the thumbnail
    opt_tiles: int | None = None  # tiles the vision kernels are tuned for; None: one photo's tiles (see below)
    max_context: int | None = None  # caps the manifest's max_context: activation memory grows with it
    split_decoder_profiles: bool = True  # prefill + decode profiles (see the module docstring); False: one profile
    optimization_level: int | None = None  # None: TensorRT's default
    workspace_bytes: int | None = None  # None: TensorRT's default (all of the GPU's memory)
    timing_cache: Path | None = None  # also read from / saved to this file, shared between bundles and builds
    inspect: bool = False  # write engines/<role>.layers.json with IEngineInspector (builds with DETAILED verbosity)
    device: int = 0

    def __post_init__(self):
        for name in ("max_batch", "max_tiles", "opt_tiles", "max_context", "workspace_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise VlExportError(f"{name} must be at least 1, got {value}")
        if self.optimization_level is not None and self.optimization_level not in OPTIMIZATION_LEVELS:
            raise VlExportError(f"optimization_level must be 0..5, got {self.optimization_level}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        return data


@dataclass(frozen=True)
class ProfileSizes:
    """Every number the profiles need, resolved once from the manifest and the options."""

    max_batch: int
    max_tiles: int
    opt_tiles: int
    max_context: int
    prefill_opt_seq: int
    decode_opt_past: int


def resolve_sizes(manifest: Manifest, options: BuildOptions) -> ProfileSizes:
    pre = manifest.preprocessing
    photo_tiles = pre.max_tiles + int(pre.use_thumbnail and pre.max_tiles > 1)
    max_tiles = options.max_tiles or photo_tiles
    # Common photo aspect ratios (4:3, 16:9) tile into 8-12 tiles plus the thumbnail, so one photo is the typical run.
    opt_tiles = options.opt_tiles or min(photo_tiles, max_tiles)
    if opt_tiles > max_tiles:
        raise VlExportError(f"opt_tiles {opt_tiles} is more than max_tiles {max_tiles}")
    if options.max_context and options.max_context > manifest.max_context:
        raise VlExportError(
            f"max_context {options.max_context} is more than the model's {manifest.max_context} positions"
        )
    max_context = options.max_context or manifest.max_context
    prefill_opt_seq = min(max_context, opt_tiles * manifest.model.num_image_tokens + TYPICAL_TEXT_TOKENS)
    return ProfileSizes(
        max_batch=options.max_batch,
        max_tiles=max_tiles,
        opt_tiles=opt_tiles,
        max_context=max_context,
        prefill_opt_seq=prefill_opt_seq,
        decode_opt_past=min(max_context - 1, prefill_opt_seq),
    )


def vision_profiles(sizes: ProfileSizes) -> list[Profile]:
    """vision_encoder and projector: tiles is their only dynamic axis."""
    return [Profile("tiles", {"tiles": (1, sizes.opt_tiles, sizes.max_tiles)})]


def decoder_profiles(sizes: ProfileSizes, split: bool = True) -> list[Profile]:
    c, batch = sizes.max_context, (1, 1, sizes.max_batch)
    seq = sizes.prefill_opt_seq
    # past may be > 0 in a prefill too: a follow-up turn or a chunk prefilled on top of an existing cache.
    prefill = Profile(
        "prefill",
        {"batch": batch, "seq": (1, seq, c), "past": (0, 0, c - 1), "total": (1, seq, c), "num_logits": (1, 1, c)},
    )
    if not split:
        return [prefill]
    past = sizes.decode_opt_past
    decode = Profile(
        "decode",
        {
            "batch": batch,
            "seq": (1, 1, 1),
            "past": (0, past, c - 1),
            "total": (1, past + 1, c),
            "num_logits": (1, 1, 1),
        },
    )
    return [prefill, decode]


def graph_profiles(role: str, sizes: ProfileSizes, options: BuildOptions) -> list[Profile]:
    if role == "decoder":
        return decoder_profiles(sizes, options.split_decoder_profiles)
    return vision_profiles(sizes)
