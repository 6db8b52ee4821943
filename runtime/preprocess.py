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


@dataclass(frozen=True)
class TilingConfig:
    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    mean: tuple[float, float, float] = tuple(IMAGENET_MEAN.tolist())
    std: tuple[float, float, float] = tuple(IMAGENET_STD.tolist())
    exif_transpose: bool = False


def load_image(image: ImageInput, exif_transpose: bool = False) -> Image.Image:
    """A path, encoded bytes or a PIL image -> an RGB PIL image; one clear error for anything else."""
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
            pil.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{name} cannot be decoded as an image ({exc.__class__.__name__})") from None
    if pil.width == 0 or pil.height == 0:
        raise InputError(f"{name} has zero size ({pil.width}x{pil.height})")
    if exif_transpose:
        pil = ImageOps.exif_transpose(pil)
    return pil.convert("RGB")


def target_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    # Built and sorted exactly as the reference: equal-area grids keep the set's iteration order, which
    # decides the tie rule below; CPython hashes small-int tuples deterministically.
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
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
    if config.max_tiles < config.min_tiles or config.min_tiles < 1:
        raise InputError(f"tile limits min {config.min_tiles}, max {config.max_tiles} are not a valid range")
    tiles = tile_image(load_image(image, config.exif_transpose), config)
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
    """A video file -> one tile per sampled frame (frames, 3, size, size), as the card's load_video(max_num=1)."""
    frames = read_video_frames(video)
    if len(frames) < num_segments:
        raise InputError(f"video {video} has {len(frames)} frames, fewer than the {num_segments} asked for")
    fps = frames.fps
    one_tile = TilingConfig(**{**config.__dict__, "min_tiles": 1, "max_tiles": 1})
    pixel_values = [preprocess(frames[i], one_tile) for i in frame_indices(len(frames), fps, num_segments)]
    return np.concatenate(pixel_values), [len(p) for p in pixel_values]


class _Frames(list):
    fps: float = 0.0


def read_video_frames(video: str | os.PathLike) -> _Frames:
    """Decode every frame of a video with PyAV (the `video` extra) as RGB PIL images."""
    try:
        import av
    except ImportError:
        raise InputError("video input needs PyAV: pip install 'vl-export[video]'") from None
    path = Path(video)
    if not path.is_file():
        raise InputError(f"video {path} not found")
    frames = _Frames()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            frames.fps = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
            for frame in container.decode(stream):
                frames.append(frame.to_image().convert("RGB"))
    except av.error.FFmpegError as exc:
        raise InputError(f"video {path} cannot be decoded ({exc.__class__.__name__})") from None
    return frames
