"""The metric interface: what each metric is (name, group, direction) and how a family of metrics runs.

A *metric* scores one (original, anonymized) pair: a float, or a :class:`Skip` with a reason when it is
undefined for that pair (no face in the original, no caption...). Skips are counted and reported with
their reasons, never turned into 0 or NaN. Metrics that share models form a *family*
(:class:`MetricFamily`): the job builds each family once per Ray actor and hands it batches of
:class:`Pair`. A family whose models cannot load (no torchvision for LPIPS, a CLIP id that is not in the
local cache offline...) is *unavailable*: every pair is skipped with that reason.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from PIL import Image

    from u2s.eval.config import EvalConfig

Group = Literal["quality", "cheating", "privacy"]
Direction = Literal["up", "down"]


@dataclass(frozen=True)
class Metric:
    """One metric: where it is reported (``group``), which way is better (``direction``), its family."""

    name: str
    label: str
    group: Group
    direction: Direction
    family: str
    description: str

    @property
    def arrow(self) -> str:
        return "↑" if self.direction == "up" else "↓"


@dataclass(frozen=True)
class Skip:
    """A metric that is undefined for one pair, and why (a short, content-free reason)."""

    reason: str


Score = float | Skip

#: Every metric u2s computes (PAPER.md §4; the Quality/Cheating split and directions are inferred there).
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("face_sim", "FaceSim", "privacy", "down", "face",
           "Per original face, max cosine over the anonymized image's faces; mean over original faces. "
           "Skipped when the anonymized image has no face (the paper)."),
    Metric("face_sim_strict", "FaceSim (strict)", "privacy", "down", "face",
           "FaceSim with a vanished face counted as 0 instead of skipped."),
    Metric("text_sim", "TextSim (OCR)", "privacy", "down", "ocr",
           "rapidfuzz token-set ratio / 100 of the text rapidocr reads in both images."),
    Metric("text_sim_vlm", "TextSim (VLM)", "privacy", "down", "vlm",
           "Token-set ratio / 100 of the text a VLM extracts from both images (the paper)."),
    Metric("race_entropy", "Race Entropy", "privacy", "up", "vlm",
           "Entropy of the race labels a VLM gives the anonymized image, / log 5."),
    Metric("vlm_score", "VLMScore", "privacy", "up", "vlm",
           "A VLM judge's unlinkability score (0-100) of the anonymized image against the original."),
    Metric("clip_text", "CLIP image-text", "quality", "up", "clip",
           "Cosine of the anonymized image and its public caption."),
    Metric("clip_direction", "Directional CLIP", "quality", "up", "clip",
           "Cosine of the image change and the caption change (private → public/combined caption)."),
    Metric("clip_image", "CLIP image-image", "cheating", "down", "clip",
           "Cosine of the two images' CLIP embeddings."),
    Metric("ssim", "SSIM", "cheating", "down", "pixel",
           "skimage SSIM, anonymized image bicubic-resized to the original's size, data_range 255."),
    Metric("lpips", "LPIPS", "cheating", "up", "lpips",
           "LPIPS distance (VGG), same resize, inputs in [-1, 1]."),
    Metric("phash", "pHash distance", "cheating", "up", "pixel",
           "Hamming distance of the two images' imagehash.phash (0-64)."),
)}  # fmt: skip

#: Family name → "module:class" (imported only inside the actor that runs it).
FAMILIES: dict[str, str] = {
    "face": "u2s.eval.privacy:FaceFamily",
    "ocr": "u2s.eval.privacy:OcrTextFamily",
    "vlm": "u2s.eval.privacy:VlmFamily",
    "clip": "u2s.eval.quality:ClipFamily",
    "pixel": "u2s.eval.cheating:PixelFamily",
    "lpips": "u2s.eval.cheating:LpipsFamily",
}


@dataclass
class Pair:
    """One image of one method next to its original, with the texts the metrics may use."""

    id: str
    method: str
    original: Image.Image
    anonymized: Image.Image
    public_caption: str | None = None
    private_caption: str | None = None
    combined_caption: str | None = None


class MetricFamily(ABC):
    """Metrics sharing models. The constructor loads them (once per actor); :meth:`score` runs a batch.

    ``metrics`` is the subset of the family's metrics the evaluation asked for.
    """

    family: ClassVar[str]

    def __init__(self, config: EvalConfig, metrics: list[str]) -> None:
        self.config = config
        self.metrics = metrics

    @abstractmethod
    def score(self, pairs: list[Pair]) -> list[dict[str, Score]]:
        """One ``{metric: score}`` per pair, for every metric in ``self.metrics``."""


def unavailable_reason(error: BaseException) -> str:
    """A content-free reason for a family whose models cannot load (type; the module for a missing one)."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        return f"unavailable: {type(error).__name__} ({error.name})"
    return f"unavailable: {type(error).__name__}"


def family_class(name: str) -> type[MetricFamily]:
    """The :class:`MetricFamily` subclass of family ``name``."""
    module, _, attr = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def families_of(metrics: list[str]) -> dict[str, list[str]]:
    """Family → the requested metrics it computes, in :data:`METRICS` order."""
    out: dict[str, list[str]] = {}
    for name, metric in METRICS.items():
        if name in metrics:
            out.setdefault(metric.family, []).append(name)
    return out
