"""Inspect, describe and instruct stages over real Arrow batches, with the tiny models loaded from disk.

A random tiny model's flags depend on its weights, so inspect is checked for structure that holds for
any outcome, on VLMs built with several seeds; describe and instruct get rows whose flags the test sets
itself. Rows come through the real decode stage (vision calls read its thumbnail).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from PIL import Image

from u2s.config import GenerationConfig, Stage1Config
from u2s.schema import Category, mark_error, new_row
from u2s.stage1.describe import DescribeStage
from u2s.stage1.inspect import InspectStage
from u2s.stage1.instruct import InstructStage
from u2s.stage1.schemas import DescribeResult, InstructResult
from u2s.testing.rows import decoded_rows, run_stage
from u2s.testing.tiny_models import tiny_stage1_config

CATEGORY_VALUES = {c.value for c in Category}
SIZES = [(64, 48), (30, 90), (120, 120), (17, 23)]


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, labels: list[str | None] | None = None) -> list[dict]:
    """Rows as decode leaves them: upright size and the VLM thumbnail."""
    images = [_png(*SIZES[i % len(SIZES)], seed=i) for i in range(n)]
    return decoded_rows(images, labels, thumbnail_side=56)


def _config(vlm, llm, **generation: GenerationConfig) -> Stage1Config:
    budgets = {**{"inspect": 256, "describe": 4096, "instruct": 1024}, **generation}
    return tiny_stage1_config(vlm, llm, image_size=56, budgets=budgets, default_class_hint="photo")


def _run(stage, rows: list[dict]) -> list[dict]:
    return run_stage(stage, rows)


def _flagged(rows: list[dict]) -> list[dict]:
    for row in rows:
        row["privacy_flag"], row["categories"] = True, ["people"]
    return rows


@pytest.fixture(scope="module")
def config(tiny_models) -> Stage1Config:
    return _config(tiny_models["vlm"], tiny_models["llm"])


@pytest.fixture(scope="module", params=["shared", 1, 2])
def inspect_stage(request, tiny_models, tmp_path_factory) -> InspectStage:
    """InspectStage on VLMs of several weight seeds ("shared" is the session's tiny model)."""
    from u2s.testing.tiny_models import build_tiny_vlm

    vlm = (
        tiny_models["vlm"]
        if request.param == "shared"
        else build_tiny_vlm(tmp_path_factory.mktemp("vlm"), request.param)
    )
    return InspectStage(_config(vlm, tiny_models["llm"]))


@pytest.fixture(scope="module")
def describe_stage(config) -> DescribeStage:
    return DescribeStage(config)


@pytest.fixture(scope="module")
def instruct_stage(config) -> InstructStage:
    return InstructStage(config)


def test_inspect_sets_flag_and_categories_on_every_in_flight_row(inspect_stage):
    rows = _rows(4)
    broken = new_row("broken", "mem://broken.png", None, b"definitely not an image")
    done = _rows(1)[0] | {"id": "done", "status": "kept", "privacy_flag": False, "categories": []}
    out = _run(inspect_stage, [*rows, broken, done])

    for row in out[:4]:
        assert isinstance(row["privacy_flag"], bool)
        assert row["error"] is None
        assert set(row["categories"]) <= CATEGORY_VALUES
        assert len(row["categories"]) == len(set(row["categories"]))
        assert not row["categories"] or row["privacy_flag"]  # a named category flags the row
        assert row["status"] == (None if row["privacy_flag"] else "kept")
        assert row["timings"]["inspect"] > 0
        assert row["review"] is None and row["public_caption"] is None
    assert out[4]["status"] == "error" and out[4]["error"].startswith("inspect: image: ")
    assert out[4]["privacy_flag"] is None
    assert out[5] == done  # finished rows pass through untouched


def test_describe_fills_only_flagged_in_flight_rows(describe_stage):
    rows = _rows(6, labels=["golden retriever", None, None, None, None, None])
    flagged, unlabelled, kept, errored, unflagged, broken = rows
    _flagged([flagged, unlabelled, errored, broken])
    kept.update(status="kept", privacy_flag=False, categories=[])
    mark_error(errored, "inspect", "earlier failure")
    unflagged.update(privacy_flag=False, categories=[])  # in flight but not flagged: not describe's business
    broken["thumbnail"] = b"\x89PNG\r\n\x1a\n truncated"  # corrupted in transit
    before = copy.deepcopy(rows)
    out = _run(describe_stage, rows)

    for row in out[:2]:
        # A random tiny model may not finish a valid record: then the row fails, never half-filled.
        if row["status"] == "error":
            assert row["error"].startswith("describe: invalid output after retry: ")
            assert row["public_caption"] is None and row["private_caption"] is None
        else:
            assert row["status"] is None and row["error"] is None
            record = DescribeResult.model_validate(
                {k: row[k] for k in ("review", "private_caption", "public_caption")}
            )
            assert record.private_caption and record.public_caption
            assert all(set(item) == {"item", "reason", "category"} for item in row["review"])
        assert row["timings"]["describe"] > 0
        assert row["edit_instruction"] is None
    assert out[2:5] == before[2:5]
    assert out[5]["status"] == "error" and out[5]["error"].startswith("describe: image: ")
    assert out[5]["public_caption"] is None


def test_instruct_fills_only_rows_with_a_public_caption(instruct_stage):
    rows = _flagged(_rows(5))
    ready, other, _no_caption, kept, errored = rows
    ready["public_caption"] = "A person sits at the left edge of a bench, small in the frame."
    other["public_caption"] = "Two people walk a dog along a street, seen from behind."
    kept.update(status="kept", privacy_flag=False, public_caption="A tree.")
    errored["public_caption"] = "A person."
    mark_error(errored, "describe", "earlier failure")
    before = copy.deepcopy(rows)
    out = _run(instruct_stage, rows)

    for row in out[:2]:
        assert row["status"] is None and row["error"] is None
        InstructResult(edit_instruction=row["edit_instruction"])
        assert row["timings"]["instruct"] > 0
    assert out[2:] == before[2:]


def test_short_max_new_tokens_fails_rows_after_retry_and_later_stages_skip_them(tiny_models):
    short = GenerationConfig(max_new_tokens=12, retry_temperature=0.9)
    config = _config(tiny_models["vlm"], tiny_models["llm"], inspect=short, describe=short, instruct=short)
    inspect = InspectStage(config)
    out = _run(inspect, _rows(3))
    for row in out:
        assert row["status"] == "error"
        assert row["error"].startswith("inspect: invalid output after retry: incomplete JSON")
        assert row["privacy_flag"] is None

    describe = DescribeStage(config, engine=inspect.engine)
    instruct = InstructStage(config)
    flagged = _flagged(_rows(2))
    flagged[1]["public_caption"] = "A person at a desk."
    described = _run(describe, flagged)
    assert [r["status"] for r in described] == ["error", "error"]
    assert all(r["error"].startswith("describe: invalid output after retry: ") for r in described)
    assert all(r["public_caption"] is None for r in described[:1])
    # Errored rows pass every later stage untouched, whatever their columns hold.
    assert _run(instruct, copy.deepcopy(described)) == described
    assert _run(describe, copy.deepcopy(described)) == described
    assert _run(inspect, copy.deepcopy(out)) == out


def test_instruct_errors_on_short_budget(tiny_models):
    config = _config(tiny_models["vlm"], tiny_models["llm"], instruct=GenerationConfig(max_new_tokens=12))
    rows = _flagged(_rows(2))
    for row in rows:
        row["public_caption"] = "A person at a desk."
    out = _run(InstructStage(config), rows)
    assert all(
        r["status"] == "error" and r["error"].startswith("instruct: invalid output after retry: ")
        for r in out
    )
    assert all(r["edit_instruction"] is None for r in out)
