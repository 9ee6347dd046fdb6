"""Image-classification transforms of the paper's utility protocol, in PIL and numpy.

Training: RandomResizedCrop (scale 0.08–1, ratio 3/4–4/3) → horizontal flip → RandAugment(n=2, m=9,
std 0.5); evaluation: resize the short side to ``size / crop_pct`` (256 for 224) → centre crop ``size``.
These follow torchvision's ``RandomResizedCrop`` and timm's ``rand-m9-n2-mstd0.5`` (the MAE fine-tuning
recipe). They are written here because torchvision (and timm, which needs it) cannot be installed in the
CPU environment: its PyPI builds pull a CUDA torch that breaks the pinned CPU one. Every function takes an
explicit ``numpy.random.Generator``, so a run is reproducible when the caller seeds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

#: timm's fill for geometric ops: the ImageNet mean as 8-bit RGB.
FILL = (124, 116, 104)
#: Magnitudes are on timm's 0–10 scale.
MAX_LEVEL = 10.0


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """A random area/aspect crop resized to ``size``² (bicubic); torchvision's algorithm, 10 tries then
    a centre crop clamped to ``ratio``."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


def resize_center_crop(img: Image.Image, size: int, crop_pct: float = 0.875) -> Image.Image:
    """Evaluation transform: short side to ``floor(size / crop_pct)`` (bicubic), then a centre ``size``²."""
    scale_size = math.floor(size / crop_pct)
    width, height = img.size
    if width <= height:
        new = (scale_size, max(scale_size, round(height * scale_size / width)))
    else:
        new = (max(scale_size, round(width * scale_size / height)), scale_size)
    img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------ RandAugment
# The ops and level → argument maps are timm's `_RAND_TRANSFORMS` (timm/data/auto_augment.py), whose
# default is the original (non-"increasing") variant, as `rand-m9-n2-mstd0.5` asks.


def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine_kwargs(rng: np.random.Generator) -> dict:
    resample = Image.Resampling.BILINEAR if rng.random() < 0.5 else Image.Resampling.BICUBIC
    return {"resample": resample, "fillcolor": FILL}


def _affine(img: Image.Image, matrix: tuple, rng: np.random.Generator) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, **_affine_kwargs(rng))


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _enhance(kind: type) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    # timm range [0.1, 1.9]: magnitude 9 → factor 1.72
    return lambda img, level, rng: kind(img).enhance(level / MAX_LEVEL * 1.8 + 0.1)


def _shear(axis: int) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    def op(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
        factor = _negate(level / MAX_LEVEL * 0.3, rng)
        matrix = (1, factor, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, factor, 1, 0)
        return _affine(img, matrix, rng)

    return op


def _translate(axis: int) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    def op(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
        pixels = _negate(level / MAX_LEVEL * 0.45, rng) * img.size[axis]
        matrix = (1, 0, pixels, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pixels)
        return _affine(img, matrix, rng)

    return op


def _rotate(img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    degrees = _negate(level / MAX_LEVEL * 30.0, rng)
    return img.rotate(degrees, **_affine_kwargs(rng))


RAND_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "AutoContrast": lambda img, level, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, rng: ImageOps.equalize(img),
    "Invert": lambda img, level, rng: ImageOps.invert(img),
    "Rotate": _rotate,
    "Posterize": lambda img, level, rng: _posterize(img, int(level / MAX_LEVEL * 4)),
    "Solarize": lambda img, level, rng: ImageOps.solarize(img, min(256, int(level / MAX_LEVEL * 256))),
    "SolarizeAdd": lambda img, level, rng: _solarize_add(img, min(128, int(level / MAX_LEVEL * 110))),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateXRel": _translate(0),
    "TranslateYRel": _translate(1),
}


def rand_augment(
    img: Image.Image,
    rng: np.random.Generator,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    prob: float = 0.5,
) -> Image.Image:
    """timm's RandAugment: ``num_ops`` ops drawn with replacement, each applied with probability ``prob``
    at a magnitude drawn from N(``magnitude``, ``magnitude_std``) clipped to [0, 10]."""
    names = list(RAND_OPS)
    for index in rng.choice(len(names), size=num_ops, replace=True) if num_ops else ():
        if rng.random() > prob:
            continue
        level = magnitude
        if magnitude_std > 0:
            level = rng.normal(magnitude, magnitude_std)
        level = float(min(MAX_LEVEL, max(0.0, level)))
        img = RAND_OPS[names[int(index)]](img, level, rng)
    return img


def train_transform(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    num_ops: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
) -> np.ndarray:
    """The training pipeline on one RGB image → ``size × size × 3`` uint8 pixels."""
    img = random_resized_crop(img, size, rng, scale=scale)
    if rng.random() < hflip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = rand_augment(img, rng, num_ops=num_ops, magnitude=magnitude, magnitude_std=magnitude_std)
    return np.asarray(img, dtype=np.uint8)


def eval_transform(img: Image.Image, size: int, crop_pct: float = 0.875) -> np.ndarray:
    """The evaluation pipeline on one RGB image → ``size × size × 3`` uint8 pixels."""
    return np.asarray(resize_center_crop(img, size, crop_pct), dtype=np.uint8)
