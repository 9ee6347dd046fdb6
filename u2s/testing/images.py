"""Image helpers for tests and benchmarks: seeded noise images and pixel differences."""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A uniform-noise RGB image, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(img: Image.Image) -> np.ndarray:
    """Pixels as signed ints, so differences do not wrap around."""
    return np.asarray(img, dtype=np.int16)


def max_diff(a: list[Image.Image], b: list[Image.Image]) -> int:
    """Largest per-pixel difference over pairs of images."""
    return max(int(np.abs(pixels(x) - pixels(y)).max()) for x, y in zip(a, b, strict=True))


def mean_diff(a: list[Image.Image], b: list[Image.Image]) -> float:
    """Smallest mean per-pixel difference over pairs of images (each pair must differ at least this)."""
    return min(float(np.abs(pixels(x) - pixels(y)).mean()) for x, y in zip(a, b, strict=True))
