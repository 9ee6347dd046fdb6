"""A stage-1 call is one declaration: registering it makes it a config section, a link of its pool's call
chain and a pool of the plan; the built-in declarations match the working schema."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, ConfigDict, Field

from u2s.config import ConfigError, Stage1Calls, load_config
from u2s.pipeline import stage_pools
from u2s.plan import stage1_tflop_per_row
from u2s.schema import STAGES, WORKING_SCHEMA, new_row, rows_to_table
from u2s.stage import has_text
from u2s.stage1.call import stage_class
from u2s.stage1.calls import CALLS, CallSpec, register_call
from u2s.stage1.pool import CallPoolStage
from u2s.stage1.schemas import json_schema
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides

PROMPT = "Retitle this image from its caption and its edit.\nCaption: {caption}\nEdit: {edit}"


class RetitleResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    combined_caption: str = Field(max_length=400)


def _retitle_messages(row: dict, class_hint: str) -> list[dict]:
    text = PROMPT.format(caption=row["public_caption"], edit=row["edit_instruction"])
    return [{"role": "system", "content": "You write titles."}, {"role": "user", "content": text}]


def _retitle_apply(row: dict, result: RetitleResult) -> None:
    row["combined_caption"] = result.combined_caption


RETITLE = CallSpec(
    name="retitle",
    description="Test call: the LLM titles the edited image.",
    vision=False,
    result_model=RetitleResult,
    reads=("public_caption", "edit_instruction"),
    writes=("combined_caption",),
    messages=_retitle_messages,
    apply=_retitle_apply,
    wanted=lambda batch: has_text(batch, "edit_instruction"),
    max_new_tokens=96,
    own_pool=False,
    plan_tokens=(200, 30),
)


def _flagged(rid: str, caption: str | None) -> dict:
    row = new_row(rid, f"mem://{rid}.png", None, b"")
    row.update(privacy_flag=True, categories=["people"], public_caption=caption)
    return row


@pytest.fixture
def retitle():
    register_call(RETITLE)
    try:
        yield RETITLE
    finally:
        CALLS.pop(RETITLE.name)


def _answer(request: ChatRequest) -> dict:
    """instruct: an edit naming the caption; retitle: caption and edit, as its prompt carried them."""
    if request.fields == {"edit_instruction"}:
        caption = re.search(r'"(.*)"', request.text).group(1)
        return {"edit_instruction": f"grey out {caption}"}
    assert request.fields == {"combined_caption"}, request.fields
    caption, edit = re.search(r"Caption: (.*)\nEdit: (.*)", request.text).groups()
    return {"combined_caption": f"{edit} | {caption}".upper()}


def test_a_registered_call_is_configured_pooled_planned_and_run(retitle):
    with OracleChatServer(_answer) as url:
        cfg = load_config(
            preset="cpu-tiny",
            overrides=[*oracle_overrides(url), "stage1.calls.retitle={generation: {max_new_tokens: 64}}"],
        )
        s1 = cfg.stage1
        assert s1.calls.retitle.generation.max_new_tokens == 64 and s1.calls.retitle.resources is None
        assert s1.generation_for("retitle").max_new_tokens == 64
        assert s1.active_calls()[-2:] == ("instruct", "retitle")
        text_pool = s1.pools()[-1]
        assert (text_pool.name, text_pool.calls, text_pool.vision) == (
            "instruct+retitle",
            ("instruct", "retitle"),
            False,
        )
        assert "instruct+retitle" in stage_pools(cfg)  # the plan's pools
        alone = stage1_tflop_per_row(cfg, "instruct", 1.0)
        assert all(
            b > a for a, b in zip(alone, stage1_tflop_per_row(cfg, "instruct+retitle", 1.0), strict=True)
        )

        chain = CallPoolStage(s1, text_pool, cfg.storage)
        assert [stage.name for stage in chain.stages] == ["instruct", "retitle"]
        captions = {f"r{i}": f"a person on bench {i}" for i in range(3)}
        rows = [_flagged(rid, caption) for rid, caption in captions.items()]
        rows.append(_flagged("no-caption", None))  # instruct skips it, so retitle does
        out = {row["id"]: row for row in chain(rows_to_table(rows)).to_pylist()}

    assert sorted(out) == sorted([*captions, "no-caption"])
    for rid, caption in captions.items():
        assert out[rid]["edit_instruction"] == f"grey out {caption}"
        assert out[rid]["combined_caption"] == f"grey out {caption} | {caption}".upper()
        assert out[rid]["status"] is None and out[rid]["error"] is None
    assert out["no-caption"]["edit_instruction"] is None and out["no-caption"]["combined_caption"] is None


def test_a_call_section_must_name_a_registered_call():
    with pytest.raises(ConfigError, match="unknown stage-1 calls"):
        load_config(preset="cpu-tiny", overrides=["stage1.calls.retitle={generation: {max_new_tokens: 64}}"])


@pytest.mark.parametrize("mode", ["paper", "fused"])
def test_declarations_match_the_working_schema_and_the_config(mode):
    assert list(Stage1Calls.model_fields) == list(CALLS)
    columns = set(WORKING_SCHEMA.names)
    for name, spec in CALLS.items():
        assert name in STAGES  # its per-row seconds have a timings field
        stage = stage_class(name, mode)
        assert set(stage.reads) <= columns and set(stage.writes) <= columns, name
        assert set(spec.reads) <= columns and set(spec.writes) <= columns, name
        assert json_schema(stage.result_model)  # every string bounded, as decoders need (else TypeError)
        if mode not in spec.variants:
            assert (stage.name, stage.vision, stage.result_model) == (name, spec.vision, spec.result_class())
            assert (stage.reads, stage.writes) == (spec.reads, spec.writes)
            declared = {field for field in spec.result_class().model_fields if field in columns}
            assert declared <= set(spec.writes), name  # what the answer carries lands in its columns
