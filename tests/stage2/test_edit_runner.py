"""EditStage over real Arrow batches with the tiny InstructPix2Pix pipeline: seeds, working sizes,
buckets, failures, and outputs that equal their inputs (never published)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from u2s.config import ModelConfig, Resources, Stage2Config
from u2s.schema import new_row, rows_to_table
from u2s.stage2.editors.base import fit_long_side
from u2s.stage2.runner import EditStage, encode_image, row_seed, same_pixels
from u2s.testing.images import noise_image

# --- row_seed -----------------------------------------------------------------------------------------


def test_row_seed_is_the_same_in_every_process():
    """A rerun (another process, another hash seed) must reproduce each row's edit: no salted hash()."""
    code = "from u2s.stage2.runner import row_seed; print(row_seed(42, 'coco/000000123.jpg'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert int(done.stdout) == row_seed(42, "coco/000000123.jpg")


def test_row_seed_range_and_sensitivity():
    seeds = {row_seed(base, rid) for base in (0, 1, 42) for rid in ("a", "b", "img-1", "img-2")}
    assert len(seeds) == 12  # every base seed and every row id changes it
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)


# --- fit_long_side (the IP2P family's working size) -----------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "resolution", "expected"),
    [
        (77, 50, 128, (128, 64)),
        (50, 77, 128, (64, 128)),
        (64, 64, 128, (128, 128)),
        (640, 480, 512, (512, 384)),
        (4000, 3000, 512, (512, 384)),
        (1920, 1080, 512, (512, 320)),  # 288 → nearest multiple of 64
        (1000, 10, 512, (512, 64)),  # short side never below 64
        (10, 10, 64, (64, 64)),
        (300, 200, 100, (128, 64)),  # the long side is rounded to a multiple of 64 too
    ],
)
def test_fit_long_side(width, height, resolution, expected):
    assert fit_long_side(width, height, resolution) == expected


def test_fit_long_side_rejects_empty_images():
    with pytest.raises(ValueError):
        fit_long_side(0, 10, 512)


def test_same_pixels():
    img = noise_image(20, 10, 0)
    assert same_pixels(img, img.copy()) and same_pixels(img, img.convert("RGBA"))
    changed = img.copy()
    changed.putpixel((19, 9), (0, 0, 0) if img.getpixel((19, 9)) != (0, 0, 0) else (1, 1, 1))
    assert not same_pixels(img, changed)
    assert not same_pixels(img, img.resize((10, 20)))


# --- encoding ------------------------------------------------------------------------------------------


def test_encode_image_formats():
    img = noise_image(40, 30, 0)
    for fmt, suffix in (("PNG", "png"), ("WEBP", "webp")):  # lossless: the editor's exact pixels
        data, ext = encode_image(img, fmt)
        decoded = Image.open(io.BytesIO(data))
        assert ext == suffix and decoded.format == fmt
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(img))
    data, ext = encode_image(img, "JPEG")
    decoded = Image.open(io.BytesIO(data))
    assert ext == "jpg" and decoded.format == "JPEG" and decoded.size == (40, 30)


# --- EditStage -----------------------------------------------------------------------------------------


def _config(tiny_models, **overrides) -> Stage2Config:
    ip2p = dict(
        model=ModelConfig(model=str(tiny_models["instruct_pix2pix"]), dtype="float32", device="cpu"),
        num_inference_steps=2, resolution=128,
    )  # fmt: skip
    fields = dict(instruct_pix2pix=ip2p, seed=42, resources=Resources(batch_size=2, torch_threads=1))
    return Stage2Config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def stage(tiny_models) -> EditStage:
    return EditStage(_config(tiny_models))


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _flagged(rid: str, data: bytes, size: tuple[int, int] | None) -> dict:
    row = new_row(rid, f"src/{rid}", "people", data)
    row.update(privacy_flag=True, categories=["people"], public_caption="a person in a room",
               private_caption="PRIVATE", edit_instruction="change the face and the shirt")  # fmt: skip
    if size:
        row["width"], row["height"] = size
    return row


def _rows() -> list[dict]:
    rotated = Image.Exif()
    rotated[0x0112] = 6  # stored 77x50, upright 50x77
    rows = [
        _flagged("wide-1", _encode(noise_image(77, 50, 1)), (77, 50)),
        _flagged("wide-2", _encode(noise_image(80, 52, 2), "JPEG", quality=90), (80, 52)),
        _flagged("wide-3", _encode(noise_image(77, 50, 3)), None),  # no size columns: decoded size
        _flagged("tall", _encode(noise_image(50, 77, 4)), (50, 77)),
        _flagged("exif", _encode(noise_image(77, 50, 5), "JPEG", exif=rotated), (50, 77)),
        _flagged("square", _encode(noise_image(64, 64, 6)), (64, 64)),
        _flagged("corrupt", b"\x89PNG\r\n\x1a\n not really", None),
    ]
    kept = new_row("kept", "src/kept", "cat", _encode(noise_image(70, 40, 7)))
    kept.update(width=70, height=40, status="kept", privacy_flag=False, categories=[])
    errored = _flagged("errored", _encode(noise_image(64, 64, 8)), (64, 64))
    errored.update(status="error", error="instruct: invalid output")
    waiting = _flagged("no-instruction", _encode(noise_image(64, 64, 9)), (64, 64))
    waiting["edit_instruction"] = None
    return [*rows, kept, errored, waiting]


EDITED = ("wide-1", "wide-2", "wide-3", "tall", "exif", "square")
UNTOUCHED = ("kept", "errored", "no-instruction")
UNCHANGED_COLUMNS = ("source", "label", "privacy_flag", "categories", "public_caption", "private_caption",
                     "edit_instruction")  # fmt: skip


def _without_timings(table: pa.Table) -> pa.Table:
    return table.drop_columns(["timings"])


def test_edit_stage_edits_flagged_rows_only(stage):
    inputs = _rows()
    table = rows_to_table(inputs)
    out = {row["id"]: row for row in stage(table).to_pylist()}
    expected_input = {row["id"]: row for row in rows_to_table(inputs).to_pylist()}
    assert list(out) == [row["id"] for row in inputs]  # order and count preserved

    for rid in EDITED:
        row, before = out[rid], expected_input[rid]
        assert row["status"] == "edited" and row["error"] is None, rid
        assert row["editor"] == "instruct_pix2pix"
        assert row["seed"] == row_seed(42, rid)
        assert row["image"]["path"] == f"{rid}.jpg"  # a diffusion editor's outputs: JPEG q95 (auto)
        assert row["image"]["bytes"] != before["image"]["bytes"]
        decoded = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert decoded.format == "JPEG" and decoded.mode == "RGB"
        original = Image.open(io.BytesIO(before["image"]["bytes"]))
        upright = (50, 77) if rid == "exif" else original.size
        assert decoded.size == upright == (row["width"], row["height"]), rid
        assert row["timings"]["edit"] is not None and row["timings"]["edit"] > 0
        for column in UNCHANGED_COLUMNS:
            assert row[column] == before[column]

    corrupt = out["corrupt"]
    assert corrupt["status"] == "error" and corrupt["error"].startswith("edit: ")
    assert corrupt["image"] == expected_input["corrupt"]["image"] and corrupt["seed"] is None

    for rid in UNTOUCHED:
        assert out[rid] == expected_input[rid], rid  # byte-identical, no timings, no seed
        assert out[rid]["timings"]["edit"] is None


def test_edit_stage_is_deterministic(stage, tiny_models):
    table = rows_to_table(_rows())
    first = _without_timings(stage(table))
    assert _without_timings(stage(table)).equals(first)
    fresh = EditStage(_config(tiny_models))  # another actor loading the same model
    assert _without_timings(fresh(table)).equals(first)


def test_edit_stage_buckets_chunks_and_isolates_failures(stage, monkeypatch):
    calls = []
    real_edit = stage.editor.edit

    def spy(images, prompts, seeds):
        sizes = {img.size for img in images}
        calls.append((sizes, len(images)))
        if sizes == {(64, 128)}:
            raise RuntimeError("device fell over: 'change the face'")
        return real_edit(images, prompts, seeds)

    monkeypatch.setattr(stage.editor, "edit", spy)
    out = {row["id"]: row for row in stage(rows_to_table(_rows())).to_pylist()}

    assert all(len(sizes) == 1 and 1 <= n <= 2 for sizes, n in calls)  # one size per call, batch_size 2
    assert sorted((next(iter(s)), n) for s, n in calls) == [
        ((64, 128), 2), ((128, 64), 1), ((128, 64), 2), ((128, 128), 1)
    ]  # fmt: skip
    for rid in ("tall", "exif"):  # the failed bucket: errored, without the exception's text
        assert out[rid]["status"] == "error"
        assert out[rid]["error"] == "edit: editor failed (RuntimeError)"
    for rid in ("wide-1", "wide-2", "wide-3", "square"):
        assert out[rid]["status"] == "edited"


def test_edit_stage_lossless_output(tiny_models):
    png_stage = EditStage(_config(tiny_models, output_format="PNG"))
    row = _flagged("one", _encode(noise_image(90, 60, 0)), (90, 60))
    (out,) = png_stage(rows_to_table([copy.deepcopy(row)])).to_pylist()
    assert out["status"] == "edited" and out["image"]["path"] == "one.png"
    decoded = Image.open(io.BytesIO(out["image"]["bytes"]))
    assert decoded.format == "PNG" and decoded.size == (90, 60)


def test_unchanged_output_is_an_error_row_not_a_published_image(stage, monkeypatch):
    """An editor that returns (some of) its inputs as they came: those rows are errors, without content."""
    real_edit = stage.editor.edit

    def lazy(images, prompts, seeds):
        out = real_edit(images, prompts, seeds)
        return [
            img.copy() if p.edit_instruction == "leave it" else o
            for img, p, o in zip(images, prompts, out, strict=True)
        ]

    monkeypatch.setattr(stage.editor, "edit", lazy)
    rows = _rows()
    for row in rows:
        if row["id"] in ("wide-1", "tall"):
            row["edit_instruction"] = "leave it"
    out = {row["id"]: row for row in stage(rows_to_table(copy.deepcopy(rows))).to_pylist()}
    before = {row["id"]: row for row in rows}
    for rid in ("wide-1", "tall"):
        assert out[rid]["status"] == "error" and out[rid]["error"] == "edit: editor left the image unchanged"
        assert out[rid]["image"]["bytes"] == before[rid]["image"]["bytes"]  # nothing new was encoded
        assert out[rid]["editor"] is None and out[rid]["seed"] is None
    for rid in ("wide-2", "wide-3", "exif", "square"):  # the rest of the same batches: edited
        assert out[rid]["status"] == "edited", rid
