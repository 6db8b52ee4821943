"""Synthetic visual questions for the demo model: coloured shapes, counts, positions and a drawn digit.

Every example comes from one integer seed, so the data set is a function, not a folder. Training draws seeds
below HELDOUT_SEED; the held-out set is `heldout(n)`, seeds HELDOUT_SEED + i, never seen in training.
Images are large and oddly shaped (300-1600 px a side, aspect ratios 1:3 to 3:1) so that the reference's
dynamic tiling cuts them into several tiles plus a thumbnail; shapes are sized in *tile* pixels so that each
one spans three to six 32-px patches of the tile it lands in, whatever the image's size. A scene shows one to
three copies of one shape in one colour, and a digit: a task a 3M-parameter model learns on two CPU cores in
about an hour.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from vl_export.runtime.preprocess import closest_grid, target_grids

HELDOUT_SEED = 1_000_000  # training seeds are 0 .. HELDOUT_SEED - 1
MAX_TILES = 6  # the demo's max_dynamic_patch; sizes are planned for this tiling
TILE = 448

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (250, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple("0123456789")
TEXT_COLOUR = (20, 20, 20)
KINDS = ("colour", "shape", "count", "position", "text")
MAX_SHAPES = 3


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    items: tuple[Item, ...]
    text: str
    text_xy: tuple[int, int]
    font_size: int


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    kind: str
    seed: int


# --- scenes ----------------------------------------------------------------------------------------------


def _image_size(rng: random.Random) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(0.0, math.log(3.0)))  # long side / short side, 1 .. 3
    long_side = rng.uniform(max(300.0, 300.0 * aspect), 1600.0)
    size = (round(long_side), round(long_side / aspect))
    return size if rng.random() < 0.5 else size[::-1]


def _tile_scale(width: int, height: int, max_tiles: int = MAX_TILES) -> float:
    """Image pixels -> pixels of the tiles the reference's tiling cuts (the smaller of the two axes' scales)."""
    cols, rows = closest_grid(width, height, target_grids(1, max_tiles), TILE)
    return min(TILE * cols / width, TILE * rows / height)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _place(rng: random.Random, w: int, h: int, size: tuple[int, int], taken: list, gap: int):
    """A free box of `size` inside (w, h), `gap` px away from every box in `taken`; None when none is found."""
    bw, bh = size
    if bw + 2 * gap > w or bh + 2 * gap > h:
        return None
    for _ in range(200):
        x0, y0 = rng.randint(gap, w - bw - gap), rng.randint(gap, h - bh - gap)
        box = (x0, y0, x0 + bw, y0 + bh)
        if all(box[0] >= t[2] + gap or box[2] + gap <= t[0] or box[1] >= t[3] + gap or box[3] + gap <= t[1] for t in taken):
            return box
    return None


def make_scene(rng: random.Random, max_shapes: int = MAX_SHAPES, grow: float = 1.0, tile_view: bool = False) -> Scene:
    """A random scene; `grow` > 1 draws larger shapes (a training curriculum; evaluation uses 1).

    `tile_view`: a scene for vision pretraining instead, that one 448 px tile holds whole, squeezed along one
    axis up to 3x as a thumbnail squeezes; its shapes are as large in tile pixels as the scenes' are.
    """
    while True:
        if tile_view:
            width, height = (round(TILE * math.exp(rng.uniform(0.0, math.log(3.0)))) for _ in range(2))
            scale = max(TILE / width, TILE / height)  # shapes normal along the less squeezed axis
        else:
            width, height = _image_size(rng)
            scale = _tile_scale(width, height)
        background = tuple(rng.randint(225, 255) for _ in range(3))
        taken: list[tuple[int, int, int, int]] = []
        # The digit first, so that it always fits: 130-190 tile px high.
        text = rng.choice(DIGITS)
        font_size = max(12, round(rng.uniform(130, 190) / scale))
        x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font(font_size))
        gap = max(6, round(16 / scale))
        box = _place(rng, width, height, (x1 - x0, y1 - y0), taken, gap)
        if box is None:
            continue
        taken.append(box)
        text_xy = (box[0] - x0, box[1] - y0)
        items = []
        count = rng.randint(max_shapes // 2 if tile_view else 1, max_shapes)
        # A scene shows copies of one shape in one colour (questions about the scene have one answer); the
        # vision pretraining's tiles mix shapes and colours, one object per colour.
        kinds = [(rng.choice(SHAPES), c) for c in rng.sample(list(COLOURS), count)] if tile_view else \
            [(rng.choice(SHAPES), rng.choice(list(COLOURS)))] * count
        for shape, colour in kinds:
            side = round(rng.uniform(110, 190) * grow / scale)  # 3.4 to 6 patches of 32 px at grow 1
            box = _place(rng, width, height, (side, side), taken, gap)
            if box is None:
                break
            taken.append(box)
            items.append(Item(shape, colour, box))
        if items:
            return Scene(width, height, background, tuple(items), text, text_xy, font_size)


def _draw_item(draw: ImageDraw.ImageDraw, item: Item, fill) -> None:
    x0, y0, x1, y1 = item.box
    if item.shape == "circle":
        draw.ellipse(item.box, fill=fill)
    elif item.shape == "square":
        draw.rectangle(item.box, fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        _draw_item(draw, item, COLOURS[item.colour])
    draw.text(scene.text_xy, scene.text, fill=TEXT_COLOUR, font=_font(scene.font_size), stroke_width=_stroke(scene), stroke_fill=TEXT_COLOUR)
    return image


def _stroke(scene: Scene) -> int:
    return max(1, scene.font_size // 14)


def text_box(scene: Scene) -> tuple[int, int, int, int]:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return draw.textbbox(scene.text_xy, scene.text, font=_font(scene.font_size), stroke_width=_stroke(scene))


def label_map(scene: Scene) -> Image.Image:
    """Which thing covers each pixel, as an "L" image: 0 background, i + 1 item i, len(items) + 1 the text's box."""
    labels = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(labels)
    for i, item in enumerate(scene.items):
        _draw_item(draw, item, i + 1)
    draw.rectangle(text_box(scene), fill=len(scene.items) + 1)
    return labels


# --- questions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One thing a scene answers, with the phrasings that ask it (a conversation asks each fact once)."""

    phrasings: tuple[str, ...]
    answer: str


def facts(scene: Scene, kind: str) -> list[Fact]:
    """Every fact of `kind` that the scene answers unambiguously (its objects share one shape and one colour)."""
    items = scene.items
    shape, colour, n = items[0].shape, items[0].colour, len(items)
    out: list[Fact] = []
    if kind == "colour":
        if n == 1:
            out.append(Fact((f"What colour is the {shape}?", f"What color is the {shape}?", "Which colour is the shape?"), colour))
        else:
            out.append(Fact((f"What colour are the {shape}s?", f"What color are the {shape}s?", "Which colour are the shapes?"), colour))
    elif kind == "shape":
        out.append(Fact((f"What shape is {colour}?", "What shape is drawn?", "Which shape can you see?"), shape))
    elif kind == "count":
        out.append(Fact(("How many shapes are there?", f"How many {shape}s are there?", f"Count the {colour} shapes."), str(n)))
    elif kind == "position":
        if n == 1:
            cx, cy = items[0].centre
            dx, dy = cx / scene.width - 0.5, cy / scene.height - 0.5
            name = f"{colour} {shape}"
            if abs(dx) > 0.15:  # clearly off the middle, so that the answer is not a matter of pixels
                out.append(Fact((f"Is the {name} on the left or the right?", f"Is the {name} on the right or the left side of the image?"), "left" if dx < 0 else "right"))
            if abs(dy) > 0.15:
                out.append(Fact((f"Is the {name} at the top or the bottom?", f"Is the {name} in the bottom or the top half of the image?"), "top" if dy < 0 else "bottom"))
    elif kind == "text":
        out.append(Fact(("What digit is written in the image?", "Which number is written on the picture?", "What number can you read in the image?"), scene.text))
    else:
        raise ValueError(f"unknown question kind {kind!r} (kinds: {', '.join(KINDS)})")
    return out


def scene_for(rng: random.Random, kind: str, max_shapes: int = MAX_SHAPES, grow: float = 1.0) -> tuple[Scene, list[Fact]]:
    """A scene that answers at least one question of `kind`, and those facts."""
    while True:
        scene = make_scene(rng, max_shapes, grow)
        if found := facts(scene, kind):
            return scene, found


def example(seed: int, kind: str | None = None) -> Example:
    """One (image, question, answer) for `seed`; the question is of `kind`, or of a kind drawn from the seed."""
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    scene, found = scene_for(rng, kind)
    fact = rng.choice(found)
    return Example(render(scene), rng.choice(fact.phrasings), fact.answer, kind, seed)


def conversation(seed: int, max_turns: int, max_shapes: int = MAX_SHAPES, grow: float = 1.0,
                 scene_weights: dict[str, float] | None = None) -> tuple[Scene, list[tuple[str, str, str]]]:
    """A scene and up to `max_turns` (question, answer, kind) about it, each fact asked once; for training.

    The first turn is drawn as `example(seed)` draws its question; fewer and larger shapes (curriculum) make
    an easier scene. `scene_weights` draws the first turn's kind, and so the kind of scene, with these weights
    (default 1 each) instead of evenly: more position questions mean more single-object scenes.
    """
    rng = random.Random(seed)
    kind = rng.choices(KINDS, [scene_weights.get(k, 1.0) for k in KINDS])[0] if scene_weights else rng.choice(KINDS)
    scene, found = scene_for(rng, kind, max_shapes, grow)
    first = rng.choice(found)
    turns = [(rng.choice(first.phrasings), first.answer, kind)]
    left = {k: [f for f in facts(scene, k) if f != first] for k in KINDS}
    for _ in range(rng.randint(0, max_turns - 1)):
        kinds = [k for k in KINDS if left[k]]  # kinds drawn evenly, not in proportion to their facts
        if not kinds:
            break
        k = rng.choice(kinds)
        fact = left[k].pop(rng.randrange(len(left[k])))
        turns.append((rng.choice(fact.phrasings), fact.answer, k))
    return scene, turns


def heldout(n: int, start: int = 0) -> list[Example]:
    """The held-out set: balanced over KINDS, seeds HELDOUT_SEED + i (disjoint from every training seed)."""
    return [example(HELDOUT_SEED + i, KINDS[i % len(KINDS)]) for i in range(start, start + n)]


def corpus() -> list[str]:
    """Every question and answer the generator can produce, for training the tokenizer."""
    rng = random.Random("corpus")
    lines: set[str] = set()
    for _ in range(300):
        scene = make_scene(rng)
        lines |= {f"{q} {f.answer}" for k in KINDS for f in facts(scene, k) for q in f.phrasings}
    answers = [*COLOURS, *SHAPES, "left", "right", "top", "bottom"]
    # Answers follow "assistant\n" with no space before them: teach the BPE those words bare, too.
    return sorted(lines) + ["\n".join(answers)] * 4


# Shipped examples (export/demo/images): held-out seeds far from heldout()'s, one per question kind, images that
# the tiling cuts into four or six tiles plus the thumbnail; chosen before the model was trained.
# The position example picked with them (seed 1_900_007) is answered wrong by the shipped model (left for right;
# it gets 88% of the test seeds' position questions right), so none ships rather than one picked after the fact.
EXAMPLE_PICKS = ((1_900_000, "shape"), (1_900_004, "count"), (1_900_006, "text"), (1_900_002, "colour"))


def write_examples(out_dir, picks=EXAMPLE_PICKS) -> list[dict]:
    """Write the example PNGs and examples.json ({image, question, answer, kind, seed}) to out_dir."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = []
    for seed, kind in picks:
        e = example(seed, kind)
        name = f"{kind}-{e.image.width}x{e.image.height}.png"
        e.image.save(out_dir / name, optimize=True)
        listing.append({"image": name, "question": e.question, "answer": e.answer, "kind": kind, "seed": seed})
    (out_dir / "examples.json").write_text(json.dumps(listing, indent=2) + "\n")
    return listing
