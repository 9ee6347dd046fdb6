"""Stage-1 model outputs: pydantic models, the JSON schemas handed to constrained decoders, parsing.

Every engine (local transformers + xgrammar, vLLM, OpenAI-compatible servers) decodes against
:func:`json_schema` and every output goes through :func:`parse_output`. Field order is generation
order (the flag before anything else). Word limits are the paper's (PAPER.md §2.4): the schema bounds
each string in characters (``words × CHARS_PER_WORD``), validation then counts words.
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
)

from u2s.schema import Category

#: Characters allowed per word in a string's ``maxLength`` (English averages about six with the space).
CHARS_PER_WORD = 8

CAPTION_WORDS = 50
INSTRUCTION_WORDS = 45
REVIEW_ITEM_WORDS = 12
REVIEW_REASON_WORDS = 25
MAX_REVIEW_ITEMS = 5


class OutputError(ValueError):
    """A model output that is not a valid record. The message names fields and problems, never content."""


def _word_limit(words: int):
    def check(text: str) -> str:
        if len(text.split()) > words:
            raise ValueError(f"more than {words} words")
        return text

    return check


def bounded_text(words: int) -> Any:
    """A non-empty string of at most ``words`` words (and ``words × CHARS_PER_WORD`` characters)."""
    return Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=words * CHARS_PER_WORD),
        AfterValidator(_word_limit(words)),
    ]


CaptionText = bounded_text(CAPTION_WORDS)
InstructionText = bounded_text(INSTRUCTION_WORDS)
ItemText = bounded_text(REVIEW_ITEM_WORDS)
ReasonText = bounded_text(REVIEW_REASON_WORDS)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InspectResult(_Record):
    """Call A: is the image privacy-prone, and which of the nine categories are present."""

    privacy_flag: bool = Field(description="TRUE if anything could reveal private information, or if unsure.")
    categories: list[Category] = Field(max_length=len(Category), description="Categories present (ids).")

    @field_validator("categories")
    @classmethod
    def _unique(cls, value: list[Category]) -> list[Category]:
        return list(dict.fromkeys(value))  # decoders cannot enforce uniqueness: drop repeats, keep order


class ReviewItem(_Record):
    """One privacy-sensitive element: what it is, why it is sensitive, its category."""

    item: ItemText = Field(description="What the sensitive element is.")
    reason: ReasonText = Field(description="Why it is privacy-sensitive.")
    category: Category


class DescribeResult(_Record):
    """Call B: privacy review and the dual captions."""

    review: list[ReviewItem] = Field(max_length=MAX_REVIEW_ITEMS)
    private_caption: CaptionText = Field(description="Full visual description.")
    public_caption: CaptionText = Field(description="Privacy-preserving description.")


class InstructResult(_Record):
    """Call C: identity-neutral edit instruction derived from the public caption."""

    edit_instruction: InstructionText = Field(description="One continuous edit phrase.")


class CombineResult(_Record):
    """Call D: the public caption with the edit instruction applied (single-prompt editors)."""

    combined_caption: CaptionText = Field(description="Caption of the edited image.")


class CriterionResult(_Record):
    """Per-criterion call A: is one privacy category present (TRUE when unsure)."""

    present: bool = Field(description="TRUE if the category is present, or if unsure.")


def _unique_categories(value: list[Category]) -> list[Category]:
    return list(dict.fromkeys(value))


class FusedFlagged(_Record):
    """Fused calls A + B on a flagged image: flag, categories, review and both captions."""

    privacy_flag: Literal[True]
    categories: Annotated[list[Category], AfterValidator(_unique_categories)] = Field(
        max_length=len(Category)
    )
    review: list[ReviewItem] = Field(max_length=MAX_REVIEW_ITEMS)
    private_caption: CaptionText = Field(description="Full visual description.")
    public_caption: CaptionText = Field(description="Privacy-preserving description.")


class FusedUnflagged(_Record):
    """Fused calls A + B on an image with nothing private: the flag alone (a few tokens)."""

    privacy_flag: Literal[False]


def _fused_branch(value: Any) -> str:
    flag = value.get("privacy_flag") if isinstance(value, dict) else getattr(value, "privacy_flag", None)
    return "flagged" if flag is True else "unflagged"


class FusedResult(
    RootModel[
        Annotated[
            Annotated[FusedFlagged, Tag("flagged")] | Annotated[FusedUnflagged, Tag("unflagged")],
            Discriminator(_fused_branch),
        ]
    ]
):
    """Fused calls A + B, one VLM call per image: ``{"privacy_flag":false}`` or the full flagged record.

    The decoder schema is an ``anyOf`` of the two shapes, told apart by the flag's ``const`` (the first
    value generated), so an unflagged answer costs a handful of tokens and a flagged one always carries
    captions. Validation picks the branch from the flag, so errors name only that branch's fields.
    """


Result = TypeVar("Result", bound=BaseModel)

_DROP_KEYS = ("title", "default", "description")  # decoders need bounds, not prose


def json_schema(model_cls: type[BaseModel]) -> dict:
    """Self-contained JSON schema of ``model_cls`` for constrained decoding.

    References are inlined, every object has ``additionalProperties: false`` and all its properties
    required (in declaration order), and every string is bounded by ``maxLength`` or an ``enum``.
    """
    raw = model_cls.model_json_schema()
    defs = raw.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return resolve({**target, **rest})
        out = {}
        for key, value in node.items():
            if key in _DROP_KEYS:
                continue
            if key == "properties":
                out[key] = {name: resolve(sub) for name, sub in value.items()}
            else:
                out[key] = resolve(value)
        if (
            "oneOf" in out
        ):  # the branches are disjoint (a const flag): anyOf is the same, and widely supported
            out["anyOf"] = out.pop("oneOf")
        out.pop("discriminator", None)
        if out.get("type") == "object" or "properties" in out:
            out["type"] = "object"
            out["additionalProperties"] = False
            out["required"] = list(out.get("properties", {}))
        if out.get("type") == "string" and "enum" not in out and "maxLength" not in out:
            raise TypeError(f"{model_cls.__name__}: unbounded string in schema")  # a programming error
        return out

    return resolve(raw)


def _known_names() -> frozenset[str]:
    names: set[str] = {"flagged", "unflagged"}  # FusedResult's branch tags
    for cls in (InspectResult, ReviewItem, DescribeResult, InstructResult, CombineResult, CriterionResult,
                FusedFlagged, FusedUnflagged):  # fmt: skip
        names.update(cls.model_fields)
    return frozenset(names)


_KNOWN_NAMES = _known_names()


def describe_validation_error(e: ValidationError) -> str:
    """``field.path: problem`` per error, without inputs (and without unknown keys, which are output)."""
    problems = []
    for err in e.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) if isinstance(p, int) or p in _KNOWN_NAMES else "<key>" for p in err["loc"])
        msg = "not one of the nine categories" if err["type"] == "enum" else err["msg"]
        problems.append(f"{loc or '(root)'}: {msg}")
    return "; ".join(problems)


def _unclosed(text: str) -> bool:
    """Whether ``text`` stops inside a string, object or array (typically: cut at max_new_tokens)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return in_string or depth > 0


def parse_output(text: str, model_cls: type[Result]) -> Result:
    """Parse a model's raw output into ``model_cls``; raises :class:`OutputError` (content-free)."""
    try:
        data = json.loads(text, strict=False)
    except json.JSONDecodeError as e:
        if _unclosed(text) or not text.strip():
            raise OutputError("incomplete JSON (output ended early; max_new_tokens too small?)") from None
        raise OutputError(f"invalid JSON ({e.msg} at char {e.pos})") from None
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise OutputError(describe_validation_error(e)) from None
