"""Models behind the metrics: face embedders, OCR, CLIP and LPIPS loaders. Heavy imports stay inside.

Face embedders map an RGB image to an ``(n_faces, dim)`` array of identity embeddings:

- :class:`DlibFaceEmbedder` (default, fully offline): the HOG detector the baselines use
  (:class:`u2s.stage2.detectors.FaceDetector`), dlib's 5-point shape predictor and its face-recognition
  ResNet (128-d), whose weights ship in the ``face_recognition_models`` package.
- :class:`AntelopeFaceEmbedder` (InsightFace ``antelopev2``, the paper's model, when a folder is given):
  the SCRFD detector and the ArcFace recognizer ONNX files, run with onnxruntime. The decoding,
  5-point alignment and normalisation follow InsightFace's own ``SCRFD``/``ArcFaceONNX`` classes;
  they are written here because the ``insightface`` package builds C extensions and pulls a large
  dependency set for these ~100 lines of pre/post-processing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import ModelConfig
    from u2s.eval.config import FaceConfig, OcrConfig

#: face_recognition_models' files (located without importing the package: its __init__ needs
#: pkg_resources, which recent setuptools no longer ship).
DLIB_SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"
DLIB_FACE_MODEL = "dlib_face_recognition_resnet_model_v1.dat"

#: ArcFace's 5-point template in a 112 × 112 crop (eyes, nose tip, mouth corners), InsightFace's values.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def face_recognition_models_file(name: str) -> Path:
    """Path of a model file shipped in the ``face_recognition_models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face_recognition_models is not installed", name="face_recognition_models")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} is missing from face_recognition_models")
    return path


def square(image: Image.Image, size: int) -> Image.Image:
    """``image`` resized to ``size`` × ``size`` (aspect not kept: the paper's FaceSim input)."""
    from PIL import Image

    rgb = image.convert("RGB")
    return rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.Resampling.BILINEAR)


class DlibFaceEmbedder:
    """dlib HOG faces → 5 landmarks → 128-d face-recognition ResNet embeddings."""

    def __init__(self, upsample: int = 1) -> None:
        import dlib

        from u2s.stage2.detectors import FaceDetector

        self.detector = FaceDetector(upsample=upsample)
        self.shapes = dlib.shape_predictor(str(face_recognition_models_file(DLIB_SHAPE_MODEL)))
        self.net = dlib.face_recognition_model_v1(str(face_recognition_models_file(DLIB_FACE_MODEL)))

    def __call__(self, image: Image.Image) -> np.ndarray:
        import dlib

        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        out = []
        for left, top, right, bottom in self.detector(image):
            shape = self.shapes(rgb, dlib.rectangle(left, top, right - 1, bottom - 1))
            out.append(np.asarray(self.net.compute_face_descriptor(rgb, shape), dtype=np.float32))
        return np.stack(out) if out else np.zeros((0, 128), np.float32)


# --------------------------------------------------------------------------------- InsightFace antelopev2


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression (InsightFace's SCRFD.nms, IoU with +1 areas)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= threshold]
    return keep


class ScrfdDetector:
    """InsightFace's SCRFD face detector (``scrfd_*_bnkps.onnx``): boxes, scores and 5 keypoints.

    The image is scaled into a ``det_size`` square (top-left, aspect kept), normalised to
    ``(x - 127.5) / 128``; the outputs are per-stride scores, box distances and keypoint offsets.
    """

    def __init__(self, path: str, det_size: int = 512, threshold: float = 0.5, nms: float = 0.4) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=_providers(ort))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.det_size, self.threshold, self.nms = det_size, threshold, nms
        n = len(self.output_names)
        if n not in (6, 9, 10, 15):
            raise ValueError(f"not an SCRFD detector: {n} outputs")
        self.levels = 3 if n in (6, 9) else 5
        self.strides = [8, 16, 32] if self.levels == 3 else [8, 16, 32, 64, 128]
        self.anchors = 2 if self.levels == 3 else 1
        self.has_kps = n in (9, 15)

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes (n, 5) = x1, y1, x2, y2, score; keypoints (n, 5, 2))`` in ``image``'s pixels."""
        from PIL import Image

        size = self.det_size
        scale = size / max(image.width, image.height)
        new = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        canvas = np.zeros((size, size, 3), np.float32)
        canvas[: new[1], : new[0]] = np.asarray(image.convert("RGB").resize(new, Image.Resampling.BILINEAR))
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: blob})
        scores, boxes, kpss = [], [], []
        for level, stride in enumerate(self.strides):
            score = outs[level].reshape(-1)
            dist = outs[level + self.levels].reshape(-1, 4) * stride
            ys, xs = np.mgrid[: size // stride, : size // stride]
            centers = (np.stack([xs, ys], axis=-1).reshape(-1, 2) * stride).astype(np.float32)
            centers = np.repeat(centers, self.anchors, axis=0)
            keep = np.where(score >= self.threshold)[0]
            c = centers[keep]
            scores.append(score[keep])
            boxes.append(np.concatenate([c - dist[keep, :2], c + dist[keep, 2:]], axis=1))
            if self.has_kps:
                offsets = outs[level + 2 * self.levels].reshape(-1, 5, 2)[keep] * stride
                kpss.append(c[:, None, :] + offsets)
        score = np.concatenate(scores)
        box = np.concatenate(boxes) / scale
        kps = np.concatenate(kpss) / scale if self.has_kps else np.zeros((len(score), 5, 2), np.float32)
        keep = _nms(box, score, self.nms) if len(score) else []
        return np.concatenate([box[keep], score[keep, None]], axis=1), kps[keep]


class ArcFaceRecognizer:
    """InsightFace's ArcFace recognizer (``glintr100.onnx``): 5-point similarity alignment to 112 × 112,
    ``(x - 127.5) / 127.5``, one embedding per face."""

    def __init__(self, path: str) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=_providers(ort))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[2])

    def align(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        import cv2
        from skimage.transform import SimilarityTransform

        template = ARCFACE_TEMPLATE * (self.size / 112.0)
        matrix = SimilarityTransform.from_estimate(kps, template).params[:2]
        return cv2.warpAffine(rgb, matrix, (self.size, self.size), borderValue=0.0)

    def __call__(self, rgb: np.ndarray, kpss: np.ndarray) -> np.ndarray:
        if not len(kpss):
            return np.zeros((0, self.session.get_outputs()[0].shape[-1] or 0), np.float32)
        crops = np.stack([self.align(rgb, kps) for kps in kpss]).astype(np.float32)
        blob = ((crops - 127.5) / 127.5).transpose(0, 3, 1, 2)
        return np.asarray(self.session.run(None, {self.input_name: blob})[0], dtype=np.float32)


def _providers(ort: Any) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def find_antelope_models(folder: str) -> tuple[str, str]:
    """``(detector, recognizer)`` ONNX files in an antelopev2 folder, told apart by their signatures as
    InsightFace's model zoo does: the detector has 6+ outputs, the recognizer one square input of at least
    112 px (the landmark and gender/age models in the folder are not used)."""
    import onnxruntime as ort

    detector = recognizer = None
    for path in sorted(Path(folder).glob("*.onnx")):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inputs, outputs = session.get_inputs(), session.get_outputs()
        shape = inputs[0].shape
        if len(outputs) >= 5:
            detector = detector or str(path)
        elif (
            len(inputs) == 1 and len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3]
            and shape[2] >= 112 and shape[2] % 16 == 0
        ):  # fmt: skip
            recognizer = recognizer or str(path)
    if detector is None or recognizer is None:
        raise FileNotFoundError("antelopev2 folder needs a SCRFD detector and an ArcFace recognizer (.onnx)")
    return detector, recognizer


class AntelopeFaceEmbedder:
    """InsightFace antelopev2: SCRFD faces (``det_size``) → aligned ArcFace embeddings (512-d)."""

    def __init__(self, folder: str, det_size: int = 512, threshold: float = 0.5) -> None:
        detector, recognizer = find_antelope_models(folder)
        self.detector = ScrfdDetector(detector, det_size=det_size, threshold=threshold)
        self.recognizer = ArcFaceRecognizer(recognizer)

    def __call__(self, image: Image.Image) -> np.ndarray:
        _, kpss = self.detector(image)
        return self.recognizer(np.ascontiguousarray(np.asarray(image.convert("RGB"))), kpss)


def load_face_embedder(config: FaceConfig) -> DlibFaceEmbedder | AntelopeFaceEmbedder:
    """The embedder ``config`` selects (antelopev2 when a model folder is set, else dlib)."""
    if config.resolved_backend() == "antelopev2":
        assert config.model_dir  # enforced by FaceConfig
        return AntelopeFaceEmbedder(config.model_dir, config.det_size, config.det_threshold)
    return DlibFaceEmbedder(config.upsample)


# ------------------------------------------------------------------------------------------- OCR, CLIP


class OcrReader:
    """Text in an image with rapidocr's bundled detector + recognizer; lines joined by newlines.

    The text read is private content: it is compared, never logged or stored.
    """

    def __init__(self, config: OcrConfig, threads: int | None = None) -> None:
        from u2s.stage2.detectors import load_rapidocr

        self.engine = load_rapidocr(
            recognise=True, min_score=config.min_score, threads=threads, max_side=config.max_side
        )

    def __call__(self, image: Image.Image) -> str:
        result = self.engine(image.convert("RGB"))
        return "\n".join(t for t in (getattr(result, "txts", None) or ()) if t)


class ClipEncoder:
    """A CLIP model (transformers ``CLIPModel`` + processor) by HF id or path: unit-norm embeddings.

    Images are resized to the model's input square with bicubic interpolation and no crop (the whole
    picture, as InstructPix2Pix's ``ClipSimilarity`` that the paper uses), then normalised by the
    processor; captions are truncated to the text model's context.
    """

    def __init__(self, model: ModelConfig) -> None:
        import transformers

        from u2s.torch_utils import resolve_device, resolve_dtype

        load: dict[str, Any] = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
        self.device = resolve_device(model.device)
        self.processor = transformers.AutoProcessor.from_pretrained(model.model, **load)
        dtype = resolve_dtype(model.dtype, self.device)
        self.model = transformers.CLIPModel.from_pretrained(model.model, dtype=dtype, **load)
        self.model.to(self.device).eval()
        self.image_size = int(self.model.config.vision_config.image_size)
        self.context = int(self.model.config.text_config.max_position_embeddings)

    def images(self, images: list[Image.Image]) -> Any:
        import torch
        from PIL import Image

        side = (self.image_size, self.image_size)
        resized = [img.convert("RGB").resize(side, Image.Resampling.BICUBIC) for img in images]
        inputs = self.processor.image_processor(
            images=resized, do_resize=False, do_center_crop=False, return_tensors="pt"
        )
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        with torch.inference_mode():
            features = _features(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def texts(self, texts: list[str]) -> Any:
        import torch

        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=self.context, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            features = _features(self.model.get_text_features(**tokens))
        return torch.nn.functional.normalize(features.float(), dim=-1)


def _features(output: Any) -> Any:
    """``get_*_features`` returns a tensor, or (newer transformers) an output whose pooler holds it."""
    return output if hasattr(output, "dim") else output.pooler_output


def load_lpips(net: str, device: str = "auto") -> Any:
    """``lpips.LPIPS(net=net)`` in eval mode. Its backbone comes from torchvision (and torchvision's
    pretrained weights): where either cannot load, this raises and the metric is reported unavailable."""
    import lpips

    from u2s.torch_utils import resolve_device

    model = lpips.LPIPS(net=net, verbose=False).eval()
    return model.to(resolve_device(device))
