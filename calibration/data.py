"""Calibration data: images and prompts, tiled and spliced exactly as at run time, turned into graph feeds.

The fp32 bundle itself produces the feeds of the later graphs: the vision encoder's outputs feed the projector's
calibration, and the runtime's own prompt building and splice make the decoder's prefill-shaped inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vl_export.calibration import DEFAULT_MAX_TILES
from vl_export.errors import InputError
from vl_export.runtime.pipeline import Pipeline
from vl_export.runtime.preprocess import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_PROMPTS = (
    "Describe the image in detail.",
    "What objects are in the image and what colours are they?",
    "How many shapes are there? Answer with a number.",
    "Read the text in the image.",
    "Where is the largest object?",
    "请描述这张图片。",
)


def default_images() -> list[Image.Image]:
    """A small built-in set: drawings of shapes and text at the aspect ratios photos come in, one noise image."""
    rng = np.random.default_rng(2025)
    images = []
    font = ImageFont.load_default()
    # 7 + 3 + 1 + 4 + 3 + 3 tiles: 2x3 and 3x2 photos, a square, a panorama, a portrait; thumbnails included.
    for i, (w, h) in enumerate([(1344, 896), (448, 896), (448, 448), (1600, 500), (896, 448), (700, 1400)]):
        background = tuple(int(v) for v in rng.integers(150, 256, 3))
        image = Image.new("RGB", (w, h), background)
        draw = ImageDraw.Draw(image)
        for _ in range(4 + i):
            x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 60)
            size = int(rng.integers(40, max(41, min(w, h) // 3)))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            box = (x0, y0, min(w, x0 + size), min(h, y0 + size))
            [draw.ellipse, draw.rectangle][int(rng.integers(0, 2))](box, fill=colour)
        draw.text((w // 10, h // 10), f"Sample {i}: 7 cats, 3 dogs", fill=(0, 0, 0), font=font)
        images.append(image)
    images.append(Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)))  # texture, one tile
    return images


@dataclass
class CalibrationSet:
    images: list = field(default_factory=default_images)  # paths or PIL images
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    source: str = "built-in"
    max_tiles: int | None = DEFAULT_MAX_TILES  # None: every tile of every image

    @classmethod
    def from_paths(cls, images_dir: str | Path | None = None, prompts_file: str | Path | None = None,
                   max_tiles: int | None = DEFAULT_MAX_TILES) -> CalibrationSet:
        if max_tiles is not None and max_tiles < 1:
            raise InputError(f"--calib-tiles must be at least 1 (or 'all'), not {max_tiles}")
        data = cls(max_tiles=max_tiles)
        if images_dir is not None:
            directory = Path(images_dir)
            if not directory.is_dir():
                raise InputError(f"calibration image directory {directory} not found")
            files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"calibration image directory {directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for file in files:
                load_image(file)  # an unreadable image fails here, naming the file
            data.images, data.source = files, str(directory)
        if prompts_file is not None:
            path = Path(prompts_file)
            if not path.is_file():
                raise InputError(f"calibration prompts file {path} not found")
            prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
            if not prompts:
                raise InputError(f"calibration prompts file {path} is empty")
            data.prompts = prompts
        return data

    def sha256(self) -> str:
        """Identifies the data, so a rebuild on the same data reuses the calibration cache."""
        digest = hashlib.sha256()
        for image in self.images:
            pil = load_image(image)
            digest.update(f"{pil.size}".encode())
            digest.update(np.asarray(pil).tobytes())
        for prompt in self.prompts:
            digest.update(prompt.encode() + b"\0")
        digest.update(f"tiles<={self.max_tiles}".encode())  # another cap calibrates on other tiles
        return digest.hexdigest()

    def pixel_values(self, pipe: Pipeline) -> list[np.ndarray]:
        """Each image's tiles as at run time (thumbnails included): [(tiles, 3, 448, 448)]."""
        return [pipe.prepare("", images=[image]).pixel_values for image in self.images]

    def tiles(self, pipe: Pipeline) -> Tiles:
        """The calibration tiles (at most `max_tiles`, see `chosen_tiles`), (1, 3, 448, 448) each, made one image at a
        time as they are read."""
        return Tiles(self.images, pipe, self.max_tiles)

    def vision_feeds(self, pipe: Pipeline, tiles_per_feed: int = 1) -> Iterator[dict[str, np.ndarray]]:
        for pixels in self.pixel_values(pipe):
            for start in range(0, len(pixels), tiles_per_feed):
                yield {"pixel_values": pixels[start : start + tiles_per_feed]}

    def projector_feeds(self, pipe: Pipeline, tiles_per_feed: int = 1) -> Iterator[dict[str, np.ndarray]]:
        for feed in self.vision_feeds(pipe, tiles_per_feed):
            yield {"vision_features": pipe.vision.run(feed)["vision_features"]}

    def decoder_feeds(self, pipe: Pipeline) -> Iterator[dict[str, np.ndarray]]:
        """Prefill inputs: each prompt with one of the images spliced in, empty KV cache, last-position logits."""
        spec = pipe.manifest.model.text
        entry = pipe.manifest.graph("decoder")
        kv_dtype = entry.inputs[4].dtype
        for i, prompt in enumerate(self.prompts):
            request = pipe.prepare(prompt, images=[self.images[i % len(self.images)]])
            embeds = pipe.splice(request.ids, pipe.encode_images(request.pixel_values))[None]  # (1, s, hidden)
            s = embeds.shape[1]
            feed = {
                "inputs_embeds": embeds,
                "attention_mask": np.ones((1, s), np.int64),
                "position_ids": np.arange(s, dtype=np.int64)[None],
                "logits_positions": np.array([[s - 1]], np.int64),
            }
            for t in entry.inputs[4:]:
                feed[t.name] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), kv_dtype)
            yield feed


def chosen_tiles(crops: list[int], thumbnails: list[bool], limit: int | None) -> list[list[int]]:
    """Which of each image's tiles calibrate, at most `limit` in all (None: every tile).

    An image's tiles are its crops (indices 0..crops-1, as the runtime makes them) and, after them, its thumbnail.
    Every image gives its whole view first (the thumbnail, or its only tile), so each image is seen; then the
    images give crops in turns, one each per round, and each image's chosen crops are spread evenly over its grid.
    """
    per_image = [c + t for c, t in zip(crops, thumbnails)]
    if limit is None or limit >= sum(per_image):
        return [list(range(n)) for n in per_image]
    taken = [0] * len(crops)
    left = limit
    while left > 0:  # round-robin: the whole view first (round 0), then one more crop per image per round
        progressed = False
        for i, n in enumerate(per_image):
            if left and taken[i] < n:
                taken[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    chosen = []
    for c, thumb, k in zip(crops, thumbnails, taken):
        m = k - 1 if thumb and k else k  # crops taken; the centres of m equal runs of the c crops
        spread = [int((j + 0.5) * c / m) for j in range(m)]
        chosen.append(spread + ([c] if thumb and k else []))
    return chosen


class Tiles:
    """The calibration tiles as a sized, lazy sequence: chosen and counted up front from the tiling rule alone (for
    the progress estimate), made one image at a time, so a large calibration set never sits in memory as pixels."""

    def __init__(self, images: list, pipe: Pipeline, limit: int | None = None):
        from vl_export.runtime.preprocess import closest_grid, target_grids

        self._images, self._pipe = images, pipe
        t = pipe.tiling
        grids = target_grids(t.min_tiles, t.max_tiles)
        crops, thumbnails = [], []
        for image in images:
            pil = load_image(image)
            cols, rows = closest_grid(pil.width, pil.height, grids, t.image_size)
            crops.append(cols * rows)
            thumbnails.append(t.use_thumbnail and cols * rows != 1)
        self.total = sum(crops) + sum(thumbnails)  # every tile of every image
        self._chosen = chosen_tiles(crops, thumbnails, limit)

    def __len__(self) -> int:
        return sum(map(len, self._chosen))

    def __iter__(self) -> Iterator[np.ndarray]:
        for image, chosen in zip(self._images, self._chosen):
            if not chosen:
                continue
            pixels = self._pipe.prepare("", images=[image]).pixel_values  # (tiles, 3, 448, 448)
            for i in chosen:
                yield pixels[i : i + 1]
