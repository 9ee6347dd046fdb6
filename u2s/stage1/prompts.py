"""The paper's stage-1 prompts (PAPER.md §2), adapted to JSON output.

Builders return OpenAI-style chat messages, so every engine (local transformers, vLLM, HTTP) shares
them: a one-line role system prompt, then a user turn. Vision prompts put one ``{"type": "image"}`` part
before the text; engines attach the image itself. The JSON shape is enforced by constrained decoding
(:mod:`u2s.stage1.schemas`); the prompt still describes each field, since that is what the model reads.
"""

from __future__ import annotations

import re

from u2s.schema import Category
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
INSTRUCT_SYSTEM = "You are an image anonymization assistant who writes identity-neutral edit instructions."


def category_list() -> str:
    """The nine categories as prompt lines: ``- id (Name): examples``."""
    lines = [f"- {cat.value} ({name}): {examples}" for cat, (name, examples) in CATEGORY_GUIDE.items()]
    return "\n".join(lines)


INSPECT_PROMPT = f"""Decide whether this image contains anything that could reveal private or identifying \
information about a person, even partially, blurred or only implied.

Privacy categories (id, name, examples):
{category_list()}

Rules:
- The decision is binary: TRUE or FALSE, no explanation.
- Answer TRUE if anything in the image falls into any category above.
- When unsure, answer TRUE: ambiguous, low-resolution or occluded content counts as private.
- Always TRUE: partial faces in mirrors or reflections; blurred name tags, signs or screens; groups of \
people even when no face is visible; partly legible receipts or notes; niche personal objects such as \
medals, family photos or memorabilia.
- FALSE only when the image clearly shows nothing of the above.

Answer with one JSON object:
- "privacy_flag": true or false.
- "categories": the ids of every category present in the image (empty when none)."""

DESCRIBE_PROMPT = f"""Image class: {{image_class}}. Review this image for privacy and write two captions.

1. "review": the privacy-sensitive elements, at most {MAX_REVIEW_ITEMS} items, most sensitive first, \
such as faces or bodies, text, unique objects, revealing backgrounds or uniforms. For each: "item" says \
what it is (at most {REVIEW_ITEM_WORDS} words), "reason" says why it is sensitive (at most \
{REVIEW_REASON_WORDS} words), "category" is its privacy category id, one of: \
{", ".join(c.value for c in Category)}.

2. "private_caption": a full visual description in complete sentences, at most {CAPTION_WORDS} words. \
Describe only what is verifiably visible; no speculation. Keep each subject's placement as it is, \
including off-centre or partly visible subjects.

3. "public_caption": a natural, privacy-preserving description in at most {CAPTION_WORDS} words, about \
the {{image_class}} and its non-identifying context. Leave out everything listed in the review. No \
logos, brands, text, faces or private settings. Preserve the layout: each subject's pose, size and \
position in the frame, without centring or idealising anything.

Answer with one JSON object with the fields "review", "private_caption" and "public_caption"."""

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


def describe_messages(image_class: str) -> list[dict]:
    """Call B: review, private and public caption for one image of ``image_class``."""
    return _vision_messages(DESCRIBE_SYSTEM, _fill(DESCRIBE_PROMPT, image_class=image_class))


def instruct_messages(public_caption: str) -> list[dict]:
    """Call C: edit instruction from a public caption (text only)."""
    return [
        {"role": "system", "content": INSTRUCT_SYSTEM},
        {"role": "user", "content": _fill(INSTRUCT_PROMPT, public_caption=public_caption)},
    ]
