"""TensorRT build options and the optimization profiles of each graph, computed from the bundle's manifest.

Why two decoder profiles: TensorRT picks every kernel for the profile's opt shape. Prefill runs thousands of
positions at once (GEMMs); decode runs one position per step (GEMVs over the whole KV cache) and is where generation
spends its time. One profile spanning seq 1..max tunes for one of the two and leaves the other on kernels chosen for
shapes it never sees, so the default builds a prefill profile (opt: one image plus a short question) and a decode
profile (seq pinned to 1, opt: a cache of that prompt). The runtime picks the tightest profile holding a request.

Why bounds below the model's 32,768 positions: an execution context reserves device memory for its profile's largest
shapes, and the prefill's attention is (heads, seq, total) per sequence in fp32 (the tiled mask, the scores, their
softmax): at seq = total = 32,768 the mask alone is ~28 GiB. So the prefill profile takes chunks of at most
`prefill_chunk` positions (the runtime prefills a longer prompt chunk by chunk on the cache), and the total context
defaults to what half of the GPU's memory holds at that chunk. The build then prints each profile's real device
memory (getDeviceMemorySizeForProfileV2) and refuses an engine whose contexts cannot be created.

Vision engines are tuned for what runs: the pipeline splits a photo's tiles into runs of TILES_PER_RUN (8), so the
default vision profile is 1..8 tiles with its optimum at 8 (a 13-tile photo runs as 8 + 5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vl_export.engines import Profile
from vl_export.errors import VlExportError
from vl_export.manifest import Manifest
from vl_export.runtime.pipeline import TILES_PER_RUN
from vl_export.spec import TextSpec

# Tokens of template, system message and question around the image tokens of a typical single-image prompt.
TYPICAL_TEXT_TOKENS = 128
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's builder_optimization_level: 0 fastest build .. 5 slowest; default 3
DEFAULT_PREFILL_CHUNK = 4096  # positions per prefill run: a one-photo prompt (13 tiles: 3,456 tokens) in one run
ATTENTION_COPIES = 3  # fp32 (batch, heads, seq, total) tensors live at once in a prefill: tiled mask, scores, softmax
DECODER_MEMORY_SHARE = 0.5  # of the GPU's memory, for the decoder's prefill activations and KV cache


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 1  # sequences per decoder run (batch_chat pads them to one batch)
    max_tiles: int | None = None  # tiles per vision run; None: the pipeline's TILES_PER_RUN (or a photo's, if fewer)
    opt_tiles: int | None = None  # tiles the vision kernels are tuned for; None: max_tiles (the pipeline's runs)
    max_context: int | None = None  # positions (prompt + answer) per sequence; None: what the GPU's memory holds
    prefill_chunk: int | None = None  # positions per prefill run; None: DEFAULT_PREFILL_CHUNK (or max_context)
    split_decoder_profiles: bool = True  # prefill + decode profiles (see the module docstring); False: one profile
    optimization_level: int | None = None  # None: TensorRT's default
    workspace_bytes: int | None = None  # None: TensorRT's default (all of the GPU's memory)
    timing_cache: Path | None = None  # also read from / saved to this file, shared between bundles and builds
    inspect: bool = False  # write engines/<role>.layers.json with IEngineInspector (builds with DETAILED verbosity)
    device: int = 0

    def __post_init__(self):
        for name in ("max_batch", "max_tiles", "opt_tiles", "max_context", "prefill_chunk", "workspace_bytes"):
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
    """Every number the profiles need, resolved once from the manifest, the options and the GPU's memory."""

    max_batch: int
    max_tiles: int
    opt_tiles: int
    max_context: int
    prefill_chunk: int
    prefill_opt_seq: int
    decode_opt_past: int


def prefill_bytes_per_position(text: TextSpec, max_batch: int, prefill_chunk: int) -> int:
    """Device memory one position of context costs at the largest prefill shape: the fp32 attention tensors of a
    chunk over it, and its keys and values (fp32, two buffers: the cache's past and present) in every layer."""
    attention = text.num_heads * prefill_chunk * 4 * ATTENTION_COPIES
    kv = 2 * text.num_layers * text.num_kv_heads * text.head_dim * 4 * 2
    return max_batch * (attention + kv)


def context_for_memory(text: TextSpec, max_batch: int, prefill_chunk: int, gpu_memory_bytes: int) -> int:
    """The longest context (a power of two) whose prefill fits in DECODER_MEMORY_SHARE of the GPU (an estimate; the
    build prints and checks the engine's real device memory)."""
    fit = int(gpu_memory_bytes * DECODER_MEMORY_SHARE) // prefill_bytes_per_position(text, max_batch, prefill_chunk)
    return 1 << (fit.bit_length() - 1) if fit > 0 else 0


def resolve_sizes(manifest: Manifest, options: BuildOptions, gpu_memory_bytes: int | None = None) -> ProfileSizes:
    """gpu_memory_bytes bounds the default max_context (None: the model's context, for planning without a GPU)."""
    pre, model = manifest.preprocessing, manifest.model
    photo_tiles = pre.max_tiles + int(pre.use_thumbnail and pre.max_tiles > 1)
    max_tiles = options.max_tiles or min(photo_tiles, TILES_PER_RUN)
    opt_tiles = options.opt_tiles or max_tiles
    if opt_tiles > max_tiles:
        raise VlExportError(f"opt_tiles {opt_tiles} is more than max_tiles {max_tiles}")
    if options.max_context and options.max_context > manifest.max_context:
        raise VlExportError(
            f"max_context {options.max_context} is more than the model's {manifest.max_context} positions"
        )
    chunk = options.prefill_chunk or min(DEFAULT_PREFILL_CHUNK, options.max_context or manifest.max_context)
    max_context = options.max_context or manifest.max_context
    if options.max_context is None and gpu_memory_bytes is not None:
        fit = context_for_memory(model.text, options.max_batch, chunk, gpu_memory_bytes)
        if fit < chunk:
            raise VlExportError(
                f"{DECODER_MEMORY_SHARE:.0%} of the GPU's {gpu_memory_bytes / (1 << 30):.1f} GiB holds {fit} positions "
                f"at batch {options.max_batch}, less than one prefill chunk of {chunk}; pass a smaller --prefill-chunk"
            )
        max_context = min(max_context, fit)
    if chunk > max_context:
        raise VlExportError(f"prefill_chunk {chunk} is more than max_context {max_context}")
    # One photo's prompt: the typical prefill, and the cache the typical decode step reads.
    photo_prompt = photo_tiles * model.num_image_tokens + TYPICAL_TEXT_TOKENS
    prefill_opt_seq = min(chunk, photo_prompt)
    return ProfileSizes(
        max_batch=options.max_batch,
        max_tiles=max_tiles,
        opt_tiles=opt_tiles,
        max_context=max_context,
        prefill_chunk=chunk,
        prefill_opt_seq=prefill_opt_seq,
        decode_opt_past=min(max_context - 1, photo_prompt),
    )


def vision_profiles(sizes: ProfileSizes) -> list[Profile]:
    """vision_encoder and projector: tiles is their only dynamic axis."""
    return [Profile("tiles", {"tiles": (1, sizes.opt_tiles, sizes.max_tiles)})]


def decoder_profiles(sizes: ProfileSizes, split: bool = True) -> list[Profile]:
    c, chunk, batch = sizes.max_context, sizes.prefill_chunk, (1, 1, sizes.max_batch)
    seq = sizes.prefill_opt_seq
    # past may be > 0 in a prefill too: a follow-up turn or a chunk prefilled on top of an existing cache.
    prefill = Profile(
        "prefill",
        {"batch": batch, "seq": (1, seq, chunk), "past": (0, 0, c - 1), "total": (1, seq, c),
         "num_logits": (1, 1, chunk)},
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
