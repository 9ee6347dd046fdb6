"""Full editor calls: a stream at the paper preset's batch sizes gives the editor calls of ``max_batch``
images, aspect buckets share calls across native sizes, and a row's output does not depend on its
batch-mates. The editor is InstructPix2Pix's class (its real working sizes) with the model call replaced
by a deterministic, seeded pixel change that records each call."""

from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest
import yaml
from PIL import Image

from u2s.config import Stage2Config, preset_text
from u2s.schema import new_row, rows_to_table
from u2s.stage2.editors import EDITORS, register_editor
from u2s.stage2.editors.base import Editor, EditorConfig, nearest_aspect
from u2s.stage2.editors.instruct_pix2pix import InstructPix2PixEditor
from u2s.stage2.runner import EditStage, mean_call_size

#: COCO-like native sizes: two landscape 4:3, a portrait 3:4 and a portrait 2:3 (nearest bucket 3:4).
LANDSCAPE = [(640, 480), (500, 375)]
PORTRAIT = [(480, 640), (427, 640)]
#: Sizes of 32 consecutive flagged rows: 16 landscape and 16 portrait, but 9 and 7 of the two portrait
#: sizes, whose own working sizes differ (384×512, 320×512): only the 3:4 bucket puts them in full calls.
CYCLE = [LANDSCAPE[0]] * 11 + [LANDSCAPE[1]] * 5 + [PORTRAIT[0]] * 9 + [PORTRAIT[1]] * 7


class RecordingEditor(InstructPix2PixEditor):
    """InstructPix2Pix's working sizes and bucketing; each call recorded, the model replaced by a byte
    derived from the seed XORed into the image (an output depends on its own image and seed only)."""

    name = "recording_ip2p"
    config_class = EditorConfig

    def __init__(self, stage2, storage=None) -> None:
        Editor.__init__(self, stage2, storage)
        self.config = stage2.section("instruct_pix2pix")  # the preset's IP2P settings; no model loaded
        self.calls: list[tuple[tuple[int, int], int]] = []  # (size, images) per call

    def _edit(self, images, prompts, seeds):
        self.calls.append((images[0].size, len(images)))
        return [
            Image.fromarray(np.asarray(img) ^ np.uint8(1 + seed % 255))
            for img, seed in zip(images, seeds, strict=True)
        ]


@pytest.fixture(scope="module")
def recording():
    register_editor(RecordingEditor)
    yield RecordingEditor
    EDITORS.pop(RecordingEditor.name)


def _paper_stage2(**overrides) -> Stage2Config:
    """The paper preset's stage 2 with the recording editor (verification off: outputs are published)."""
    tree = yaml.safe_load(preset_text("paper"))["stage2"]
    return Stage2Config.model_validate(
        {**tree, "editor": RecordingEditor.name, "verify": {"checks": []}, **overrides}
    )


_PNG: dict[tuple[int, int], bytes] = {}


def _png(size: tuple[int, int]) -> bytes:
    """A solid-colour PNG of ``size``: a few hundred bytes, decoded at full size by the runner."""
    if size not in _PNG:
        buf = io.BytesIO()
        Image.new("RGB", size, (90, 120, 150)).save(buf, format="PNG")
        _PNG[size] = buf.getvalue()
    return _PNG[size]


def _row(rid: str, size: tuple[int, int], flagged: bool) -> dict:
    row = new_row(rid, f"src/{rid}", "people", _png(size))
    row.update(width=size[0], height=size[1], privacy_flag=flagged)
    if flagged:
        row.update(categories=["people"], public_caption="a person", private_caption="PRIVATE",
                   edit_instruction="change the face")  # fmt: skip
    return row


def _stream(rows: int) -> list[dict]:
    """``rows`` rows, every fourth one flagged (25%), the flagged ones cycling through :data:`CYCLE`."""
    out = []
    for i in range(rows):
        flagged = i % 4 == 0
        size = CYCLE[(i // 4) % len(CYCLE)] if flagged else LANDSCAPE[0]
        out.append(_row(f"r{i:05d}", size, flagged))
    return out


def _decoded_size(image: dict) -> tuple[int, int]:
    with Image.open(io.BytesIO(image["bytes"])) as img:
        return img.size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 480), (640, 480)),
        ((500, 375), (500, 375)),
        ((427, 640), (480, 640)),  # 2:3 → 3:4
        ((640, 427), (640, 480)),  # 3:2 → 4:3
        ((1920, 1080), (1920, 1080)),
        ((1000, 10), (1000, 562)),  # beyond the widest ratio: 16:9
        ((612, 612), (612, 612)),
    ],
)
def test_nearest_aspect(size, expected):
    ratios = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16)]
    assert nearest_aspect(*size, ratios) == expected


def test_buckets_apply_to_fixed_resolution_editors_only(recording):
    buckets = [[1, 1], [4, 3], [3, 4], [16, 9], [9, 16]]
    ip2p = EditStage(_paper_stage2(aspect_buckets=buckets)).editor
    assert {ip2p.bucket_size(*s) for s in PORTRAIT} == {(384, 512)}
    assert {ip2p.bucket_size(*s) for s in LANDSCAPE} == {(512, 384)}
    own = EditStage(_paper_stage2(aspect_buckets=None)).editor
    assert {own.bucket_size(*s) for s in PORTRAIT} == {(384, 512), (320, 512)}
    blur = EditStage(_paper_stage2(editor="blur_image", aspect_buckets=buckets)).editor  # native size
    assert [blur.bucket_size(*s) for s in PORTRAIT] == PORTRAIT


def test_paper_preset_fills_editor_calls_at_a_quarter_flagged(recording):
    """Ray batches of the preset's size, 25% flagged, four COCO sizes: every call holds max_batch images
    except the last of each size in the stream's last (short) Ray batch; each flagged row is edited once
    and keeps its size."""
    config = _paper_stage2()
    step, max_batch = config.resources.batch_size, config.max_batch
    assert max_batch is not None and config.aspect_buckets
    stage = EditStage(config)
    rows = _stream(step + 100)  # a full Ray batch, then a short one
    per_batch: list[list[tuple[tuple[int, int], int]]] = []
    out: dict[str, dict] = {}
    for start in range(0, len(rows), step):
        before = len(stage.editor.calls)
        result = stage(rows_to_table(rows[start : start + step]))
        out.update((row["id"], row) for row in result.to_pylist())
        per_batch.append(stage.editor.calls[before:])

    full, last = per_batch
    assert full and all(n == max_batch for _, n in full), full
    assert {size for size, _ in full} == {(512, 384), (384, 512)}  # two buckets for four native sizes
    for size in {size for size, _ in last}:
        sizes = [n for s, n in last if s == size]
        assert all(n == max_batch for n in sizes[:-1]) and 1 <= sizes[-1] <= max_batch
    flagged = [row for row in rows if row["privacy_flag"]]
    assert sum(n for calls in per_batch for _, n in calls) == len(flagged)
    assert len(out) == len(rows)
    for row in flagged:
        done = out[row["id"]]
        assert done["status"] == "edited" and done["error"] is None
        assert (done["width"], done["height"]) == (row["width"], row["height"])
        assert _decoded_size(done["image"]) == (row["width"], row["height"])
    for row in rows[1::4]:  # pass-through rows leave as they came
        assert out[row["id"]]["status"] is None and out[row["id"]]["image"] == row["image"]


def test_paper_preset_expects_full_calls_at_realistic_flag_rates():
    """The preset's Ray batch against its max_batch: ≥ 90% full calls at a 25% flag rate with two
    equally likely working sizes (a landscape and a portrait bucket)."""
    tree = yaml.safe_load(preset_text("paper"))["stage2"]
    rows, max_batch = tree["resources"]["batch_size"], tree["max_batch"]
    assert mean_call_size(rows, 0.25, max_batch, (0.5, 0.5)) / max_batch >= 0.9


@pytest.mark.parametrize(("rows", "flag_rate", "shares"), [(6, 0.3, (1.0,)), (5, 0.5, (0.6, 0.4))])
def test_mean_call_size_matches_enumeration(rows, flag_rate, shares):
    """Against every outcome of a small Ray batch: each row unflagged or flagged into one size."""
    max_batch, outcomes = 2, [(None, 1 - flag_rate)] + [(k, flag_rate * s) for k, s in enumerate(shares)]
    images = calls = 0.0

    def walk(left: int, counts: Counter, prob: float) -> None:
        nonlocal images, calls
        if left == 0:
            images += prob * sum(n for k, n in counts.items() if k is not None)
            calls += prob * sum(math.ceil(n / max_batch) for k, n in counts.items() if k is not None)
            return
        for k, p in outcomes:
            walk(left - 1, counts + Counter({k: 1}), prob * p)

    walk(rows, Counter(), 1.0)
    assert mean_call_size(rows, flag_rate, max_batch, shares) == pytest.approx(images / calls)
    assert mean_call_size(rows, 1.0, max_batch) == max_batch * rows / (
        max_batch * math.ceil(rows / max_batch)
    )


def test_a_rows_output_does_not_depend_on_its_batch_mates(recording):
    """The same row edited alone and inside a full call of other rows (other native sizes of its bucket,
    pass-through rows around): identical output bytes, seed and size."""
    stage = EditStage(_paper_stage2())
    target = _row("target", PORTRAIT[1], True)
    (alone,) = stage(rows_to_table([target])).to_pylist()
    mates = [_row(f"mate{i}", PORTRAIT[i % 2], True) for i in range(stage.config.max_batch - 1)]
    mates += [_row(f"pass{i}", LANDSCAPE[0], False) for i in range(5)]
    before = len(stage.editor.calls)
    crowded = {row["id"]: row for row in stage(rows_to_table([*mates[:3], target, *mates[3:]])).to_pylist()}
    assert stage.editor.calls[before:] == [((384, 512), stage.config.max_batch)]  # one full call with it
    inside = crowded["target"]
    assert alone["status"] == inside["status"] == "edited"
    assert alone["image"]["bytes"] == inside["image"]["bytes"] and alone["seed"] == inside["seed"]
    assert _decoded_size(inside["image"]) == PORTRAIT[1]
