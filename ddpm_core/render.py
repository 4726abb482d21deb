"""Turn samples into viewable images: uint8 conversion, grids, the denoising GIF and a PNG."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
from PIL import Image

GRID_PADDING = 2  # pixels between images in a grid


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Map [-1, 1] floats to uint8 pixels: -1 -> 0, 0 -> 128, 1 -> 255; values outside are clipped."""
    scaled = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int, upscale: int = 1, padding: int = GRID_PADDING) -> np.ndarray:
    """Tile uint8 images [N, H, W, 1] into one grayscale image [rows * (H + p) + p, ...] with padding p.

    Each image is enlarged ``upscale`` times by pixel repetition (nearest neighbour).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"expected images of shape [N, H, W, 1], got {images.shape}")
    if cols < 1 or upscale < 1:
        raise ValueError(f"cols and upscale must be at least 1, got cols={cols}, upscale={upscale}")
    count, height, width, _ = images.shape
    cols = min(cols, count)
    rows = -(-count // cols)
    images = images[..., 0].repeat(upscale, axis=1).repeat(upscale, axis=2)
    cell_h, cell_w = height * upscale, width * upscale
    grid = np.zeros((rows * (cell_h + padding) + padding, cols * (cell_w + padding) + padding), np.uint8)
    for index in range(count):
        row, col = divmod(index, cols)
        top = padding + row * (cell_h + padding)
        left = padding + col * (cell_w + padding)
        grid[top:top + cell_h, left:left + cell_w] = images[index]
    return grid


def save_grid_png(images: np.ndarray, path: str, cols: int, upscale: int = 1) -> str:
    """Write the final samples, float [N, H, W, 1] in [-1, 1], as one PNG grid; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(make_grid(to_uint8(images), cols, upscale), mode="L").save(path)
    return path


def save_denoising_gif(
    frames: np.ndarray,
    path: str,
    cols: int,
    upscale: int = 1,
    frame_duration_ms: int = 60,
    final_hold_ms: int = 1500,
) -> str:
    """Write the denoising process as a looping grayscale GIF; return the path.

    Args:
      frames: float [F, N, H, W, 1] in [-1, 1], from the initial noise to the final samples.
      final_hold_ms: extra time the last frame stays on screen before the loop restarts.
    """
    frames = np.asarray(frames)
    if frames.ndim != 5 or frames.shape[0] < 1:
        raise ValueError(f"expected frames of shape [F, N, H, W, 1] with F >= 1, got {frames.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grids = np.stack([make_grid(to_uint8(frame), cols, upscale) for frame in frames])
    durations = [frame_duration_ms] * len(grids)
    durations[-1] = frame_duration_ms + final_hold_ms
    iio.imwrite(path, grids, extension=".gif", duration=durations, loop=0)
    return path
