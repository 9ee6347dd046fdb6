"""InsightFace antelopev2 through the path users take (a model folder → onnxruntime), on tiny ONNX models
with antelopev2's signatures (built and exported with torch.onnx by the test), and the dlib model files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from u2s.eval.config import EvalConfig
from u2s.eval.detectors import (
    DLIB_FACE_MODEL,
    AntelopeFaceEmbedder,
    face_recognition_models_file,
    find_antelope_models,
    load_face_embedder,
)
from u2s.eval.metrics import Pair, Skip
from u2s.eval.privacy import FaceFamily
from u2s.testing.tiny_models import TINY_SCRFD_KPS, build_tiny_antelopev2


@pytest.fixture(scope="module")
def antelope(tmp_path_factory):
    return build_tiny_antelopev2(tmp_path_factory.mktemp("antelopev2"))


def _square_face(size: int = 256, at: tuple[int, int] = (128, 128), side: int = 64) -> Image.Image:
    """A black picture with one white square: what the tiny detector sees as a face."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[at[1] : at[1] + side, at[0] : at[0] + side] = 255
    return Image.fromarray(pixels)


def test_antelope_folder_is_found_by_model_signatures(antelope, tmp_path):
    detector, recognizer = find_antelope_models(str(antelope))
    assert detector.endswith("scrfd_10g_bnkps.onnx") and recognizer.endswith("glintr100.onnx")
    with pytest.raises(FileNotFoundError):
        find_antelope_models(str(tmp_path))


def test_scrfd_decoding_gives_the_box_and_keypoints_of_the_square(antelope):
    embedder = AntelopeFaceEmbedder(str(antelope), det_size=128)
    boxes, kps = embedder.detector(_square_face())
    # Det input: the 256 px picture at scale 0.5; the square fills the stride-32 cell (2, 2), whose anchor
    # is at (64, 64): the box is one stride around it, the keypoints are anchor + offset × stride.
    assert boxes.shape == (1, 5) and kps.shape == (1, 5, 2)
    np.testing.assert_allclose(boxes[0, :4], [64, 64, 192, 192], atol=1e-3)
    expected = (np.array([64.0, 64.0]) + np.array(TINY_SCRFD_KPS) * 32) * 2
    np.testing.assert_allclose(kps[0], expected, atol=1e-3)
    empty, _ = embedder.detector(Image.new("RGB", (256, 256)))
    assert empty.shape == (0, 5)


def test_scrfd_score_at_native_size(antelope):
    embedder = AntelopeFaceEmbedder(str(antelope), det_size=256)
    boxes, _ = embedder.detector(_square_face(at=(128, 128), side=32))  # exactly stride-32 cell (4, 4)
    np.testing.assert_allclose(boxes[:, :4], [[96, 96, 160, 160]], atol=1e-4)
    white = (255 - 127.5) / 128  # SCRFD's input normalisation; the score head is 10/3 per channel - 5
    assert boxes[0, 4] == pytest.approx(1 / (1 + np.exp(-(10 * white - 5))), abs=1e-5)


def test_facesim_runs_on_antelopev2_when_a_folder_is_given(antelope):
    cfg = EvalConfig.model_validate({
        "original": {"uri": "/unused"}, "methods": {"m": "/unused"}, "out": "/unused",
        "metrics": ["face_sim", "face_sim_strict"],
        "models": {"face": {"model_dir": str(antelope), "size": 256, "det_size": 128}},
    })  # fmt: skip
    assert isinstance(load_face_embedder(cfg.models.face), AntelopeFaceEmbedder)
    family = FaceFamily(cfg, ["face_sim", "face_sim_strict"])
    face, moved = _square_face(), _square_face(at=(64, 64))
    same, vanished, no_face, elsewhere = family.score([
        Pair("a", "m", face, face.copy()),
        Pair("b", "m", face, Image.new("RGB", (256, 256))),
        Pair("c", "m", Image.new("RGB", (256, 256)), face),
        Pair("d", "m", face, moved),
    ])  # fmt: skip
    assert same == {"face_sim": pytest.approx(1.0, abs=1e-5), "face_sim_strict": pytest.approx(1.0, abs=1e-5)}
    assert vanished == {"face_sim": Skip("no face in the anonymized image"), "face_sim_strict": 0.0}
    assert no_face["face_sim"] == no_face["face_sim_strict"] == Skip("no face in the original")
    assert -1.0 <= elsewhere["face_sim"] <= 1.0


def test_dlib_model_files_ship_in_face_recognition_models():
    assert face_recognition_models_file(DLIB_FACE_MODEL).stat().st_size > 1_000_000
