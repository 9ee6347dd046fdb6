"""The paper's stage-1 prompts as shared chat messages."""

from __future__ import annotations

import sys

import pytest

from u2s.schema import Category
from u2s.stage1.prompts import CATEGORY_GUIDE, describe_messages, inspect_messages, instruct_messages


def _user_text(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


@pytest.mark.parametrize(
    "messages", [inspect_messages(), describe_messages("dog"), instruct_messages("a dog")]
)
def test_shape_one_line_system_then_user(messages):
    assert [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    assert isinstance(system, str) and system and "\n" not in system


@pytest.mark.parametrize("messages", [inspect_messages(), describe_messages("dog")])
def test_vision_prompts_carry_one_image_part_first(messages):
    parts = messages[1]["content"]
    assert parts[0] == {"type": "image"}
    assert [p["type"] for p in parts] == ["image", "text"]


def test_inspect_prompt_lists_the_nine_categories_and_the_flag_rule():
    text = _user_text(inspect_messages())
    assert set(CATEGORY_GUIDE) == set(Category)
    for category, (name, examples) in CATEGORY_GUIDE.items():
        assert f"- {category.value} ({name}): {examples}" in text
    assert "When unsure, answer TRUE" in text
    for must in ("mirrors or reflections", "name tags", "groups of", "receipts", "memorabilia"):
        assert must in text
    assert '"privacy_flag"' in text and '"categories"' in text


def test_describe_prompt_substitutes_class_and_states_limits():
    text = _user_text(describe_messages("golden retriever"))
    assert "{image_class}" not in text
    assert text.count("golden retriever") == 2
    assert "at most 5 items" in text
    assert text.count("at most 50 words") == 2
    for field in ('"review"', '"item"', '"reason"', '"category"', '"private_caption"', '"public_caption"'):
        assert field in text
    for rule in ("verifiably visible", "logos, brands, text, faces", "pose, size and", "without centring"):
        assert rule in text
    for category in Category:
        assert category.value in text


def test_instruct_prompt_embeds_caption_verbatim_and_states_rules():
    caption = "A {image_class} person with {braces} sits at the left edge."
    text = _user_text(instruct_messages(caption))
    assert caption in text
    assert "{public_caption}" not in text
    assert "At most 45 words" in text
    for rule in ("one continuous phrase fragment", "layout, the objects and the actions unchanged",
                 "at least two changes", "tattoos", "no meta text"):  # fmt: skip
        assert rule in text
    assert isinstance(instruct_messages(caption)[1]["content"], str)  # text-only: plain string content


def test_importing_stage1_does_not_import_torch():
    import subprocess

    code = (
        "import sys, u2s.stage1.inspect, u2s.stage1.describe, u2s.stage1.instruct;"
        "import u2s.stage1.engines.transformers;"
        "bad = [m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
