"""Per-image-token targets for the demo's auxiliary loss: what the region of each token of each tile shows.

A ViT learned from scratch through a one-word answer learns slowly: the answer is a few bits per image. During
training only, small linear heads on the projector output (the image embeddings the decoder reads) are also
asked, for every image token, which colour, shape and text cover its 64x64 px region of its tile, and whether an
object's centre lies in it. The heads are dropped when the checkpoint is written; the shipped model is the plain
InternVL2.5 architecture. The regions follow the reference's tiling exactly (same grid, same crops, thumbnail
last) and the pixel shuffle's token order: token r * side + c covers tile rows r and columns c of the
side x side grid of merged patches.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from vl_export.runtime.preprocess import closest_grid, target_grids
from vl_export.spec import ModelSpec

from . import data

COLOUR_CLASSES = ("none", *data.COLOURS, "text")
SHAPE_CLASSES = ("none", *data.SHAPES, "text")
TEXT_CLASSES = ("none", *data.DIGITS)


def tile_grid(width: int, height: int, spec: ModelSpec) -> tuple[int, int]:
    """(cols, rows) as the reference's dynamic_preprocess chooses them."""
    grids = target_grids(spec.min_dynamic_patch, spec.max_dynamic_patch)
    return closest_grid(width, height, grids, spec.image_size)


def tile_labels(labels: Image.Image, spec: ModelSpec) -> np.ndarray:
    """The label map cut exactly as the image is tiled (nearest-neighbour resizes): (tiles, size, size) uint8."""
    size = spec.image_size
    cols, rows = tile_grid(labels.width, labels.height, spec)
    resized = np.asarray(labels.resize((size * cols, size * rows), Image.Resampling.NEAREST))
    tiles = [resized[r * size : (r + 1) * size, c * size : (c + 1) * size] for r in range(rows) for c in range(cols)]
    if spec.use_thumbnail and len(tiles) != 1:
        tiles.append(np.asarray(labels.resize((size, size), Image.Resampling.NEAREST)))
    return np.stack(tiles)


def targets(scene: data.Scene, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Soft class targets per token (tiles, tokens, classes) and the object-centre flags (tiles, tokens)."""
    size, side = spec.image_size, spec.vision.grid // spec.shuffle_factor
    block = size // side
    labels = tile_labels(data.label_map(scene), spec)  # (tiles, size, size)
    things = len(scene.items) + 2  # background, the items, the text
    # Coverage: the fraction of each token's block that each thing covers.
    blocks = labels.reshape(len(labels), side, block, side, block).transpose(0, 1, 3, 2, 4).reshape(len(labels), side * side, -1)
    coverage = np.stack([(blocks == k).mean(-1) for k in range(things)], -1).astype(np.float32)  # (tiles, tokens, things)

    colour = np.zeros((things, len(COLOUR_CLASSES)), np.float32)
    shape = np.zeros((things, len(SHAPE_CLASSES)), np.float32)
    text = np.zeros((things, len(TEXT_CLASSES)), np.float32)
    colour[0, 0] = shape[0, 0] = text[0, 0] = 1
    for i, item in enumerate(scene.items, start=1):
        colour[i, COLOUR_CLASSES.index(item.colour)] = shape[i, SHAPE_CLASSES.index(item.shape)] = text[i, 0] = 1
    colour[-1, -1] = shape[-1, -1] = text[-1, TEXT_CLASSES.index(scene.text)] = 1

    centres = np.zeros((len(labels), side * side), np.float32)  # (tiles, tokens)
    cols, rows = tile_grid(scene.width, scene.height, spec)
    for item in scene.items:
        cx, cy = item.centre
        x, y = cx * size * cols / scene.width, cy * size * rows / scene.height
        col, row = min(int(x // size), cols - 1), min(int(y // size), rows - 1)
        token = min(int(y % size // block), side - 1) * side + min(int(x % size // block), side - 1)
        centres[row * cols + col, token] = 1
        if len(labels) > cols * rows:  # the thumbnail sees the whole image
            token = min(int(cy * side / scene.height), side - 1) * side + min(int(cx * side / scene.width), side - 1)
            centres[-1, token] = 1
    return {
        "colour": torch.from_numpy(coverage @ colour),
        "shape": torch.from_numpy(coverage @ shape),
        "text": torch.from_numpy(coverage @ text),
        "centre": torch.from_numpy(centres),
    }


def token_xy(side: int) -> torch.Tensor:
    """Each token's centre in its tile, in [-1, 1]: (tokens, 2) as (x, y)."""
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


class RegionHeads(nn.Module):
    """Linear read-outs of the image embeddings; used by the auxiliary loss, never saved."""

    def __init__(self, width: int, side: int):
        super().__init__()
        self.colour = nn.Linear(width, len(COLOUR_CLASSES))
        self.shape = nn.Linear(width, len(SHAPE_CLASSES))
        self.text = nn.Linear(width, len(TEXT_CLASSES))
        self.centre = nn.Linear(width, 1)
        self.xy = nn.Linear(width, 2)  # where in its tile the token is, for the left/right/top/bottom questions
        self.register_buffer("token_xy", token_xy(side), persistent=False)

    def loss(self, embeds: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        """embeds (tiles, tokens, width). Soft cross-entropy per class head, weighted towards the tokens that
        show something (most show background), plus the centre flags' BCE and the position regression."""
        weight = 0.05 + (1 - target["colour"][..., 0])  # (tiles, tokens)
        weight = weight / weight.sum()
        # The digit covers a few tokens of a tile: weighted like the rest it got a tenth of the signal and was
        # learnt last (per-token digit accuracy 0.3 after stage 1). Its own term, over its own tokens, fixes that.
        digit = 0.05 + (1 - target["text"][..., 0])
        digit = digit / digit.sum()
        total = embeds.new_zeros(())
        for name, w in (("colour", weight), ("shape", weight), ("text", weight + digit)):
            log_p = torch.log_softmax(getattr(self, name)(embeds), -1)  # (tiles, tokens, classes)
            total = total - ((target[name] * log_p).sum(-1) * w).sum()
        logit = self.centre(embeds).squeeze(-1)  # (tiles, tokens)
        total = total + nn.functional.binary_cross_entropy_with_logits(logit, target["centre"], pos_weight=logit.new_tensor(10.0))
        return total + nn.functional.mse_loss(self.xy(embeds), self.token_xy.expand(embeds.shape[0], -1, -1))

    @torch.no_grad()
    def accuracy(self, embeds: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
        """(right, total) per class head, over the tokens that what the head names covers at least half of:
        a colour or the text for `colour`, a shape for `shape`, the digit's box for `text`."""
        out = {}
        for name in ("colour", "shape", "text"):
            shown = target[name][..., 0] < 0.5
            if name == "shape":
                shown &= target[name][..., -1] < 0.5  # the text class of the shape head is the colour head's job
            predicted = getattr(self, name)(embeds).argmax(-1)
            out[name] = (int((predicted == target[name].argmax(-1))[shown].sum()), int(shown.sum()))
        return out
