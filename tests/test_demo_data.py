"""The demo's sample dataset: files, expected outcomes, on-disk modes, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from u2s.demo_data import EXIF_ORIENTATION, SUBFOLDERS, describe_samples, write_sample_dataset
from u2s.io import decode


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("samples")
    return root, write_sample_dataset(root)


def _by_name(samples: list, name: str):
    (match,) = [s for s in samples if s.path.name == name]
    return match


def _decode(path: Path) -> Image.Image:
    """Open, fully load and EXIF-transpose ``path`` into RGB, like the pipeline's decoder."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


def test_files_exist_in_subfolders(dataset):
    root, samples = dataset
    assert len(samples) >= 16
    assert all(s.path.is_file() for s in samples)
    assert len({s.path for s in samples}) == len(samples)
    assert {s.path.parent.name for s in samples} == set(SUBFOLDERS)
    on_disk = {p for p in root.rglob("*") if p.is_file()}
    assert on_disk == {s.path for s in samples}
    assert {s.expected for s in samples} == {"image", "error"}
    assert sum(s.expected == "error" for s in samples) >= 3


def test_images_are_small(dataset):
    _, samples = dataset
    for s in samples:
        assert s.path.stat().st_size < 128 * 1024, s.path
        if s.expected == "image" and s.kind not in {"name-badge", "phone-number", "licence-plate"}:
            with Image.open(s.path) as img:
                assert max(img.size) <= 384, s.path
    with Image.open(_by_name(samples, "astronaut.jpg").path) as img:
        assert max(img.size) == 256


def test_expected_matches_reality(dataset, monkeypatch):
    _, samples = dataset
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    for s in samples:
        if s.expected == "image":
            img = _decode(s.path)
            assert img.mode == "RGB" and img.width > 0 and img.height > 0, s.path
        else:
            with pytest.raises((OSError, SyntaxError, ValueError)):
                _decode(s.path)


def test_broken_files(dataset):
    _, samples = dataset
    assert _by_name(samples, "empty.jpg").path.stat().st_size == 0
    assert _by_name(samples, "not_an_image.png").path.read_bytes().isascii()
    truncated = _by_name(samples, "truncated.jpg").path.read_bytes()
    assert truncated.startswith(b"\xff\xd8") and not truncated.endswith(b"\xff\xd9")


def test_decoder_agrees(dataset):
    """The pipeline's own decoder gives RGB for every "image" sample and an error for the others."""
    _, samples = dataset
    for s in samples:
        if s.expected == "image":
            assert decode.load_rgb(s.path.read_bytes()).mode == "RGB", s.path
        else:
            with pytest.raises(decode.DecodeError):
                decode.load_rgb(s.path.read_bytes())


def test_exif_rotated_is_stored_sideways(dataset):
    _, samples = dataset
    rotated = _by_name(samples, "exif_rotated.jpg")
    with Image.open(rotated.path) as img:
        assert img.getexif()[EXIF_ORIENTATION] == 6
        assert img.width < img.height  # stored portrait
    upright = _decode(rotated.path)
    assert upright.size == (256, 192)  # displayed landscape
    # The upright pixels match the astronaut's top rows, not a rotated copy of them.
    with Image.open(_by_name(samples, "astronaut.jpg").path) as ref:
        top = np.asarray(ref.convert("RGB").crop((0, 0, 256, 192)), dtype=np.float64)
    got = np.asarray(upright, dtype=np.float64)
    assert np.abs(got - top).mean() < 12
    flipped = np.asarray(upright.transpose(Image.Transpose.ROTATE_180), dtype=np.float64)
    assert np.abs(flipped - top).mean() > 30


@pytest.mark.parametrize(
    ("name", "modes"),
    [
        ("cmyk.jpg", {"CMYK"}),
        ("rgba_transparent.png", {"RGBA"}),
        ("palette_transparent.png", {"P"}),
        ("palette.gif", {"P"}),
        ("gray16.png", {"I;16", "I;16B", "I"}),
        ("page.png", {"L"}),
        ("camera_gray.png", {"L"}),
    ],
)
def test_modes_on_disk(dataset, name, modes):
    _, samples = dataset
    with Image.open(_by_name(samples, name).path) as img:
        assert img.mode in modes


def test_format_details(dataset):
    _, samples = dataset
    gray16 = _by_name(samples, "gray16.png").path.read_bytes()
    assert gray16[24] == 16 and gray16[25] == 0  # IHDR: bit depth 16, colour type grayscale
    with Image.open(_by_name(samples, "gray16.png").path) as img:
        assert int(np.asarray(img).max()) > 255
    with Image.open(_by_name(samples, "rgba_transparent.png").path) as img:
        alpha = np.asarray(img.getchannel("A"))
    assert alpha.min() == 0 and alpha.max() == 255 and (alpha == 128).any()
    with Image.open(_by_name(samples, "palette_transparent.png").path) as img:
        assert "transparency" in img.info


def test_text_is_ocr_sized(dataset):
    """Each rendered text line is at least 40 px tall (dark ink rows on the plain background)."""
    _, samples = dataset
    for name in ("phone_number.png", "licence_plate.png"):
        with Image.open(_by_name(samples, name).path) as img:
            ink = np.asarray(img.convert("L")) < 60
        rows = np.flatnonzero(ink[:, 40:-40].any(axis=1))  # skip the plate's outline at the sides
        rows = rows[(rows > 40) & (rows < 160)]  # and its top/bottom border
        assert rows.max() - rows.min() + 1 >= 40, name


def test_deterministic_and_idempotent(dataset, tmp_path):
    root, samples = dataset
    again = write_sample_dataset(tmp_path)
    assert [s.path.relative_to(tmp_path) for s in again] == [s.path.relative_to(root) for s in samples]
    assert [(s.kind, s.expected) for s in again] == [(s.kind, s.expected) for s in samples]
    for a, b in zip(samples, again, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes(), a.path.name
    # Rewriting the same folder removes stale files in our subfolders and leaves others alone.
    (tmp_path / "scenes" / "stale.jpg").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("mine")
    third = write_sample_dataset(tmp_path)
    assert not (tmp_path / "scenes" / "stale.jpg").exists()
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert [s.path.read_bytes() for s in third] == [s.path.read_bytes() for s in samples]


def test_describe_samples(dataset):
    _, samples = dataset
    table = describe_samples(samples)
    lines = table.splitlines()
    assert len(lines) == len(samples) + 2
    assert lines[0].split() == ["path", "kind", "expected", "bytes", "header"]
    assert "people/astronaut.jpg" in table and "JPEG CMYK" in table and "unreadable" in table
    assert describe_samples([]) == "(no samples)"
