"""Cheating metrics (PAPER.md §4, grouping and directions inferred): how much of the source survives.

SSIM and LPIPS compare the anonymized image bicubic-resized to the original's size (the paper's
setting); pHash is a near-duplicate check. CLIP image-image is computed by the CLIP family
(:mod:`u2s.eval.quality`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from u2s.eval.metrics import MetricFamily, Pair, Score, Skip

if TYPE_CHECKING:
    from PIL import Image

    from u2s.eval.config import EvalConfig

#: skimage's SSIM needs 7 px per side (its default window).
SSIM_MIN_SIDE = 7


def aligned(original: Image.Image, anonymized: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Both images as uint8 RGB arrays of the original's size (the anonymized one bicubic-resized)."""
    from PIL import Image

    a = original.convert("RGB")
    b = anonymized.convert("RGB")
    if b.size != a.size:
        b = b.resize(a.size, Image.Resampling.BICUBIC)
    return np.asarray(a), np.asarray(b)


def ssim(original: Image.Image, anonymized: Image.Image) -> Score:
    """``skimage.metrics.structural_similarity`` with ``channel_axis=2, data_range=255`` (the paper)."""
    from skimage.metrics import structural_similarity

    if min(original.size) < SSIM_MIN_SIDE:
        return Skip(f"image under {SSIM_MIN_SIDE} px")
    a, b = aligned(original, anonymized)
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def phash_distance(original: Image.Image, anonymized: Image.Image) -> float:
    """Hamming distance between the two images' ``imagehash.phash`` (64 bits: 0 = same hash)."""
    import imagehash

    return float(imagehash.phash(original) - imagehash.phash(anonymized))


class PixelFamily(MetricFamily):
    """``ssim`` and ``phash``: no model to load."""

    family = "pixel"

    def score(self, pairs: list[Pair]) -> list[dict[str, Score]]:
        out = []
        for pair in pairs:
            scores: dict[str, Score] = {}
            if "ssim" in self.metrics:
                scores["ssim"] = ssim(pair.original, pair.anonymized)
            if "phash" in self.metrics:
                scores["phash"] = phash_distance(pair.original, pair.anonymized)
            out.append(scores)
        return out


class LpipsFamily(MetricFamily):
    """``lpips`` with the configured backbone (the paper: VGG); unavailable where it cannot load."""

    family = "lpips"

    def __init__(self, config: EvalConfig, metrics: list[str]) -> None:
        from u2s.eval.detectors import load_lpips
        from u2s.torch_utils import set_threads

        super().__init__(config, metrics)
        set_threads(config.resources.lpips.threads())
        self.model = load_lpips(config.models.lpips_net)
        self.device = next(self.model.parameters()).device

    def score(self, pairs: list[Pair]) -> list[dict[str, Score]]:
        import torch

        out = []
        for pair in pairs:
            a, b = (_tensor(x, self.device) for x in aligned(pair.original, pair.anonymized))
            with torch.inference_mode():
                out.append({"lpips": float(self.model(a, b).item())})
        return out


def _tensor(pixels: np.ndarray, device) -> Any:
    """uint8 HWC pixels → a 1×3×H×W float tensor in [-1, 1] (LPIPS's input range)."""
    import torch

    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(127.5).sub(1).unsqueeze(0).to(device)
