"""VLM metrics: the paper's markers as schema keys, parsing against hand-written answers, and the whole
path on the tiny random VLM through a real stage-1 engine (its answers are noise: plumbing only)."""

from __future__ import annotations

import pytest
from PIL import Image

from u2s.eval.config import EvalConfig
from u2s.eval.metrics import Pair, Skip
from u2s.eval.privacy import VlmFamily
from u2s.eval.vlm import (
    DEMOGRAPHICS_PROMPT,
    JUDGE_PROMPT,
    PROMPT_RACES,
    TEXT_PROMPT,
    DemographicsAnswer,
    JudgeAnswer,
    TextAnswer,
    race_entropy,
    side_by_side,
)
from u2s.stage1.schemas import OutputError, json_schema, parse_output
from u2s.testing.images import noise_image

VLM_METRICS = ["text_sim_vlm", "race_entropy", "vlm_score"]


def test_schemas_encode_the_papers_markers():
    assert list(json_schema(TextAnswer)["properties"]) == ["NO_TEXT", "TEXT"]
    demographics = json_schema(DemographicsAnswer)["properties"]
    assert list(demographics) == ["NO_HUMAN", "GENDER", "RACE"]
    assert demographics["RACE"]["items"]["enum"] == list(PROMPT_RACES)
    score = json_schema(JudgeAnswer)["properties"]["ANONYMIZATION_SCORE"]
    assert (score["type"], score["minimum"], score["maximum"]) == ("integer", 0, 100)


def test_prompts_keep_the_papers_bands_and_rules():
    for band in ("**0**", "**20–40**", "**40–70**", "**70–90**", "**90–100**", "STEP 1", "STEP 2"):
        assert band in JUDGE_PROMPT
    assert "[unclear]" in TEXT_PROMPT
    assert all(label in DEMOGRAPHICS_PROMPT for label in PROMPT_RACES)


def test_answers_parse_into_metric_values():
    none = parse_output('{"NO_TEXT":true,"TEXT":""}', TextAnswer)
    some = parse_output('{"NO_TEXT":false,"TEXT":"EXIT\\nPlatform 3 [unclear]"}', TextAnswer)
    assert (none.text(), some.text()) == ("", "EXIT\nPlatform 3 [unclear]")
    people = parse_output('{"NO_HUMAN":false,"GENDER":["male"],"RACE":["White","Asian","Indian"]}',
                          DemographicsAnswer)  # fmt: skip
    assert race_entropy(people.RACE, "paper") == pytest.approx(0.430676558, abs=1e-9)  # ln 2 / ln 5
    assert race_entropy(people.RACE, "seven") == pytest.approx(0.564575034, abs=1e-9)  # ln 3 / ln 7
    assert parse_output('{"ANONYMIZATION_SCORE":73}', JudgeAnswer).ANONYMIZATION_SCORE == 73
    with pytest.raises(OutputError):
        parse_output('{"ANONYMIZATION_SCORE":101}', JudgeAnswer)
    with pytest.raises(OutputError):
        parse_output('{"NO_HUMAN":false,"GENDER":[],"RACE":["Martian"]}', DemographicsAnswer)


def test_judge_sees_original_left_and_anonymized_right():
    left, right = Image.new("RGB", (30, 60), (255, 0, 0)), Image.new("RGB", (90, 20), (0, 0, 255))
    pair = side_by_side(left, right, 48)
    assert pair.size == (96, 48)
    assert pair.getpixel((10, 10)) == (255, 0, 0) and pair.getpixel((80, 40)) == (0, 0, 255)


def test_vlm_metrics_need_a_vlm():
    with pytest.raises(ValueError, match=r"models\.vlm"):
        EvalConfig.model_validate({"original": {"uri": "/x"}, "methods": {"m": "/x"}, "out": "/x",
                                   "metrics": ["race_entropy"]})  # fmt: skip


@pytest.mark.slow
def test_vlm_family_runs_the_tiny_vlm_through_a_stage1_engine(tiny_models):
    cfg = EvalConfig.model_validate({
        "original": {"uri": "/unused"}, "methods": {"m": "/unused"}, "out": "/unused", "metrics": VLM_METRICS,
        "models": {"vlm": {"model": {"model": str(tiny_models["vlm"]), "device": "cpu", "dtype": "float32"},
                           "image_size": 56, "max_new_tokens": 160}},
    })  # fmt: skip
    family = VlmFamily(cfg, VLM_METRICS)
    assert family.judge is family.reader  # one model: loaded once
    pairs = [Pair(str(i), "m", noise_image(64, 48, i), noise_image(64, 48, 10 + i)) for i in range(2)]
    scores = family.score(pairs)
    assert len(scores) == 2
    for row in scores:
        assert set(row) == set(VLM_METRICS)
        for name, value in row.items():
            if isinstance(value, Skip):
                assert value.reason in {"invalid answer", "no person", "no text in the original"}, name
            elif name == "vlm_score":
                assert value in range(101)
            else:
                assert 0.0 <= value <= 1.0
