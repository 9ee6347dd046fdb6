"""CLIP scores on a tiny random CLIP, loaded from a folder through the production loader."""

from __future__ import annotations

import pytest
from PIL import Image

from u2s.eval.config import EvalConfig
from u2s.eval.metrics import Pair, Skip
from u2s.eval.quality import ClipFamily
from u2s.testing.images import noise_image
from u2s.testing.tiny_models import build_tiny_clip

METRICS = ["clip_text", "clip_direction", "clip_image"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> ClipFamily:
    path = build_tiny_clip(tmp_path_factory.mktemp("clip"))
    cfg = EvalConfig.model_validate({
        "original": {"uri": "/unused"}, "methods": {"m": "/unused"}, "out": "/unused", "metrics": METRICS,
        "models": {"clip": {"model": str(path), "device": "cpu"}},
    })  # fmt: skip
    return ClipFamily(cfg, METRICS)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.mark.slow
def test_clip_scores_and_their_skips(family, astronaut):
    other = noise_image(200, 150, 5)
    pairs = [
        Pair("a", "m", astronaut, astronaut.copy(), public_caption="a person in a suit"),
        Pair(
            "b",
            "m",
            astronaut,
            other,
            public_caption="a person in a suit",
            private_caption="a named astronaut",
        ),
        Pair("c", "m", astronaut, astronaut.copy()),  # a kept row: no caption
        Pair("d", "m", astronaut, astronaut.copy(), public_caption="x", private_caption="y"),
    ]
    same, changed, kept, unchanged = family.score(pairs)
    assert same["clip_image"] == pytest.approx(1.0, abs=1e-5)
    assert changed["clip_image"] < same["clip_image"]
    assert -1.0 <= same["clip_text"] <= 1.0
    assert same["clip_direction"] == Skip("no private caption (needs --sensitive)")
    assert -1.0 <= changed["clip_direction"] <= 1.0
    assert kept["clip_text"] == kept["clip_direction"] == Skip("no public caption")
    assert unchanged["clip_direction"] == Skip("images identical: no direction")


@pytest.mark.slow
def test_clip_text_uses_the_combined_caption_when_there_is_one(family, astronaut):
    public, combined = "a person in a suit", "a person in a plain suit, face replaced"
    with_public, with_combined, reference = family.score([
        Pair("a", "m", astronaut, astronaut, public_caption=public),
        Pair("b", "m", astronaut, astronaut, public_caption=public, combined_caption=combined),
        Pair("c", "m", astronaut, astronaut, public_caption=combined),
    ])  # fmt: skip
    assert with_combined["clip_text"] == pytest.approx(reference["clip_text"], abs=1e-6)
    assert with_combined["clip_text"] != pytest.approx(with_public["clip_text"], abs=1e-6)
