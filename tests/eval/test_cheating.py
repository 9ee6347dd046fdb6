"""Cheating metrics: SSIM against scikit-image called directly, pHash, LPIPS availability."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from u2s.eval.cheating import LpipsFamily, PixelFamily, phash_distance, ssim
from u2s.eval.config import EvalConfig
from u2s.eval.job import FamilyStage
from u2s.eval.metrics import Pair, Skip
from u2s.testing.images import noise_image


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.LANCZOS)


def _config(**overrides) -> EvalConfig:
    base = {"original": {"uri": "/unused"}, "methods": {"m": "/unused"}, "out": "/unused"}
    return EvalConfig.model_validate({**base, **overrides})


def test_identical_pairs_give_ssim_one_and_phash_zero(astronaut):
    family = PixelFamily(_config(metrics=["ssim", "phash"]), ["ssim", "phash"])
    (scores,) = family.score([Pair("x", "m", astronaut, astronaut.copy())])
    assert scores == {"ssim": pytest.approx(1.0), "phash": 0.0}


def test_ssim_equals_skimage_called_directly(astronaut):
    from skimage.metrics import structural_similarity

    noise = np.asarray(noise_image(256, 256, 1), np.int16) // 4 - 32
    noisy = np.clip(np.asarray(astronaut, np.int16) + noise, 0, 255).astype(np.uint8)
    expected = structural_similarity(np.asarray(astronaut), noisy, channel_axis=2, data_range=255)
    assert ssim(astronaut, Image.fromarray(noisy)) == pytest.approx(expected, abs=1e-12)
    assert expected < 0.9


def test_ssim_resizes_the_anonymized_image_to_the_original(astronaut):
    small = astronaut.resize((128, 128), Image.Resampling.BICUBIC)
    value = ssim(astronaut, small)
    assert 0.5 < value < 1.0  # comparable after the resize, but not identical
    assert ssim(Image.new("RGB", (5, 40)), Image.new("RGB", (5, 40))) == Skip("image under 7 px")


def test_phash_distance_grows_with_change(astronaut):
    other = noise_image(256, 256, 3)
    assert phash_distance(astronaut, astronaut.rotate(2)) < phash_distance(astronaut, other)
    assert phash_distance(astronaut, other) >= 16


def test_lpips_is_reported_unavailable_when_its_backbone_cannot_load(astronaut):
    """This CPU environment has no torchvision (the lpips backbone): every pair is skipped with the
    reason, never scored 0. Where torchvision and the VGG weights load, the metric is computed."""
    try:
        LpipsFamily(_config(metrics=["lpips"]), ["lpips"])
    except Exception as e:
        available, error = False, e
    else:
        available, error = True, None
    if available:
        pytest.skip("LPIPS loads here: the unavailable path cannot be exercised")
    stage = FamilyStage(_config(metrics=["lpips"]), "lpips", ["lpips"])
    assert stage.unavailable is not None and stage.unavailable.startswith("unavailable: ")
    assert type(error).__name__ in stage.unavailable
