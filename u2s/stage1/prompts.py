"""The paper's stage-1 prompts (PAPER.md §2), adapted to JSON output.

Builders return OpenAI-style chat messages, so every engine (local transformers, vLLM, HTTP) shares
them: a one-line role system prompt, then a user turn. Vision prompts put one ``{"type": "image"}`` part
before the text; engines attach the image itself. The JSON shape is enforced by constrained decoding
(:mod:`u2s.stage1.schemas`); the prompt still describes each field, since that is what the model reads.
"""

from __future__ import annotations

import re

from u2s.schema import Category
from u2s.stage1.engines.messages import merge_system_into_user
from u2s.stage1.schemas import (
    CAPTION_WORDS,
    INSTRUCTION_WORDS,
    MAX_REVIEW_ITEMS,
    REVIEW_ITEM_WORDS,
    REVIEW_REASON_WORDS,
)

#: The nine categories (PAPER.md §2.2): id → (name, examples).
CATEGORY_GUIDE: dict[Category, tuple[str, str]] = {
    Category.PEOPLE: (
        "People", "full or partial faces, skin in private contexts, tattoos, emotional expressions"),
    Category.APPEARANCE: (
        "Appearance cues",
        "clothing, accessories, features revealing gender, culture, religion, status or role"),
    Category.HEALTH: (
        "Health indicators",
        "casts, wheelchairs, bandages, medication, disabilities, visible illness or injury"),
    Category.TEXT: (
        "Texts or symbols",
        "signs, receipts, documents, screens, handwriting, licence plates, usernames, phone numbers"),
    Category.LOCATION_TIME: (
        "Locations or timestamps",
        "homes, offices, bedrooms, addresses, classrooms, GPS data, clocks, date or time stamps"),
    Category.INTERACTIONS: (
        "Personal interactions",
        "small groups, families, friends, teams, protests, celebrations, close relationships"),
    Category.PROFESSIONAL: (
        "Professional or school settings",
        "uniforms, tools, name tags, diplomas, workspaces, formal events"),
    Category.IDENTIFIERS: (
        "Cultural, political or religious identifiers", "flags, slogans, attire, ceremonies, posters"),
    Category.BELONGINGS: (
        "Private belongings or behaviours",
        "hobbies, photos, mail, social media, travel documents, receipts"),
}  # fmt: skip

INSPECT_SYSTEM = "You are a privacy auditor who checks images for private or identifying information."
DESCRIBE_SYSTEM = "You are a privacy-aware image describer who writes precise, factual captions."
FUSED_SYSTEM = (
    "You are a privacy auditor who checks images for private information and describes them precisely."
)
INSTRUCT_SYSTEM = "You are an image anonymization assistant who writes identity-neutral edit instructions."
COMBINE_SYSTEM = "You are an image caption editor who rewrites captions to describe edited images."

#: The flag rule's "always TRUE" cases (PAPER.md §2.3), by the category each belongs to.
ALWAYS_TRUE: dict[Category, str] = {
    Category.PEOPLE: "partial faces in mirrors or reflections",
    Category.TEXT: "blurred signs or screens; partly legible receipts or notes",
    Category.INTERACTIONS: "groups of people even when no face is visible",
    Category.PROFESSIONAL: "blurred name tags",
    Category.BELONGINGS: "niche personal objects such as medals, family photos or memorabilia",
}


def category_list() -> str:
    """The nine categories as prompt lines: ``- id (Name): examples``."""
    lines = [f"- {cat.value} ({name}): {examples}" for cat, (name, examples) in CATEGORY_GUIDE.items()]
    return "\n".join(lines)


_PRIVATE = "anything that could reveal private or identifying information about a person, even \
partially, blurred or only implied"

_FLAG_RULES = f"""Privacy categories (id, name, examples):
{category_list()}

Rules:
- The decision is binary: TRUE or FALSE, no explanation.
- Answer TRUE if anything in the image falls into any category above.
- When unsure, answer TRUE: ambiguous, low-resolution or occluded content counts as private.
- Always TRUE: partial faces in mirrors or reflections; blurred name tags, signs or screens; groups of \
people even when no face is visible; partly legible receipts or notes; niche personal objects such as \
medals, family photos or memorabilia.
- FALSE only when the image clearly shows nothing of the above."""

INSPECT_PROMPT = f"""Decide whether this image contains {_PRIVATE}.

{_FLAG_RULES}

Answer with one JSON object:
- "privacy_flag": true or false.
- "categories": the ids of every category present in the image (empty when none)."""

_DESCRIBE_FIELDS = f"""1. "review": the privacy-sensitive elements, at most {MAX_REVIEW_ITEMS} items, most \
sensitive first, such as faces or bodies, text, unique objects, revealing backgrounds or uniforms. For \
each: "item" says what it is (at most {REVIEW_ITEM_WORDS} words), "reason" says why it is sensitive (at most \
{REVIEW_REASON_WORDS} words), "category" is its privacy category id, one of: \
{", ".join(c.value for c in Category)}.

2. "private_caption": a full visual description in complete sentences, at most {CAPTION_WORDS} words. \
Describe only what is verifiably visible; no speculation. Keep each subject's placement as it is, \
including off-centre or partly visible subjects.

3. "public_caption": a natural, privacy-preserving description in at most {CAPTION_WORDS} words, about \
the {{image_class}} and its non-identifying context. Leave out everything listed in the review. No \
logos, brands, text, faces or private settings. Preserve the layout: each subject's pose, size and \
position in the frame, without centring or idealising anything."""

DESCRIBE_PROMPT = f"""Image class: {{image_class}}. Review this image for privacy and write two captions.

{_DESCRIBE_FIELDS}

Answer with one JSON object with the fields "review", "private_caption" and "public_caption"."""

FUSED_PROMPT = f"""Image class: {{image_class}}. Check this image for private information; describe it only \
if you find any.

Step 1, the privacy flag: does this image contain {_PRIVATE}?

{_FLAG_RULES}

Step 2, only when the flag is TRUE: review the image for privacy and write two captions.

{_DESCRIBE_FIELDS}

Answer with one JSON object:
- When the flag is FALSE: exactly {{"privacy_flag":false}}, with no other field.
- When the flag is TRUE: "privacy_flag": true, "categories" (the ids of every category present), then \
"review", "private_caption" and "public_caption"."""

CRITERION_PROMPT = """Decide whether this image shows anything of one privacy category that could reveal \
private or identifying information about a person, even partially, blurred or only implied.

Category: {name}, for example {examples}.

Rules:
- The decision is binary: TRUE or FALSE, no explanation.
- Answer TRUE if anything in the image falls into this category.
- When unsure, answer TRUE: ambiguous, low-resolution or occluded content counts as present.{always}
- FALSE only when the image clearly shows nothing of this category.

Answer with one JSON object: "present": true or false."""

INSTRUCT_PROMPT = f"""Public caption of an image:
"{{public_caption}}"

Write an edit instruction that makes this image identity-neutral while keeping it useful:
- At most {INSTRUCTION_WORDS} words, written as one continuous phrase fragment.
- Keep the layout, the objects and the actions unchanged.
- Change every privacy-relevant element with realistic, specific, significant changes that can be drawn.
- For each person, make at least two changes, one of them to skin in private contexts, tattoos or \
facial expression.
- Say nothing about the parts that stay unchanged, and add no meta text (no "Edit:", no quotes, no \
explanations).

Answer with one JSON object: "edit_instruction": the instruction."""

COMBINE_PROMPT = f"""Image class: {{image_class}}.

Public caption of the image:
"{{public_caption}}"

Edit instruction for that image:
"{{edit_instruction}}"

Write one caption of the edited image:
- At most {CAPTION_WORDS} words, natural full sentences.
- Apply every change in the edit instruction.
- Keep everything else in the public caption as it is: layout, objects, actions, positions.
- It still describes an image of the class "{{image_class}}".
- No meta text (no "Caption:", no quotes, no explanations).

Answer with one JSON object: "combined_caption": the caption."""


def _fill(template: str, **values: str) -> str:
    """Substitute ``{name}`` placeholders in one pass (inserted values are never re-substituted)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), template)


def _vision_messages(system: str, text: str) -> list[dict]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
    ]


def inspect_messages() -> list[dict]:
    """Call A: privacy flag and categories for one image."""
    return _vision_messages(INSPECT_SYSTEM, INSPECT_PROMPT)


def criterion_messages(category: Category) -> list[dict]:
    """Per-criterion call A: is ``category`` present in one image (its definition only; TRUE if unsure)."""
    name, examples = CATEGORY_GUIDE[category]
    always = f"\n- Always TRUE: {ALWAYS_TRUE[category]}." if category in ALWAYS_TRUE else ""
    text = _fill(CRITERION_PROMPT, name=name, examples=examples, always=always)
    return _vision_messages(INSPECT_SYSTEM, text)


def describe_messages(image_class: str) -> list[dict]:
    """Call B: review, private and public caption for one image of ``image_class``."""
    return _vision_messages(DESCRIBE_SYSTEM, _fill(DESCRIBE_PROMPT, image_class=image_class))


def fused_messages(image_class: str) -> list[dict]:
    """Calls A + B in one: the flag, and on flagged images categories, review and both captions."""
    return _vision_messages(FUSED_SYSTEM, _fill(FUSED_PROMPT, image_class=image_class))


def instruct_messages(public_caption: str) -> list[dict]:
    """Call C: edit instruction from a public caption (text only)."""
    return [
        {"role": "system", "content": INSTRUCT_SYSTEM},
        {"role": "user", "content": _fill(INSTRUCT_PROMPT, public_caption=public_caption)},
    ]


def combine_messages(public_caption: str, edit_instruction: str, image_class: str) -> list[dict]:
    """Call D: one caption of the edited image, from the public caption and the edit (text only)."""
    text = _fill(COMBINE_PROMPT, public_caption=public_caption, edit_instruction=edit_instruction,
                 image_class=image_class)  # fmt: skip
    return [{"role": "system", "content": COMBINE_SYSTEM}, {"role": "user", "content": text}]


def apply_system_prompt(conversations: list[list[dict]], policy: str) -> list[list[dict]]:
    """``policy`` "merge_into_user" merges every system prompt into its user turn; other policies keep it.

    This makes the merge explicit for every engine (a server's template included); "auto" is left to
    the engine, which merges only when the model's chat template rejects a system role.
    """
    if policy == "merge_into_user":
        return [merge_system_into_user(c) for c in conversations]
    return conversations
