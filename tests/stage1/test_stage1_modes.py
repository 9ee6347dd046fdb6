"""Stage-1 modes on the tiny models loaded from disk: fused inspect, per-criterion inspect, combine
(call D), and system prompts for chat templates with and without a system role.

A random tiny VLM's answers depend on its weights, so every check holds for any outcome, and tests that
need both outcomes use a VLM found for them (:func:`u2s.testing.tiny_models.find_tiny_vlm`: the first
weight seed whose answers cover both), never a seed picked by hand.
"""

from __future__ import annotations

import copy
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from u2s.config import GenerationConfig, ModelConfig, Stage1Config
from u2s.schema import Category, mark_error, new_row
from u2s.stage1.combine import CombineStage
from u2s.stage1.engines import generate_validated
from u2s.stage1.engines.transformers import TransformersEngine
from u2s.stage1.fused import FusedInspectStage
from u2s.stage1.inspect import InspectStage
from u2s.stage1.instruct import InstructStage
from u2s.stage1.prompts import INSPECT_SYSTEM, criterion_messages, inspect_messages, instruct_messages
from u2s.stage1.rows import load_thumbnails
from u2s.stage1.schemas import (
    CombineResult,
    CriterionResult,
    DescribeResult,
    FusedResult,
    InstructResult,
    json_schema,
)
from u2s.testing.rows import decoded_rows, run_stage
from u2s.testing.tiny_models import CHATML_TEMPLATE, find_tiny_vlm, tiny_stage1_config

#: ChatML, but raising on a system message, as some Gemma/Mistral templates do.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + CHATML_TEMPLATE
)
CAPTIONS = {"review", "private_caption", "public_caption"}
CATEGORY_VALUES = {c.value for c in Category}
SIZES = [(64, 48), (30, 90), (120, 120), (17, 23)]


def _png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _rows(n: int, labels: list[str | None] | None = None) -> list[dict]:
    return decoded_rows([_png(*SIZES[i % 4], seed=i) for i in range(n)], labels, thumbnail_side=56)


def _flagged(rows: list[dict]) -> list[dict]:
    for row in rows:
        row["privacy_flag"], row["categories"] = True, ["people"]
    return rows


def _config(vlm, llm, **generation: GenerationConfig) -> Stage1Config:
    budgets = {**{"inspect": 256, "describe": 4096, "instruct": 1024, "combine": 1024}, **generation}
    return tiny_stage1_config(vlm, llm, image_size=56, budgets=budgets, default_class_hint="photo")


def _run(stage, rows: list[dict]) -> list[dict]:
    return run_stage(stage, rows)


FUSED_LABELS = ["golden retriever", None, None]


@pytest.fixture(scope="module")
def fused_vlm(tiny_models, tmp_path_factory):
    """A tiny VLM whose fused answers on the test rows both flag (with a valid record) and keep."""

    def both_outcomes(vlm) -> bool:
        config = _config(vlm, tiny_models["llm"]).model_copy(update={"mode": "fused"})
        stage = FusedInspectStage(config)
        rows = _rows(len(FUSED_LABELS), FUSED_LABELS)
        # Cheap screen first: the first greedy tokens already say which branch each answer takes.
        ready, images = stage.load(copy.deepcopy(rows))
        starts = stage.engine.generate(
            [stage.conversation(row) for row in ready], images, json_schema(FusedResult), 24
        )
        if {str(text).startswith('{"privacy_flag":true') for text in starts} != {True, False}:
            return False
        flags = {row["privacy_flag"] for row in _run(stage, rows)}
        return {True, False} <= flags

    return find_tiny_vlm(tmp_path_factory.mktemp("fused") / "vlm", both_outcomes)


@pytest.fixture(scope="module")
def criterion_vlm(tiny_models, tmp_path_factory):
    """A tiny VLM whose nine per-criterion answers find no category for one test row and some for another."""

    def none_and_some(vlm) -> bool:
        config = _config(vlm, tiny_models["llm"]).model_copy(update={"inspect_mode": "per_criterion"})
        counts = [len(row["categories"] or []) for row in _run(InspectStage(config), _rows(3))]
        return 0 in counts and any(0 < n < len(Category) for n in counts)

    return find_tiny_vlm(tmp_path_factory.mktemp("criteria") / "vlm", none_and_some)


def _without_system_role(model_dir, tmp_path_factory):
    copy_dir = tmp_path_factory.mktemp("no-system") / model_dir.name
    shutil.copytree(model_dir, copy_dir)
    (copy_dir / "chat_template.jinja").write_text(NO_SYSTEM_TEMPLATE)
    return copy_dir


@pytest.fixture(scope="module")
def no_system(tiny_models, tmp_path_factory) -> dict:
    """The tiny VLM and LLM with a chat template that rejects the system role."""
    return {name: _without_system_role(tiny_models[name], tmp_path_factory) for name in ("vlm", "llm")}


def test_fused_unflagged_rows_kept_without_captions_flagged_rows_described(fused_vlm, tiny_models):
    stage = FusedInspectStage(_config(fused_vlm, tiny_models["llm"]).model_copy(update={"mode": "fused"}))
    broken = new_row("broken", "mem://broken.png", None, b"not an image")  # never decoded: no thumbnail
    done = _rows(1)[0] | {"id": "done", "status": "kept", "privacy_flag": False, "categories": []}
    out = _run(stage, [*_rows(len(FUSED_LABELS), FUSED_LABELS), broken, done])
    n = len(FUSED_LABELS)

    for row in out[:n]:
        assert isinstance(row["privacy_flag"], bool) or row["error"].startswith("inspect: invalid output")
        assert row["timings"]["inspect"] > 0 and row["timings"]["describe"] is None
        assert row["edit_instruction"] is None
        if row["privacy_flag"]:
            assert row["status"] is None and row["error"] is None
            assert set(row["categories"]) <= CATEGORY_VALUES
            DescribeResult.model_validate({k: row[k] for k in CAPTIONS})
            assert row["private_caption"] and row["public_caption"]
        elif row["privacy_flag"] is False:
            assert row["status"] == "kept" and row["categories"] == []
            assert all(row[k] is None for k in CAPTIONS)
    assert {row["privacy_flag"] for row in out[:n]} >= {True, False}
    assert out[n]["status"] == "error" and out[n]["error"].startswith("inspect: image: ")
    assert out[n + 1] == done


def test_fused_unflagged_answer_fits_a_budget_that_cuts_flagged_ones(fused_vlm, tiny_models):
    full = FusedInspectStage(_config(fused_vlm, tiny_models["llm"]).model_copy(update={"mode": "fused"}))
    rows = _rows(len(FUSED_LABELS), FUSED_LABELS)
    flags = [row["privacy_flag"] for row in _run(full, copy.deepcopy(rows))]
    config = _config(fused_vlm, tiny_models["llm"], describe=GenerationConfig(max_new_tokens=40))
    out = _run(FusedInspectStage(config.model_copy(update={"mode": "fused"})), rows)
    for flag, row in zip(flags, out, strict=True):
        if flag is False:  # '{"privacy_flag":false}' is 22 byte tokens: the greedy answer still fits
            assert row["status"] == "kept" and row["privacy_flag"] is False and row["error"] is None
        elif flag is True:  # a flagged record never fits 40 tokens: it fails, or the sampled retry says false
            assert row["privacy_flag"] is not True and row["public_caption"] is None
            assert row["status"] == "kept" or row["error"].startswith(
                "inspect: invalid output after retry: incomplete JSON"
            )


def test_per_criterion_flag_is_any_true_and_categories_are_the_true_answers(criterion_vlm, tiny_models):
    config = _config(criterion_vlm, tiny_models["llm"]).model_copy(update={"inspect_mode": "per_criterion"})
    stage = InspectStage(config)
    rows = _rows(3)
    out = _run(stage, copy.deepcopy(rows))
    for row in out:
        assert row["error"] is None
        assert set(row["categories"]) <= CATEGORY_VALUES
        assert row["categories"] == [c.value for c in Category if c.value in row["categories"]]  # ordered
        assert row["privacy_flag"] == bool(row["categories"])
        assert row["status"] == (None if row["privacy_flag"] else "kept")
        assert row["review"] is None and row["timings"]["inspect"] > 0
    # The nine answers of one image, asked on their own, give the same categories (row-major batching).
    partial = next(i for i, row in enumerate(out) if 0 < len(row["categories"]) < len(Category))
    _, images = load_thumbnails([rows[partial]], "test")
    answers = generate_validated(
        stage.engine, [criterion_messages(c) for c in Category], images * len(Category), CriterionResult,
        config.generation_for("inspect"),
    )  # fmt: skip
    assert out[partial]["categories"] == [
        c.value for c, a in zip(Category, answers, strict=True) if a.present
    ]


def test_per_criterion_invalid_answers_fail_the_row_naming_the_category(tiny_models):
    config = _config(tiny_models["vlm"], tiny_models["llm"], inspect=GenerationConfig(max_new_tokens=4))
    out = _run(InspectStage(config.model_copy(update={"inspect_mode": "per_criterion"})), _rows(2))
    for row in out:
        assert row["status"] == "error" and row["privacy_flag"] is None
        assert row["error"].startswith("inspect: people: invalid output after retry: incomplete JSON")


def test_combine_fills_only_rows_with_an_instruction(tiny_models):
    stage = CombineStage(_config(tiny_models["vlm"], tiny_models["llm"]).model_copy(update={"combine": True}))
    rows = _flagged(_rows(6, labels=["office", None, None, None, None, None]))
    _ready, _other, no_instruction, kept, errored, unflagged = rows
    for row in rows:
        row["public_caption"] = "A person sits at the left edge of a bench, small in the frame."
        row["edit_instruction"] = "give the person short grey hair and a plain blue jacket"
    no_instruction["edit_instruction"] = None
    kept.update(status="kept", privacy_flag=False)
    mark_error(errored, "instruct", "earlier failure")
    unflagged["privacy_flag"] = False
    before = copy.deepcopy(rows)
    out = _run(stage, rows)

    for row in out[:2]:  # a valid caption, or (a random tiny model) a clean failure
        if row["status"] == "error":
            assert row["error"].startswith("combine: invalid output after retry: ")
            assert row["combined_caption"] is None
        else:
            assert row["status"] is None and row["error"] is None
            CombineResult(combined_caption=row["combined_caption"])
        assert row["timings"]["combine"] > 0  # a stage of its own in the timings struct
    assert out[2:] == before[2:]


def test_combine_short_budget_errors(tiny_models):
    config = _config(tiny_models["vlm"], tiny_models["llm"], combine=GenerationConfig(max_new_tokens=10))
    rows = _flagged(_rows(1))
    rows[0].update(public_caption="A person.", edit_instruction="grey hair")
    out = _run(CombineStage(config), rows)
    assert out[0]["status"] == "error" and out[0]["combined_caption"] is None
    assert out[0]["error"].startswith("combine: invalid output after retry: ")


def _engine(path, vision: bool, **kwargs) -> TransformersEngine:
    return TransformersEngine(
        ModelConfig(model=str(path), dtype="float32", device="cpu"), vision, 56, **kwargs
    )


def test_system_role_is_rendered_by_templates_that_accept_it(tiny_models):
    vlm = _engine(tiny_models["vlm"], vision=True)
    prompt = vlm.render(inspect_messages())
    assert prompt.startswith(f"<|im_start|>system\n{INSPECT_SYSTEM}<|im_end|>\n<|im_start|>user\n<image>")
    merged = _engine(tiny_models["vlm"], vision=True, system_prompt="merge_into_user")
    assert merged.render(inspect_messages()).startswith(f"<|im_start|>user\n<image>{INSPECT_SYSTEM}\n\n")
    assert "<|im_start|>system" not in merged.render(inspect_messages())


@pytest.mark.parametrize("name", ["vlm", "llm"])
def test_templates_without_a_system_role_get_it_merged_into_the_user_turn(name, tiny_models, no_system):
    from jinja2 import TemplateError

    vision = name == "vlm"
    conversations = [inspect_messages()] * 2 if vision else [instruct_messages("A dog on a sofa.")] * 2
    images = load_thumbnails(_rows(2), "test")[1] if vision else None
    schema = json_schema(CriterionResult if vision else InstructResult)
    auto = _engine(no_system[name], vision)
    reference = _engine(tiny_models[name], vision, system_prompt="merge_into_user")  # same weights
    assert auto.render(conversations[0]) == reference.render(conversations[0])
    out = auto.generate(conversations, images, schema, 64)
    assert out == reference.generate(conversations, images, schema, 64)

    strict = _engine(no_system[name], vision, system_prompt="system_role")
    with pytest.raises(TemplateError, match="System role not supported"):
        strict.generate(conversations, images, schema, 8)


def test_stages_merge_system_prompts_when_configured(tiny_models, no_system):
    config = _config(no_system["vlm"], no_system["llm"]).model_copy(
        update={"system_prompt": "merge_into_user"}
    )
    inspect = InspectStage(config, engine=_engine(no_system["vlm"], True, system_prompt="system_role"))
    out = _run(inspect, _rows(2))
    assert all(row["error"] is None and isinstance(row["privacy_flag"], bool) for row in out)
    rows = _flagged(_rows(1))
    rows[0]["public_caption"] = "A person at a desk."
    instruct = InstructStage(config, engine=_engine(no_system["llm"], False, system_prompt="system_role"))
    assert _run(instruct, rows)[0]["edit_instruction"]


def test_processor_kwargs_reach_the_vlm_processor(tiny_models):
    plain = _engine(tiny_models["vlm"], vision=True)
    raw = _engine(tiny_models["vlm"], vision=True, processor_kwargs={"do_normalize": False})
    images = load_thumbnails(_rows(1), "test")[1]
    a = plain._inputs([inspect_messages()], images)["pixel_values"]
    b = raw._inputs([inspect_messages()], images)["pixel_values"]
    assert a.shape == b.shape and float(b.min()) >= 0 and float(a.min()) < 0
