"""Region detectors of the classic baselines: faces (dlib HOG) and text lines (rapidocr), fully offline.

Boxes are ``(left, top, right, bottom)`` pixel coordinates of the given image, ``right``/``bottom``
exclusive (PIL's crop convention). Each detector loads its model once, in its constructor; heavy
imports (dlib, rapidocr, onnxruntime, cv2) happen there, never at module import.

rapidocr is used for detection only (no recognition runs, so no private text is ever produced or
logged), and its models are always taken from the files that ship inside the package: rapidocr never
reaches the network from here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

#: A region: (left, top, right, bottom) in pixels, right/bottom exclusive.
Box = tuple[int, int, int, int]

#: Faces are looked for on a copy downscaled to this long side (with dlib's upsampling on top), so a
#: huge photo does not become a huge HOG pyramid; boxes are mapped back to full resolution.
FACE_MAX_SIDE = 1280
#: Text is detected at the image's own resolution, downscaled only when the long side exceeds this.
#: rapidocr's default instead upscales the short side to 736: on small photos (Caltech-sized, 256 px)
#: that made the detector box whole textured scenes as text (score > 0.7) at 10-20x the cost.
TEXT_MAX_SIDE = 1280


def clip_box(box: Sequence[float], width: int, height: int) -> Box | None:
    """``box`` rounded outwards to whole pixels and clipped to the image; None when nothing is left."""
    left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    right, bottom = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if right <= left or bottom <= top:
        return None
    return left, top, right, bottom


def pad_box(box: Box, padding: float, width: int, height: int) -> Box | None:
    """``box`` grown by ``padding`` × its width (left and right) and × its height (top and bottom),
    clipped to a ``width`` × ``height`` image."""
    left, top, right, bottom = box
    dx, dy = (right - left) * padding, (bottom - top) * padding
    return clip_box((left - dx, top - dy, right + dx, bottom + dy), width, height)


class FaceDetector:
    """Frontal faces with dlib's HOG detector (``dlib.get_frontal_face_detector``).

    ``upsample`` is the number of times dlib upsamples the image first (each pass finds faces half as
    large, at 4× the cost). dlib's CNN detector (face_recognition_models) finds a few more faces but
    costs ~50× the time on CPU, so the baselines use HOG.
    """

    def __init__(self, upsample: int = 1, max_side: int = FACE_MAX_SIDE) -> None:
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self.upsample = upsample
        self.max_side = max_side

    def __call__(self, image: Image.Image) -> list[Box]:
        """Face boxes of an image (converted to RGB), in its own pixel coordinates."""
        from PIL import Image

        rgb = image.convert("RGB")
        scale = min(1.0, self.max_side / max(rgb.size))
        if scale < 1.0:
            small = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(small, Image.Resampling.LANCZOS)
        sx, sy = image.width / rgb.width, image.height / rgb.height
        boxes = []
        for rect in self._detector(np.asarray(rgb), self.upsample):
            # dlib rectangles are inclusive and may reach outside the image.
            raw = (rect.left() * sx, rect.top() * sy, (rect.right() + 1) * sx, (rect.bottom() + 1) * sy)
            if (box := clip_box(raw, image.width, image.height)) is not None:
                boxes.append(box)
        return boxes


def _shipped_model(cfg: Any) -> str:
    """Path of the ONNX file that ships in the rapidocr package for one task config (Det/Cls/Rec).

    Resolved as rapidocr itself resolves its default download target, but the file must already be
    there: an explicit ``model_path`` makes rapidocr skip its downloader entirely.
    """
    import rapidocr
    from rapidocr.inference_engine.base import FileInfo, InferSession

    info = InferSession.get_model_url(
        FileInfo(cfg.engine_type, cfg.ocr_version, cfg.task_type, cfg.lang_type, cfg.model_type)
    )
    path = Path(rapidocr.__file__).parent / "models" / Path(info["model_dir"]).name
    if not path.is_file():
        raise FileNotFoundError(f"rapidocr model {path.name} is not shipped in {path.parent}")
    return str(path)


def load_rapidocr(
    recognise: bool = False,
    min_score: float = 0.5,
    threads: int | None = None,
    max_side: int = TEXT_MAX_SIDE,
) -> Any:
    """A ``rapidocr.RapidOCR`` engine on the package's bundled ONNX models (never downloads).

    With ``recognise=False`` (what the baselines use) only the text detector runs and a call returns
    line boxes; with ``recognise=True`` (evaluation, tests) it also reads the text. The angle
    classifier is off. ``min_score`` is the detector's box threshold; ``threads`` caps onnxruntime's
    intra-op threads; the detector sees the image downscaled to ``max_side`` at most, never upscaled.
    """
    from rapidocr import RapidOCR
    from rapidocr.main import DEFAULT_CFG_PATH
    from rapidocr.utils.parse_parameters import ParseParams

    defaults = ParseParams.load(DEFAULT_CFG_PATH)
    params: dict[str, Any] = {
        "Global.log_level": "error",  # its warnings are per-image noise ("detection result is empty")
        "Global.use_cls": False,
        "Global.use_rec": recognise,
        "Det.model_path": _shipped_model(defaults.Det),
        "Det.box_thresh": min_score,
        "Det.limit_type": "max",
        "Det.limit_side_len": max_side,
    }
    if recognise:
        params["Rec.model_path"] = _shipped_model(defaults.Rec)  # its charset is inside the ONNX file
    if threads:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
    engine = RapidOCR(params=params)
    engine(np.zeros((64, 64, 3), np.uint8))  # rapidocr loads models on first use: load the detector now
    return engine


class TextDetector:
    """Text-line boxes with rapidocr's detector (DB, PP-OCR det model), detection only.

    Lines whose detection score is below ``min_score`` are dropped (the detector's box threshold).
    """

    def __init__(
        self, min_score: float = 0.5, threads: int | None = None, max_side: int = TEXT_MAX_SIDE
    ) -> None:
        self._engine = load_rapidocr(recognise=False, min_score=min_score, threads=threads, max_side=max_side)

    def __call__(self, image: Image.Image) -> list[Box]:
        """Text-line boxes of an image (converted to RGB), in its own pixel coordinates."""
        result = self._engine(image.convert("RGB"))
        polygons = getattr(result, "boxes", None)
        if polygons is None:
            return []
        boxes = []
        for poly in np.asarray(polygons, dtype=np.float64).reshape(-1, 4, 2):
            (x0, y0), (x1, y1) = poly.min(axis=0), poly.max(axis=0)
            if (box := clip_box((x0, y0, x1, y1), image.width, image.height)) is not None:
                boxes.append(box)
        return boxes


class RegionSettings(Protocol):
    """What a :class:`RegionDetector` reads of its settings (a region baseline's section,
    :class:`u2s.stage2.editors.baselines.RegionConfig`, a pydantic model)."""

    regions: list[str]
    padding: float
    face_upsample: int
    text_min_score: float

    def model_dump_json(self) -> str: ...

    @classmethod
    def model_validate_json(cls, json_data: str) -> RegionSettings: ...


class RegionDetector:
    """The regions a :class:`~u2s.stage2.editors.baselines.RegionConfig` hides: faces and/or text, padded
    and clipped."""

    def __init__(self, config: RegionSettings, threads: int | None = None) -> None:
        self.config = config
        self.faces = FaceDetector(config.face_upsample) if "faces" in config.regions else None
        self.text = TextDetector(config.text_min_score, threads) if "text" in config.regions else None

    def __call__(self, image: Image.Image) -> list[Box]:
        """Padded boxes of every configured region kind (faces first, then text lines)."""
        raw: list[Box] = []
        if self.faces is not None:
            raw += self.faces(image)
        if self.text is not None:
            raw += self.text(image)
        padded = (pad_box(box, self.config.padding, image.width, image.height) for box in raw)
        return [box for box in padded if box is not None]


@functools.lru_cache(maxsize=4)
def _cached_detector(config_class: type[RegionSettings], config_json: str) -> RegionDetector:
    return RegionDetector(config_class.model_validate_json(config_json))


def detect_regions(image: Image.Image, config: RegionSettings) -> list[Box]:
    """The padded, clipped boxes of ``config.regions`` in ``image``.

    Convenience for one-off calls: detectors are built once per distinct config and reused. Stages
    hold their own :class:`RegionDetector` instead.
    """
    return _cached_detector(type(config), config.model_dump_json())(image)
