"""Stage-1 output schemas: bounded JSON schemas for decoders, strict and content-free parsing."""

from __future__ import annotations

import json

import jsonschema
import pytest

from u2s.schema import Category
from u2s.stage1.schemas import (
    CAPTION_WORDS,
    CHARS_PER_WORD,
    INSTRUCTION_WORDS,
    CombineResult,
    CriterionResult,
    DescribeResult,
    FusedFlagged,
    FusedResult,
    FusedUnflagged,
    InspectResult,
    InstructResult,
    OutputError,
    ReviewItem,
    json_schema,
    parse_output,
)

MODELS = (InspectResult, DescribeResult, InstructResult, CombineResult, CriterionResult, FusedResult)
SECRET = "Jane Doe lives at 12 Elm Street"


def _walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _describe(**overrides) -> dict:
    record = {
        "review": [{"item": "a face", "reason": "it identifies a person", "category": "people"}],
        "private_caption": "A woman in a red coat stands at the left edge of a kitchen.",
        "public_caption": "A person stands at the left edge of a room.",
    }
    return {**record, **overrides}


@pytest.mark.parametrize("model_cls", MODELS)
def test_json_schema_is_closed_and_bounds_every_string(model_cls):
    schema = json_schema(model_cls)
    jsonschema.Draft202012Validator.check_schema(schema)
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text
    objects = [n for n in _walk(schema) if isinstance(n, dict) and n.get("type") == "object"]
    assert objects
    for obj in objects:
        assert obj["additionalProperties"] is False
        assert obj["required"] == list(obj["properties"])
    strings = [n for n in _walk(schema) if isinstance(n, dict) and n.get("type") == "string"]
    assert strings or model_cls is CriterionResult  # its only field is a boolean
    for node in strings:
        assert "enum" in node or 0 < node["maxLength"] <= 400, node


def test_json_schema_fields_in_generation_order_with_limits():
    inspect = json_schema(InspectResult)
    assert list(inspect["properties"]) == ["privacy_flag", "categories"]
    assert inspect["properties"]["categories"]["maxItems"] == 9
    assert inspect["properties"]["categories"]["items"]["enum"] == [c.value for c in Category]
    describe = json_schema(DescribeResult)
    assert list(describe["properties"]) == ["review", "private_caption", "public_caption"]
    assert describe["properties"]["review"]["maxItems"] == 5
    assert list(describe["properties"]["review"]["items"]["properties"]) == ["item", "reason", "category"]
    for name in ("private_caption", "public_caption"):
        caption = describe["properties"][name]
        assert caption["minLength"] == 1 and caption["maxLength"] == CAPTION_WORDS * CHARS_PER_WORD
    instruction = json_schema(InstructResult)["properties"]["edit_instruction"]
    assert instruction["maxLength"] == INSTRUCTION_WORDS * CHARS_PER_WORD


def test_parse_valid_outputs():
    flag = parse_output(
        '{"privacy_flag":true,"categories":["people","texts_or_symbols","people"]}', InspectResult
    )
    assert flag.privacy_flag is True
    assert flag.categories == [Category.PEOPLE, Category.TEXT]  # repeats dropped, order kept
    described = parse_output(json.dumps(_describe()), DescribeResult)
    assert described.review == [ReviewItem(item="a face", reason="it identifies a person", category="people")]
    assert described.public_caption.startswith("A person")
    # strict=False: raw control characters inside strings (what constrained decoders may emit) parse
    instructed = parse_output(
        '{"edit_instruction":"change the red coat\tto a plain grey jacket"}', InstructResult
    )
    assert "grey jacket" in instructed.edit_instruction


@pytest.mark.parametrize(
    ("text", "model_cls", "expected"),
    [
        (json.dumps(_describe(private_caption=" ".join([SECRET] * 10))), DescribeResult, "private_caption"),
        (json.dumps(_describe(public_caption=(SECRET + " ") * 2 * 8)), DescribeResult, "public_caption"),
        (json.dumps(_describe(review=[{"item": SECRET, "reason": SECRET, "category": "people"}] * 6)),
         DescribeResult, "review"),
        (json.dumps(_describe(review=[{"item": SECRET, "reason": "x", "category": SECRET}])),
         DescribeResult, "review.0.category: not one of the nine categories"),
        (json.dumps({"privacy_flag": True, "categories": [SECRET]}), InspectResult, "categories.0"),
        (json.dumps({"privacy_flag": True, "categories": [], SECRET: 1}), InspectResult, "<key>"),
        (json.dumps({"edit_instruction": " ".join([SECRET] * 7)}), InstructResult, "more than 45 words"),
        (json.dumps({"edit_instruction": "   "}), InstructResult, "edit_instruction"),
        ('{"edit_instruction":"' + SECRET, InstructResult, "incomplete JSON"),
        ('{"privacy_flag":tr', InspectResult, "incomplete JSON"),
        ("", InspectResult, "incomplete JSON"),
        (SECRET, InspectResult, "invalid JSON"),
        (json.dumps([SECRET]), InspectResult, "(root)"),
    ],
)  # fmt: skip
def test_parse_rejects_with_content_free_message(text, model_cls, expected):
    with pytest.raises(OutputError) as info:
        parse_output(text, model_cls)
    message = str(info.value)
    assert expected in message
    for fragment in ("Jane", "Elm", "12 "):
        assert fragment not in message
    assert isinstance(info.value, ValueError)


def test_word_limits_counted_not_just_characters():
    words = " ".join(["ab"] * (CAPTION_WORDS + 1))  # 152 characters: within maxLength, over the word limit
    with pytest.raises(OutputError, match="private_caption: Value error, more than 50 words"):
        parse_output(json.dumps(_describe(private_caption=words)), DescribeResult)
    ok = " ".join(["ab"] * CAPTION_WORDS)
    assert parse_output(json.dumps(_describe(private_caption=ok)), DescribeResult).private_caption == ok


def _fused(**overrides) -> dict:
    return {"privacy_flag": True, "categories": ["people", "people"], **_describe(), **overrides}


def test_fused_schema_is_an_any_of_with_a_short_unflagged_branch():
    schema = json_schema(FusedResult)
    assert set(schema) == {"anyOf"}
    flagged, unflagged = schema["anyOf"]
    assert list(flagged["properties"]) == [
        "privacy_flag", "categories", "review", "private_caption", "public_caption"
    ]  # fmt: skip
    assert flagged["properties"]["privacy_flag"]["const"] is True
    assert unflagged == {
        "type": "object", "properties": {"privacy_flag": {"const": False, "type": "boolean"}},
        "required": ["privacy_flag"], "additionalProperties": False,
    }  # fmt: skip
    jsonschema.validate({"privacy_flag": False}, schema)
    jsonschema.validate(_fused(), schema)
    for bad in (
        {"privacy_flag": True},
        {"privacy_flag": False, "categories": []},
        _fused(privacy_flag=False),
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_xgrammar_compiles_the_fused_schema_and_enforces_both_branches():
    import xgrammar as xgr

    from u2s.stage1.engines.transformers import SEPARATORS
    from u2s.testing.tiny_models import qwen_tokenizer

    tok = qwen_tokenizer()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok))
    grammar = compiler.compile_json_schema(
        json.dumps(json_schema(FusedResult)), any_whitespace=False, separators=SEPARATORS
    )

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return matcher.accept_string(text) and matcher.accept_token(tok.convert_tokens_to_ids("<|im_end|>"))

    assert accepts('{"privacy_flag":false}')
    assert accepts(json.dumps(_fused(), separators=(",", ":")))
    assert not accepts('{"privacy_flag":true}')
    assert not accepts('{"privacy_flag":false,"categories":[]}')
    assert not accepts(json.dumps(_fused(public_caption="x" * 401), separators=(",", ":")))


def test_fused_parse_picks_the_branch_from_the_flag():
    assert parse_output('{"privacy_flag":false}', FusedResult).root == FusedUnflagged(privacy_flag=False)
    record = parse_output(json.dumps(_fused()), FusedResult).root
    assert isinstance(record, FusedFlagged)
    assert record.categories == [Category.PEOPLE]  # repeats dropped
    assert record.public_caption.startswith("A person")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"privacy_flag":true}', "flagged.private_caption: Field required"),
        ('{"privacy_flag":false,"categories":[]}', "unflagged.categories: Extra inputs are not permitted"),
        (json.dumps(_fused(public_caption=" ".join([SECRET] * 10))), "flagged.public_caption"),
        (json.dumps(_fused(categories=[SECRET])), "flagged.categories.0: not one of the nine categories"),
        (json.dumps({"privacy_flag": SECRET}), "unflagged.privacy_flag"),
    ],
)
def test_fused_parse_errors_name_one_branch_and_no_content(text, expected):
    with pytest.raises(OutputError) as info:
        parse_output(text, FusedResult)
    message = str(info.value)
    assert expected in message
    assert "Jane" not in message and "Elm" not in message


def test_criterion_and_combine_records():
    assert json_schema(CriterionResult)["properties"] == {"present": {"type": "boolean"}}
    assert parse_output('{"present":true}', CriterionResult).present is True
    combined = json_schema(CombineResult)["properties"]["combined_caption"]
    assert combined["maxLength"] == CAPTION_WORDS * CHARS_PER_WORD
    with pytest.raises(OutputError, match="combined_caption: Value error, more than 50 words"):
        parse_output(json.dumps({"combined_caption": " ".join(["ab"] * 51)}), CombineResult)
