"""Images and video frames to pixel_values, exactly as the InternVL2.5 model card's load_image / load_video.

Decisions, documented in the README: images are opened and converted with `convert('RGB')` as the reference
does, so an alpha channel is dropped (not composited) and EXIF orientation is ignored; pass
`exif_transpose=True` to rotate camera photos upright instead (the answer may then differ from the reference).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vl_export.errors import InputError

ImageInput = Union[str, os.PathLike, bytes, Image.Image]
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)
MAX_TILES = 256  # as the manifest's bound (vl_export.manifest_checks)
MAX_IMAGE_PIXELS = 64_000_000  # decoded pixels per image, read from the header before decoding (as `serve`)
MAX_FRAMES = 1024  # frames sampled from one video


@dataclass(frozen=True)
class TilingConfig:
    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    mean: tuple[float, float, float] = tuple(IMAGENET_MEAN.tolist())
    std: tuple[float, float, float] = tuple(IMAGENET_STD.tolist())
    exif_transpose: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS


def load_image(image: ImageInput, exif_transpose: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, encoded bytes or a PIL image -> an RGB PIL image; one clear error for anything else.

    The pixel count is read from the header and refused over `max_pixels` before anything is decoded: a 17 KB
    PNG can hold 144 megapixels."""
    if isinstance(image, Image.Image):
        pil = image
        name = "the given PIL image"
    else:
        if isinstance(image, (bytes, bytearray)):
            source, name = io.BytesIO(image), "the given image bytes"
        elif isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not path.is_file():
                raise InputError(f"image {path} not found")
            source, name = path, f"image {path}"
        else:
            raise InputError(f"an image must be a path, bytes or a PIL image, not {type(image).__name__}")
        try:
            pil = Image.open(source)
            if pil.width * pil.height > max_pixels:
                raise InputError(f"{name} is {pil.width}x{pil.height} = {pil.width * pil.height} pixels, over the "
                                 f"limit of {max_pixels}")
            pil.load()
        except Image.DecompressionBombError:  # PIL's own check, in open(), far above ours
            raise InputError(f"{name} has more pixels than it may decode, over the limit of {max_pixels}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{name} cannot be decoded as an image ({exc.__class__.__name__})") from None
    if pil.width == 0 or pil.height == 0:
        raise InputError(f"{name} has zero size ({pil.width}x{pil.height})")
    if exif_transpose:
        pil = ImageOps.exif_transpose(pil)
    return pil.convert("RGB")


def target_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """The reference's candidate grids in the reference's order, in O(max_tiles log max_tiles) instead of cubic.

    The reference builds a set with `for n in range(min, max + 1): for i in 1..n: for j in 1..n` and sorts it by
    area; equal-area grids keep the set's iteration order, which decides the tie rule below. A set's order
    depends only on its elements' hashes and their first-insertion order (CPython hashes small-int tuples
    deterministically), so inserting each grid first at the same step as the reference gives the same set:
    grid (i, j) first appears at n = max(min_tiles, i, j), in (i, j) row-major order within that n.
    """
    if not 1 <= min_tiles <= max_tiles <= MAX_TILES:
        raise InputError(f"tile limits min {min_tiles}, max {max_tiles} are not a valid range (1 to {MAX_TILES})")
    grids: set[tuple[int, int]] = set()
    for i in range(1, min_tiles + 1):  # n = min_tiles: every i, j <= min_tiles
        for j in range(1, min_tiles + 1):
            if min_tiles <= i * j <= max_tiles:
                grids.add((i, j))
    for n in range(min_tiles + 1, max_tiles + 1):  # new at n: (i, n) for i < n, then (n, j) for j <= n
        for i in range(1, min(n - 1, max_tiles // n) + 1):
            if min_tiles <= i * n:
                grids.add((i, n))
        for j in range(1, min(n, max_tiles // n) + 1):
            if min_tiles <= n * j:
                grids.add((n, j))
    return sorted(grids, key=lambda x: x[0] * x[1])


def closest_grid(width: int, height: int, grids: Sequence[tuple[int, int]], image_size: int) -> tuple[int, int]:
    aspect_ratio = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for grid in grids:
        diff = abs(aspect_ratio - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * image_size * image_size * grid[0] * grid[1]:
            best = grid
    return best


def tile_image(image: Image.Image, config: TilingConfig) -> list[Image.Image]:
    """The reference's dynamic_preprocess: resize to the chosen grid, crop row-major, thumbnail last."""
    size = config.image_size
    cols, rows = closest_grid(image.width, image.height, target_grids(config.min_tiles, config.max_tiles), size)
    resized = image.resize((size * cols, size * rows))  # PIL's default filter, as the reference
    tiles = [
        resized.crop(((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size))
        for i in range(cols * rows)
    ]
    if config.use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


def normalize(tile: Image.Image, config: TilingConfig) -> np.ndarray:
    """RGB tile -> (3, size, size) float32: bicubic to size (a no-op at size), /255, ImageNet mean and std."""
    if tile.size != (config.image_size, config.image_size):
        tile = tile.resize((config.image_size, config.image_size), Image.Resampling.BICUBIC)
    x = np.asarray(tile, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (size, size, 3)
    x = (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(image: ImageInput, config: TilingConfig = TilingConfig()) -> np.ndarray:
    """One image -> pixel_values (tiles, 3, size, size) float32."""
    if not 1 <= config.min_tiles <= config.max_tiles <= MAX_TILES:
        raise InputError(f"tile limits min {config.min_tiles}, max {config.max_tiles} are not a valid range (1 to {MAX_TILES})")
    tiles = tile_image(load_image(image, config.exif_transpose, config.max_pixels), config)
    return np.stack([normalize(t, config) for t in tiles])


def preprocess_images(images: Sequence[ImageInput], config: TilingConfig = TilingConfig()) -> tuple[np.ndarray, list[int]]:
    """Several images -> all tiles concatenated in order (tiles, 3, size, size), and the tile count per image."""
    per_image = [preprocess(image, config) for image in images]
    if not per_image:
        return np.zeros((0, 3, config.image_size, config.image_size), np.float32), []
    return np.concatenate(per_image), [len(p) for p in per_image]


def frame_indices(num_frames: int, fps: float, num_segments: int, bound: tuple[float, float] | None = None) -> list[int]:
    """The model card's get_index: the centre of each of `num_segments` equal segments."""
    start, end = bound if bound else (-100000, 100000)
    max_frame = num_frames - 1
    start_idx = max(0, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)]


def preprocess_video(video: str | os.PathLike, num_segments: int = 8, config: TilingConfig = TilingConfig()) -> tuple[np.ndarray, list[int]]:
    """A video file -> one tile per sampled frame (frames, 3, size, size), as the card's load_video(max_num=1).

    Two passes over the file: the first counts frames, the second keeps only the sampled ones, so memory does
    not grow with the clip's length."""
    if not isinstance(num_segments, int) or not 1 <= num_segments <= MAX_FRAMES:
        raise InputError(f"the number of video frames must be in [1, {MAX_FRAMES}], got {num_segments}")
    total, fps = count_video_frames(video)
    if total < num_segments:
        raise InputError(f"video {video} has {total} frames, fewer than the {num_segments} asked for")
    indices = frame_indices(total, fps, num_segments)
    one_tile = TilingConfig(**{**config.__dict__, "min_tiles": 1, "max_tiles": 1})
    frames = read_video_frames(video, set(indices))
    pixel_values = [preprocess(frames[i], one_tile) for i in indices]
    return np.concatenate(pixel_values), [len(p) for p in pixel_values]


def _open_video(video: str | os.PathLike):
    try:
        import av
    except ImportError:
        raise InputError("video input needs PyAV: pip install 'vl-export[video]'") from None
    path = Path(video)
    if not path.is_file():
        raise InputError(f"video {path} not found")
    return av, path


def count_video_frames(video: str | os.PathLike) -> tuple[int, float]:
    """(frames, frames per second), decoding but keeping nothing."""
    av, path = _open_video(video)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
            return sum(1 for _ in container.decode(stream)), fps
    except av.error.FFmpegError as exc:
        raise InputError(f"video {path} cannot be decoded ({exc.__class__.__name__})") from None


def read_video_frames(video: str | os.PathLike, keep: set[int] | None = None) -> dict[int, Image.Image]:
    """Decode a video with PyAV (the `video` extra); the frames whose index is in `keep` (all: None) as RGB images."""
    av, path = _open_video(video)
    frames: dict[int, Image.Image] = {}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if keep is None or index in keep:
                    frames[index] = frame.to_image().convert("RGB")
    except av.error.FFmpegError as exc:
        raise InputError(f"video {path} cannot be decoded ({exc.__class__.__name__})") from None
    return frames
