"""The paper's VLM evaluation prompts (PAPER.md §4), answered through the stage-1 engines as JSON.

Three questions, each with the paper's wording, bands and markers:

- **text extraction** (TextSim, VLM): ``NO_TEXT`` or the verbatim text under ``### TEXT``, ``[unclear]``
  for illegible parts;
- **demographics** (Race Entropy): ``NO_HUMAN`` or ``### GENDER`` + ``### RACE`` from seven race labels;
- **pairwise anonymization judge** (VLMScore): the two-step decision (same instance → 0, else an
  unlinkability score in the paper's bands), answered as ``ANONYMIZATION_SCORE: <integer 0-100>``.

The stage-1 engines decode JSON against a schema, so the paper's plain-text formats become JSON whose
keys *are* the markers (the schema encodes them): ``{"NO_TEXT": bool, "TEXT": str}``,
``{"NO_HUMAN": bool, "GENDER": [...], "RACE": [...]}`` and ``{"ANONYMIZATION_SCORE": int}`` (0-100 in
the schema). The judge sees one image with the original on the left and the anonymized image on the
right, each squashed to ``image_size``² (the stage-1 engine interface carries one image per
conversation; the paper's prompt describes exactly this side-by-side layout).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import ModelConfig
    from u2s.eval.config import VlmMetricsConfig
    from u2s.stage1.engines import Engine

#: Race labels of the paper's entropy (authors' code) and the seven its prompt offers.
RACES = ("White", "Black", "Asian", "Hispanic", "Other")
PROMPT_RACES = ("White", "Black", "Asian", "Hispanic", "Middle Eastern", "Indian", "Other")
GENDERS = ("male", "female")
#: Longest text the extraction answer may hold (characters).
MAX_TEXT_CHARS = 2000

ANALYST_SYSTEM = "You are an image analysis assistant."
JUDGE_SYSTEM = "You are a vision-language evaluator for privacy-preserving image anonymization."

TEXT_PROMPT = """Analyze the provided image and extract all visible text that appears anywhere in the scene, \
including logos, signs, menus, or labels.

If no readable text is visible, answer with NO_TEXT true and an empty TEXT.

Otherwise, answer with NO_TEXT false and TEXT holding the verbatim text as it appears, preserving \
capitalization, punctuation, and line breaks.

Rules:
- Include only text visible in the image; do not add descriptions or interpretations.
- Preserve exact wording, capitalization, and line breaks.
- If part of the text is unclear, replace it with [unclear].
- Answer in JSON: {"NO_TEXT": true or false, "TEXT": "..."}."""

DEMOGRAPHICS_PROMPT = f"""Analyze the provided image and identify all apparent genders and races visible \
in the scene.

If no clearly visible person (no recognizable face or body) is present, answer with NO_HUMAN true and \
empty GENDER and RACE lists.

Otherwise, answer with NO_HUMAN false and:
- GENDER: <male and/or female>
- RACE: <list of races: {", ".join(PROMPT_RACES)}>

Rules:
- Use only the categories provided.
- Include all categories that clearly appear.
- Do not include "unknown" or any explanation.
- Answer in JSON: {{"NO_HUMAN": true or false, "GENDER": [...], "RACE": [...]}}."""

JUDGE_PROMPT = """You are given two images shown side by side:

- Left image: the original image
- Right image: the edited / anonymized image

Your task is to assign an anonymization score that measures how much the RIGHT image reduces the \
ability to link the LEFT image to the same specific identities or personal specifics.

Privacy-sensitive information includes (but is not limited to):
- **People**, faces (full or partial), visible skin in private contexts, tattoos, or emotional expressions
- **Appearance cues**: clothing, accessories, or features revealing gender, culture, religion, \
status, or roles
- **Health indicators**: casts, wheelchairs, bandages, medications, disabilities, or visible illness/injury
- **Texts or symbols**: signs, receipts, documents, screens, handwriting, license plates, \
usernames, phone numbers
- **Locations or timestamps**: homes, offices, bedrooms, addresses, classrooms, GPS data, clocks, \
date/time stamps
- **Personal interactions**: small groups, families, friends, teams, protests, celebrations, \
or close relationships
- **Professional/school settings**: uniforms, tools, name tags, diplomas, workspaces, formal events
- **Cultural/political/religious identifiers**: flags, slogans, attire, ceremonies, posters
- **Private belongings or behaviors**: hobbies, photos, mail, social media, travel documents, receipts

You MUST follow this decision process:

STEP 1 — Instance identity check:
Decide whether the LEFT and RIGHT images depict the same characteristics of privacy-sensitive information.
If they all appear to be the same instance with no meaningful visual change, the score will be 0.
- If people, faces, bodies, clothing, or group composition differ, treat the images as DIFFERENT instances.
- The same layout, camera angle, or furniture arrangement does NOT imply the same instance.

STEP 2 — Unlinkability strength:
If the RIGHT image shows a different instance, identity, or attributes, score how strongly this change \
prevents linking the LEFT image to the same specific details. The general scene, activity, or layout may \
remain similar.

Preserving scene structure, pose, or activity does NOT reduce the score as long as identity or instance \
linkability is broken.

### Scoring (0–100)
- **0**: Same identities or same instance (no anonymization).
- **20–40**: Weak unlinkability (small but real instance or attribute change).
- **40–70**: Moderate unlinkability (multiple identity-related cues changed).
- **70–90**: Strong unlinkability (identities or specifics are hard to link).
- **90–100**: Near-complete unlinkability of identities or personal specifics.

High scores are allowed even when scene/layout/activity is preserved, if identities or personal \
specifics are replaced or neutralized.

Reward evidence of:
- people/face identity replacement or strong masking (blur/occlusion/distortion)
- removal/replacement of tattoos, distinctive clothing/accessories, name tags
- removal/replacement of readable text (documents, screens, plates, usernames)
- replacement of distinctive personal objects or environment instance details

Rules:
- Give score 0 for identical pair.
- Give score 100 for totally different image pair.
- Do NOT penalize preservation of scene structure or activity.
- Ignore image quality, realism, or aesthetics.
- Do not infer sensitive information that is not clearly visible.

Output (JSON): {"ANONYMIZATION_SCORE": <integer 0-100>}"""


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextAnswer(_Answer):
    """Text extraction: the ``NO_TEXT`` marker, or the verbatim text."""

    NO_TEXT: bool
    TEXT: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]

    def text(self) -> str:
        """The extracted text; empty when the marker says there is none (or the text is blank)."""
        return "" if self.NO_TEXT or self.TEXT.strip() == "NO_TEXT" else self.TEXT.strip()


class DemographicsAnswer(_Answer):
    """Demographics: the ``NO_HUMAN`` marker, or the ``GENDER`` and ``RACE`` labels that appear."""

    NO_HUMAN: bool
    GENDER: list[Literal["male", "female"]] = Field(max_length=len(GENDERS))
    RACE: list[Literal["White", "Black", "Asian", "Hispanic", "Middle Eastern", "Indian", "Other"]] = Field(
        max_length=len(PROMPT_RACES)
    )


class JudgeAnswer(_Answer):
    """The pairwise judge's ``ANONYMIZATION_SCORE`` (0-100)."""

    ANONYMIZATION_SCORE: int = Field(ge=0, le=100)


def race_entropy(labels: Sequence[str], mode: Literal["paper", "other", "seven"] = "paper") -> float:
    """Normalised entropy of one image's race labels (the paper's Race Entropy).

    Counts of the labels' categories, entropy in nats, divided by the log of the number of categories.
    ``mode`` settles the prompt's 7 labels against the 5-category entropy: ``paper`` drops labels
    outside the five (the authors' code), ``other`` counts them as Other, ``seven`` uses all seven
    (/ log 7). No label left → 0.0 (the authors' code).
    """
    if mode == "paper":
        kept = [label for label in labels if label in RACES]
    elif mode == "other":
        kept = [label if label in RACES else "Other" for label in labels if label in PROMPT_RACES]
    else:
        kept = [label for label in labels if label in PROMPT_RACES]
    categories = len(PROMPT_RACES) if mode == "seven" else len(RACES)
    if not kept:
        return 0.0
    total = len(kept)
    entropy = -sum(n / total * math.log(n / total) for n in Counter(kept).values())
    return entropy / math.log(categories)


def side_by_side(left: Image.Image, right: Image.Image, size: int) -> Image.Image:
    """One image: ``left`` and ``right`` each squashed to ``size``², next to each other."""
    from PIL import Image

    canvas = Image.new("RGB", (2 * size, size))
    for index, image in enumerate((left, right)):
        canvas.paste(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), (index * size, 0))
    return canvas


def conversation(prompt: str, system: str) -> list[dict]:
    """A system turn and a user turn with one image part before ``prompt``."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
    ]


def build_vlm_engine(config: VlmMetricsConfig, model: ModelConfig) -> Engine:
    """A stage-1 vision engine for ``model`` (the one dependency on :mod:`u2s.stage1.engines`).

    Its image size is twice ``config.image_size``: the judge's side-by-side pair then keeps
    ``image_size`` per image; single images are fitted to ``image_size`` before they are sent.
    """
    from u2s.config import Stage1Config
    from u2s.stage1.engines import build_engine

    stage1 = Stage1Config(
        engine=config.engine, vlm=model, llm=model, http=config.http, image_size=2 * config.image_size,
        vlm_processor_kwargs=config.processor_kwargs,
    )  # fmt: skip
    return build_engine(stage1, config.engine, model, vision=True)
