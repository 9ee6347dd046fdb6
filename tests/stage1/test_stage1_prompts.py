"""The paper's stage-1 prompts as shared chat messages."""

from __future__ import annotations

import sys

import pytest

from u2s.schema import Category
from u2s.stage1.prompts import (
    ALWAYS_TRUE,
    CATEGORY_GUIDE,
    apply_system_prompt,
    combine_messages,
    criterion_messages,
    describe_messages,
    fused_messages,
    inspect_messages,
    instruct_messages,
    merge_system_into_user,
)

ALL_MESSAGES = [
    inspect_messages(), describe_messages("dog"), instruct_messages("a dog"), fused_messages("dog"),
    criterion_messages(Category.PEOPLE), combine_messages("a dog", "make it grey", "dog"),
]  # fmt: skip


def _user_text(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


@pytest.mark.parametrize("messages", ALL_MESSAGES)
def test_shape_one_line_system_then_user(messages):
    assert [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    assert isinstance(system, str) and system and "\n" not in system


@pytest.mark.parametrize(
    "messages", [inspect_messages(), describe_messages("dog"), fused_messages("dog"),
                 criterion_messages(Category.TEXT)]
)  # fmt: skip
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


@pytest.mark.parametrize("category", list(Category))
def test_criterion_prompt_holds_one_category_and_the_unsure_rule(category):
    text = _user_text(criterion_messages(category))
    name, examples = CATEGORY_GUIDE[category]
    assert f"Category: {name}, for example {examples}." in text
    others = [c for c in Category if c is not category]
    assert not any(CATEGORY_GUIDE[c][1] in text for c in others)  # no other category's examples
    assert "When unsure, answer TRUE" in text
    assert '"present"' in text and "{" not in text.replace('{"', "")
    assert text.count("Always TRUE") == (category in ALWAYS_TRUE)
    if category in ALWAYS_TRUE:
        assert f"- Always TRUE: {ALWAYS_TRUE[category]}." in text


def test_fused_prompt_carries_the_flag_rule_the_describe_rules_and_the_short_answer():
    text = _user_text(fused_messages("golden retriever"))
    inspect, describe = _user_text(inspect_messages()), _user_text(describe_messages("golden retriever"))
    rules = inspect[inspect.index("Privacy categories") : inspect.index("\n\nAnswer")]
    fields = describe[describe.index("1. ") : describe.index("\n\nAnswer")]
    assert rules in text and fields in text
    assert "{image_class}" not in text and "golden retriever" in text
    assert 'exactly {"privacy_flag":false}, with no other field' in text
    for field in ('"categories"', '"review"', '"private_caption"', '"public_caption"'):
        assert field in text


def test_combine_prompt_embeds_both_texts_verbatim_and_states_rules():
    caption, edit = "A {edit_instruction} person at the left.", "give the {image_class} grey hair"
    messages = combine_messages(caption, edit, "office")
    text = _user_text(messages)
    assert f'"{caption}"' in text and f'"{edit}"' in text
    assert text.count("office") == 2
    for rule in ("At most 50 words", "Apply every change", "Keep everything else", "No meta text",
                 '"combined_caption"'):  # fmt: skip
        assert rule in text
    assert isinstance(messages[1]["content"], str)


def test_merge_system_into_user_keeps_the_image_first_and_the_text_once():
    vision = merge_system_into_user(inspect_messages())
    assert [m["role"] for m in vision] == ["user"]
    parts = vision[0]["content"]
    assert parts[0] == {"type": "image"} and len(parts) == 2
    system, user = inspect_messages()[0]["content"], _user_text(inspect_messages())
    assert parts[1]["text"] == f"{system}\n\n{user}"
    text = merge_system_into_user(instruct_messages("a dog"))
    assert text == [{"role": "user", "content": f"{instruct_messages('a dog')[0]['content']}\n\n"
                                                f"{_user_text(instruct_messages('a dog'))}"}]  # fmt: skip
    no_system = [{"role": "user", "content": "hi"}]
    assert merge_system_into_user(no_system) == no_system
    original = inspect_messages()
    merge_system_into_user(original)
    assert original == inspect_messages()  # input untouched


def test_apply_system_prompt_merges_only_when_asked():
    conversations = [inspect_messages(), instruct_messages("a dog")]
    assert apply_system_prompt(conversations, "auto") == conversations
    assert apply_system_prompt(conversations, "system_role") == conversations
    merged = apply_system_prompt(conversations, "merge_into_user")
    assert merged == [merge_system_into_user(c) for c in conversations]
    assert all(m["role"] == "user" for c in merged for m in c)


def test_importing_stage1_does_not_import_torch():
    import subprocess

    code = (
        "import sys, u2s.stage1.inspect, u2s.stage1.describe, u2s.stage1.instruct, u2s.stage1.fused;"
        "import u2s.stage1.combine, u2s.eval.flags;"
        "import u2s.stage1.engines.transformers;"
        "bad = [m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
