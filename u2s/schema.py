"""The data contract: row status, privacy categories and the Arrow schema of every table.

Rows move between stages as Arrow tables with :data:`WORKING_SCHEMA`. The sink projects each row onto
two tables that share the row ``id``:

- the **safe table** (:func:`safe_schema`), which users publish: the image (metadata stripped), its
  public caption and status, its label unless ``output.publish`` leaves it out, and nothing that names
  where it came from (no path, no categories, no private text, no run bookkeeping);
- the **sensitive table** (:data:`SENSITIVE_SCHEMA`), one row per input row at a separate URI: the
  source path, the privacy categories, the review, both captions, the edit instruction (the paper's
  triplets on flagged rows) and per-row timings.
"""

from __future__ import annotations

import json
import re
from enum import Enum

import pyarrow as pa


class Status(str, Enum):
    """Final state of a row. While a row is still in flight its status is null."""

    EDITED = "edited"  # flagged and rewritten by the editor
    KEPT = "kept"  # not private: original pixels pass through untouched (metadata stripped)
    ERROR = "error"  # could not be processed; `error` says which stage and why; no image is published


class Category(str, Enum):
    """The nine privacy categories of the paper (PAPER.md §2.2)."""

    PEOPLE = "people"
    APPEARANCE = "appearance_cues"
    HEALTH = "health_indicators"
    TEXT = "texts_or_symbols"
    LOCATION_TIME = "locations_or_timestamps"
    INTERACTIONS = "personal_interactions"
    PROFESSIONAL = "professional_or_school_settings"
    IDENTIFIERS = "cultural_political_religious_identifiers"
    BELONGINGS = "private_belongings_or_behaviours"


STAGES = ("decode", "inspect", "describe", "instruct", "combine", "edit", "verify")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
REVIEW_TYPE = pa.list_(pa.struct([("item", pa.string()), ("reason", pa.string()), ("category", pa.string())]))
TIMINGS_TYPE = pa.struct([(stage, pa.float64()) for stage in STAGES])
#: One verification of one edit attempt (``stage2.verify``): the checks it failed (empty: passed) and
#: what they saw. Private (which categories re-flagged): sensitive table only.
VERIFY_TYPE = pa.list_(pa.struct([
    ("attempt", pa.int32()), ("editor", pa.string()), ("seed", pa.int64()), ("failed", pa.list_(pa.string())),
    ("categories", pa.list_(pa.string())), ("face_distance", pa.float64()),
]))  # fmt: skip

_FIELDS: dict[str, pa.DataType] = {
    "id": pa.string(),
    "source": pa.string(),
    "label": pa.string(),
    "image": IMAGE_TYPE,
    "thumbnail": pa.binary(),  # the VLM-sized JPEG decode makes once (working rows only)
    "frame_thumbnails": pa.list_(pa.binary()),  # decode.frames: all, frames 1.. (working rows only)
    "frames": pa.int32(),  # frames in the input file (1: a still image)
    "flagged_frame": pa.int32(),  # decode.frames: all, the first frame inspect flagged
    "width": pa.int32(),
    "height": pa.int32(),
    "status": pa.string(),
    "error": pa.string(),
    "privacy_flag": pa.bool_(),
    "categories": pa.list_(pa.string()),
    "review": REVIEW_TYPE,
    "private_caption": pa.string(),
    "public_caption": pa.string(),
    "edit_instruction": pa.string(),
    "combined_caption": pa.string(),
    "editor": pa.string(),
    "seed": pa.int64(),
    "candidate": IMAGE_TYPE,  # an edit awaiting verification (working rows only; `image` keeps the original)
    "verify_attempts": pa.int32(),  # edits tried under stage2.verify (null: not verified)
    "verified": pa.bool_(),  # stage2.verify: true = an attempt passed every check, false = none did
    "verify": VERIFY_TYPE,
    "metadata_removed": pa.bool_(),
    "timings": TIMINGS_TYPE,
}

#: Columns that carry private content and never enter the safe table (``verify``: what re-flagged).
PRIVATE_COLUMNS = ("review", "private_caption", "edit_instruction", "combined_caption", "verify")

SAFE_COLUMNS = (
    "id", "image", "width", "height", "status", "error", "privacy_flag", "public_caption", "editor", "seed",
    "verify_attempts", "verified",
)  # fmt: skip
#: Columns the safe table publishes only when ``output.publish`` lists them; each has a privacy cost.
#: label: the class (for class_folders the parent folder's name, which can name a person);
#: source: the original path or URL; categories: the privacy categories found.
PUBLISHABLE_COLUMNS = ("label", "source", "categories")
#: ``output.publish``'s default: the label (the class a classification dataset exists for).
DEFAULT_PUBLISH = ("label",)
SENSITIVE_COLUMNS = (
    "id", "source", "label", "status", "error", "privacy_flag", "categories", "review", "private_caption",
    "public_caption", "edit_instruction", "combined_caption", "editor", "seed", "verify_attempts", "verified",
    "verify", "frames", "flagged_frame", "metadata_removed", "timings",
)  # fmt: skip


def _schema(columns: tuple[str, ...]) -> pa.Schema:
    return pa.schema([pa.field(name, _FIELDS[name]) for name in columns])


WORKING_SCHEMA = _schema(tuple(_FIELDS))
SENSITIVE_SCHEMA = _schema(SENSITIVE_COLUMNS)


def _hf_feature(dtype: pa.DataType) -> dict:
    """Hugging Face `datasets` feature dict for an Arrow type (the subset the contract uses)."""
    if dtype == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(dtype):
        return {"_type": "List", "feature": _hf_feature(dtype.value_type)}
    if pa.types.is_struct(dtype):
        return {f.name: _hf_feature(f.type) for f in dtype}
    names = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.bool_(): "bool",
             pa.float64(): "float64"}  # fmt: skip
    return {"_type": "Value", "dtype": names[dtype]}


def _with_hf_features(schema: pa.Schema) -> pa.Schema:
    """Attach the `huggingface` metadata so `datasets.load_dataset("parquet", ...)` decodes `image`."""
    features = {f.name: _hf_feature(f.type) for f in schema}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def safe_columns(publish: tuple[str, ...] | list[str] = DEFAULT_PUBLISH) -> tuple[str, ...]:
    """The safe table's columns: :data:`SAFE_COLUMNS` plus the opted-in ``publish`` columns."""
    unknown = set(publish) - set(PUBLISHABLE_COLUMNS)
    if unknown:
        raise ValueError(f"cannot publish {sorted(unknown)}; publishable: {list(PUBLISHABLE_COLUMNS)}")
    extra = tuple(name for name in PUBLISHABLE_COLUMNS if name in publish)
    return SAFE_COLUMNS[:1] + extra + SAFE_COLUMNS[1:]


def safe_schema(publish: tuple[str, ...] | list[str] = DEFAULT_PUBLISH) -> pa.Schema:
    """Arrow schema of the safe table, with the Hugging Face features metadata."""
    return _with_hf_features(_schema(safe_columns(publish)))


#: The safe table under the default ``output.publish`` (its label included).
SAFE_SCHEMA = safe_schema()

#: A label such as ``George_W_Bush`` or ``Ana Lima``: two to four capitalised words or initials.
_PERSON_NAME = re.compile(
    r"[A-Z][a-z']+(?:-[A-Z][a-z']+)*(?:[_ ](?:[A-Z]\.?|[A-Z][a-z']+(?:-[A-Z][a-z']+)*)){1,3}"
)


def looks_like_person_name(label: str) -> bool:
    """Whether a label reads like a person's name (``First_Last``, ``First M Last``), as the class folders
    of face datasets are (LFW: ``George_W_Bush``). A heuristic for a warning: it also takes some class
    names (``Golden_Retriever``) and misses lower-case names."""
    return bool(_PERSON_NAME.fullmatch(label))


def empty_timings() -> dict[str, float | None]:
    return dict.fromkeys(STAGES)


def new_row(id: str, source: str, label: str | None, image_bytes: bytes | None) -> dict:
    """A working row as a reader emits it: every contract column present, stage outputs null.

    The image's ``path`` is never the source (paths carry names): decode names it ``{id}.{ext}``.
    """
    row = dict.fromkeys(_FIELDS)
    row.update(id=id, source=source, label=label, image={"bytes": image_bytes, "path": None},
               timings=empty_timings())  # fmt: skip
    return row


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Working rows → Arrow table with the full working schema."""
    return pa.Table.from_pylist(rows, schema=WORKING_SCHEMA)


def mark_error(row: dict, stage: str, reason: str) -> None:
    """Fail one row: status=error, `error` = "stage: reason". Reasons must hold no private text."""
    row["status"] = Status.ERROR.value
    row["error"] = f"{stage}: {reason}"
