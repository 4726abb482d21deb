"""Tests for ddpm_core.render: uint8 conversion, grids, the PNG grid and the denoising GIF."""

import numpy as np
import pytest
from PIL import Image

from ddpm_core.render import GRID_PADDING, make_grid, save_denoising_gif, save_grid_png, to_uint8


def numbered_images(count, height=3, width=4):
    """uint8 [count, H, W, 1] where every pixel of image i is 10 * (i + 1)."""
    values = 10 * (np.arange(count, dtype=np.uint8) + 1)
    return np.broadcast_to(values[:, None, None, None], (count, height, width, 1)).copy()


def test_to_uint8_maps_endpoints():
    pixels = to_uint8(np.array([-1.0, 0.0, 1.0]))

    assert pixels.dtype == np.uint8
    assert pixels.tolist() == [0, 128, 255]


def test_to_uint8_clips_out_of_range():
    pixels = to_uint8(np.array([-3.0, 3.0]))

    assert pixels.tolist() == [0, 255]


def test_to_uint8_rounds_to_nearest():
    # (x + 1) * 127.5: -0.5 -> 63.75 and 0.5 -> 191.25.
    pixels = to_uint8(np.array([-0.5, 0.5]))

    assert pixels.tolist() == [64, 191]


def test_to_uint8_keeps_shape():
    pixels = to_uint8(np.zeros((2, 28, 28, 1), np.float32))

    assert pixels.shape == (2, 28, 28, 1)


def test_make_grid_shape_with_padding():
    grid = make_grid(numbered_images(5), cols=2)

    # 3 rows of 3-pixel images and 2 columns of 4-pixel images, with 2 pixels around each.
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * (3 + 2) + 2, 2 * (4 + 2) + 2)
    assert GRID_PADDING == 2


def test_make_grid_places_images_in_row_order():
    grid = make_grid(numbered_images(5), cols=2)

    for index in range(5):
        row, col = divmod(index, 2)
        top = 2 + row * 5
        left = 2 + col * 6
        cell = grid[top:top + 3, left:left + 4]
        assert np.all(cell == 10 * (index + 1)), index


def test_make_grid_padding_is_black():
    grid = make_grid(numbered_images(5), cols=2)
    mask = np.zeros(grid.shape, bool)
    for index in range(5):
        row, col = divmod(index, 2)
        mask[2 + row * 5:2 + row * 5 + 3, 2 + col * 6:2 + col * 6 + 4] = True

    assert np.all(grid[~mask] == 0)


def test_make_grid_upscale_repeats_pixels():
    images = np.array([[[1, 2], [3, 4]]], np.uint8)[..., None]
    grid = make_grid(images, cols=1, upscale=3, padding=0)
    expected = np.array([[1, 2], [3, 4]], np.uint8).repeat(3, axis=0).repeat(3, axis=1)

    np.testing.assert_array_equal(grid, expected)


def test_make_grid_caps_columns_at_count():
    grid = make_grid(numbered_images(3), cols=8)

    assert grid.shape == (1 * (3 + 2) + 2, 3 * (4 + 2) + 2)


@pytest.mark.parametrize("shape", [(28, 28, 1), (2, 28, 28), (2, 28, 28, 3)])
def test_make_grid_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match=r"\[N, H, W, 1\]"):
        make_grid(np.zeros(shape, np.uint8), cols=2)


@pytest.mark.parametrize(("cols", "upscale"), [(0, 1), (2, 0)])
def test_make_grid_rejects_bad_factors(cols, upscale):
    with pytest.raises(ValueError, match="at least 1"):
        make_grid(numbered_images(2), cols=cols, upscale=upscale)


def test_save_grid_png_readable(tmp_path):
    images = np.linspace(-1.0, 1.0, 4 * 28 * 28, dtype=np.float32).reshape(4, 28, 28, 1)
    path = save_grid_png(images, str(tmp_path / "nested" / "grid.png"), cols=2, upscale=2)

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode == "L"
        # 2 x 2 images of 56 pixels plus 3 padding strips of 2 pixels each way.
        assert image.size == (2 * 56 + 6, 2 * 56 + 6)
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, make_grid(to_uint8(images), cols=2, upscale=2))


def test_save_denoising_gif_frames_and_hold(tmp_path):
    levels = [-1.0, -0.5, 0.0, 0.5, 1.0]
    frames = np.stack([np.full((4, 28, 28, 1), level, np.float32) for level in levels])
    path = save_denoising_gif(frames, str(tmp_path / "gif" / "denoise.gif"), cols=2, upscale=1,
                              frame_duration_ms=60, final_hold_ms=200)

    with Image.open(path) as image:
        assert image.format == "GIF"
        assert image.n_frames == 5
        assert image.size == (2 * 30 + 2, 2 * 30 + 2)
        durations = []
        centers = []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
            centers.append(image.convert("L").getpixel((10, 10)))
        loop = image.info.get("loop")

    assert durations[:-1] == [60, 60, 60, 60]
    assert durations[-1] == 260
    assert centers == [0, 64, 128, 191, 255]
    assert loop == 0


@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (0, 4, 28, 28, 1)])
def test_save_denoising_gif_rejects_bad_shape(tmp_path, shape):
    with pytest.raises(ValueError, match=r"\[F, N, H, W, 1\]"):
        save_denoising_gif(np.zeros(shape, np.float32), str(tmp_path / "bad.gif"), cols=2)


def test_save_grid_png_rejects_bad_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\[N, H, W, 1\]"):
        save_grid_png(np.zeros((4, 28, 28), np.float32), str(tmp_path / "bad.png"), cols=2)
