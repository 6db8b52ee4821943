"""Tiling parity: runtime pixel_values equal the model card's load_image, transcribed independently."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import reference_impl as ref
from vl_export.errors import InputError
from vl_export.runtime.preprocess import TilingConfig, frame_indices, preprocess, preprocess_images

SIZES = [
    (448, 448), (896, 448), (448, 896), (1344, 896), (448 * 4, 448 * 3),  # exact multiples of 448
    (1000, 1000), (2000, 2000), (560, 448),  # equal-ratio grids: the area tie rule decides
    (640, 480), (1920, 1080), (1080, 1920), (500, 300), (449, 447),
    (4000, 17), (17, 4000), (3000, 250), (1, 1), (2, 3), (13, 7), (7000, 6000),  # extreme and tiny
]


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7 + height)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


@pytest.mark.parametrize("width, height", SIZES)
def test_tiles_equal_the_model_card(width, height):
    image = random_image(width, height)
    want = ref.load_image(image).numpy()
    got = preprocess(image)
    assert got.shape == want.shape, f"{width}x{height}: {got.shape[0]} tiles vs {want.shape[0]}"
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("max_tiles, thumbnail", [(1, True), (6, True), (12, False), (24, True)])
def test_tile_limits_and_thumbnail_follow_the_reference(max_tiles, thumbnail):
    for width, height in [(1920, 1080), (300, 2000), (1000, 1000)]:
        image = random_image(width, height)
        want = ref.load_image(image, max_num=max_tiles, use_thumbnail=thumbnail).numpy()
        got = preprocess(image, TilingConfig(max_tiles=max_tiles, use_thumbnail=thumbnail))
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-6


def test_area_tie_rule_picks_the_larger_grid():
    # A square of 1000 px: (1,1), (2,2) and (3,3) fit its ratio equally; 1000^2 > 0.5*448^2*9 picks 3x3.
    assert preprocess(random_image(1000, 1000)).shape[0] == 9 + 1
    # 600^2 < 0.5*448^2*4, so 2x2 is not taken and the image stays one tile (no thumbnail for one tile).
    assert preprocess(random_image(600, 600)).shape[0] == 1


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_other_modes_convert_like_the_reference(mode):
    image = random_image(700, 500, mode)
    want = ref.load_image(image).numpy()
    np.testing.assert_allclose(preprocess(image), want, atol=1e-6, rtol=0)


def test_paths_bytes_and_pil_give_the_same_tiles(tmp_path):
    image = random_image(900, 400)
    image.save(tmp_path / "x.png")
    from_pil = preprocess(image)
    np.testing.assert_array_equal(preprocess(tmp_path / "x.png"), from_pil)
    np.testing.assert_array_equal(preprocess(str(tmp_path / "x.png")), from_pil)
    np.testing.assert_array_equal(preprocess((tmp_path / "x.png").read_bytes()), from_pil)


def test_multi_image_concatenates_and_counts():
    a, b = random_image(1920, 1080), random_image(448, 448)
    pixels, counts = preprocess_images([a, b])
    assert counts == [len(ref.load_image(a)), 1]
    np.testing.assert_allclose(pixels[: counts[0]], ref.load_image(a).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(pixels[counts[0]:], ref.load_image(b).numpy(), atol=1e-6, rtol=0)


def test_exif_orientation_is_ignored_unless_asked():
    image = random_image(800, 400)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    data = buffer.getvalue()
    assert preprocess(data).shape[0] == preprocess(Image.open(io.BytesIO(data))).shape[0]
    as_reference = preprocess(data)
    np.testing.assert_allclose(as_reference, ref.load_image(Image.open(io.BytesIO(data))).numpy(), atol=1e-6, rtol=0)
    upright = preprocess(data, TilingConfig(exif_transpose=True))
    rotated = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)  # 400 wide, 800 high
    np.testing.assert_allclose(upright, ref.load_image(rotated).numpy(), atol=1e-6, rtol=0)
    assert not np.allclose(upright, as_reference)


@pytest.mark.parametrize("num_frames, fps, segments", [(300, 30.0, 8), (17, 24.0, 16), (8, 10.0, 8), (1000, 29.97, 32)])
def test_frame_sampling_is_the_cards_get_index(num_frames, fps, segments):
    assert frame_indices(num_frames, fps, segments) == ref.get_index(None, fps, num_frames - 1, num_segments=segments).tolist()


def test_bad_images_are_clear_errors(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="not found"):
        preprocess(tmp_path / "missing.png")
    with pytest.raises(InputError, match="cannot be decoded"):
        preprocess(tmp_path / "corrupt.png")
    with pytest.raises(InputError, match="cannot be decoded"):
        preprocess(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="zero size"):
        preprocess(Image.new("RGB", (0, 10)))
    with pytest.raises(InputError, match="must be a path, bytes or a PIL image"):
        preprocess(12345)
