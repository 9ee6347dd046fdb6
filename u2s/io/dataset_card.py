"""The safe output's dataset card: ``README.md`` in Hugging Face's format, beside the safe table.

Its YAML front matter names the Parquet files (``configs``/``data_files``) and their features, so
``datasets.load_dataset("<safe output>")`` reads the table and decodes ``image`` with no ``data_files``
argument, and a Hub upload of the folder shows the images in the viewer. The text says what was done: the
models, the editor and its settings, how edits were checked, rows by status, the metadata policy and what
each column means.

Everything in it is public, like the rest of the safe folder: it is built only from the public run record
(counts, versions, the settings with every path and URI redacted: :func:`u2s.run_record.public_config`)
and the safe table's schema, never from the sensitive table or the full config.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import yaml

from u2s.run_record import REDACTED
from u2s.schema import IMAGE_TYPE

CARD_NAME = "README.md"
#: The safe table's files, relative to the card (the writers name them ``part-*.parquet``).
DATA_FILES = "part-*.parquet"

COLUMN_DOCS = {
    "id": "Row id, shared with the restricted sensitive table.",
    "source": "Source path or URI of the input image (published by choice: `output.publish`).",
    "label": "The input's label (class folder, COCO split or label column).",
    "image": "The published image: the original pixels with metadata removed (`kept`), the editor's output "
    "(`edited`), or null (`error`).",
    "width": "Width of the published image in pixels.",
    "height": "Height of the published image in pixels.",
    "status": "`kept` (not private), `edited` (rewritten) or `error` (withheld: no image).",
    "error": "For `error` rows, the stage and reason (no private text).",
    "privacy_flag": "Whether the inspection found private content.",
    "categories": "Privacy categories the inspection found (published by choice: `output.publish`).",
    "public_caption": "A caption with nothing identifying, for flagged rows.",
    "editor": "The editor that produced an `edited` image.",
    "seed": "The editor's seed for this row.",
    "verify_attempts": "Edits tried under `stage2.verify` (null: not verified).",
    "verified": "Whether an edit passed every configured check (`stage2.verify`).",
}


def _yaml_feature(name: str, dtype: pa.DataType) -> dict[str, Any]:
    """One entry of the card's ``dataset_info.features`` (Hugging Face's YAML form of a feature)."""
    if dtype == IMAGE_TYPE:
        return {"name": name, "dtype": "image"}
    if pa.types.is_list(dtype):
        return {"name": name, "list": _yaml_feature(name, dtype.value_type)["dtype"]}
    names = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.bool_(): "bool",
             pa.float64(): "float64"}  # fmt: skip
    return {"name": name, "dtype": names[dtype]}


def front_matter(schema: pa.Schema, rows: int) -> dict[str, Any]:
    """The card's YAML header: one ``train`` split over the safe table's files, and its features."""
    return {
        "tags": ["image", "privacy", "anonymization", "u2s"],
        "size_categories": [_size_category(rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
        "dataset_info": {"features": [_yaml_feature(f.name, f.type) for f in schema]},
    }


def _type_name(dtype: pa.DataType) -> str:
    feature = _yaml_feature("", dtype)
    return feature.get("dtype") or f"list of {feature['list']}"


def _size_category(rows: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]  # fmt: skip
    return next((label for bound, label in bounds if rows < bound), "n>100M")


def _model(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "none"
    if spec.get("model") == REDACTED:  # a local folder or an s3:// copy: its location is not published
        return "(private location)"
    revision = f" (revision `{spec['revision']}`)" if spec.get("revision") else ""
    return f"`{spec.get('model')}`{revision}"


def _stage1_lines(stage1: dict[str, Any]) -> list[str]:
    engine = stage1.get("engine", "?")
    lines = [
        f"- **Inspection** (stage 1, `{stage1.get('mode', '?')}` mode, {engine} engine): the vision-language "
        f"model {_model(stage1.get('vlm'))} checked every image for the Unsafe2Safe privacy categories "
        "(flagged when unsure) and wrote a public caption of each flagged image; the text model "
        f"{_model(stage1.get('llm'))} wrote the edit instruction.",
    ]
    if engine == "http":
        lines.append(
            "  The models ran behind an OpenAI-compatible server; the ids above are the configured ones."
        )
    return lines


def _stage2_lines(stage2: dict[str, Any]) -> list[str]:
    editor = stage2.get("editor", "?")
    settings = stage2.get(editor) or {}
    model = _model(settings.get("model")) if isinstance(settings.get("model"), dict) else "none (no model)"
    shown = {k: v for k, v in settings.items() if k != "model" and not isinstance(v, dict | list)}
    lines = [
        f"- **Editing** (stage 2): flagged images were rewritten by the `{editor}` editor, model {model}, "
        f"seed {stage2.get('seed')} (each row's seed is in the `seed` column).",
    ]
    if shown:
        lines.append(
            "  Settings: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(shown.items())) + "."
        )
    verify = stage2.get("verify")
    if isinstance(verify, dict) and verify.get("checks"):
        checks = ", ".join(f"`{c}`" for c in verify["checks"])
        lines.append(
            f"- **Verification**: every edited image was checked ({checks}) before publication and edited "
            f"again on failure, up to {verify.get('max_attempts', '?')} attempts; a row that never passed "
            "is published as `error` with no image."
        )
    else:
        lines.append(
            "- **Verification**: edited images were not re-checked after editing (`stage2.verify` off)."
        )
    return lines


def _metadata_line(output: dict[str, Any]) -> str:
    if output.get("metadata") == "keep":
        return ("- **Metadata**: kept as in the input (`output.metadata: keep`): kept images are the input "
                "files byte for byte, EXIF, GPS and comments included.")  # fmt: skip
    return ("- **Metadata**: removed (`output.metadata: strip`): no EXIF but the orientation, no XMP, IPTC, "
            "comments, text chunks, embedded thumbnails or trailing data; kept JPEG, PNG and WebP files "
            "lose those segments without re-encoding, other formats are re-encoded losslessly. A multi-frame "
            "file is published as the frame that was inspected, and colour under fully transparent pixels "
            "is cleared.")  # fmt: skip


def dataset_card(public_record: dict[str, Any], schema: pa.Schema) -> str:
    """The card's text, from the public run record and the safe table's ``schema``."""
    summary = public_record.get("summary") or {}
    config = public_record.get("config") or {}
    versions = public_record.get("versions") or {}
    rows = int(summary.get("rows", 0))
    by_status = summary.get("by_status") or {}
    header = yaml.safe_dump(front_matter(schema, rows), sort_keys=False, allow_unicode=True)
    status_rows = "\n".join(f"| `{s}` | {by_status.get(s, 0):,} |" for s in ("kept", "edited", "error"))
    errors = summary.get("errors_by_stage") or {}
    error_line = ""
    if errors:
        error_line = (
            "\nWithheld rows by stage: " + ", ".join(f"{k} {v:,}" for k, v in sorted(errors.items())) + ".\n"
        )
    columns = "\n".join(
        f"| `{f.name}` | {_type_name(f.type)} | {COLUMN_DOCS.get(f.name, '')} |" for f in schema
    )
    publish = (config.get("output") or {}).get("publish") or []
    published = (
        f" It publishes {', '.join(f'`{c}`' for c in publish)} too (`output.publish`)." if publish else ""
    )
    made_with = ", ".join(f"{k} {v}" for k, v in versions.items())
    return f"""---
{header}---

# Privacy-safe image dataset

This dataset was made privacy-safe with u2s, an implementation of the Unsafe2Safe method (CVPR 2026):
images that show private content (people, text and identifiers, health indicators, locations and times,
personal settings...) were rewritten by an instruction-driven image editor; the others are published
with their original pixels.

## Rows

{rows:,} images, each exactly once:

| status | rows |
|---|---|
{status_rows}
{error_line}
Rows with status `error` carry no image and no caption: a row that could not be made safe is never
published.

## How it was made

{chr(10).join(_stage1_lines(config.get("stage1") or {}) + _stage2_lines(config.get("stage2") or {}))}
{_metadata_line(config.get("output") or {})}

Private captions, the inspection's findings, edit instructions and source paths are not part of this
dataset: they stay in a separate, restricted table.{published}

## Columns

| column | type | meaning |
|---|---|---|
{columns}

## Loading

```python
import datasets

ds = datasets.load_dataset("path/or/hub-id/of/this/dataset", split="train")
ds = ds.filter(lambda row: row["status"] != "error")  # ds[0]["image"] is a PIL image
```

Made with {made_with}. The run record `_run.json` beside this card lists the full settings (paths
redacted) and every attempt of the run.
"""


def write_dataset_card(uri: str, storage: Any, public_record: dict[str, Any], schema: pa.Schema) -> str:
    """Write the card as ``README.md`` in the safe output ``uri`` (which exists: the table is written)."""
    from u2s.io.storage import filesystem, uri_join

    card = uri_join(uri, CARD_NAME)
    fs, path = filesystem(card, storage)
    with fs.open(path, "w") as f:
        f.write(dataset_card(public_record, schema))
    return card
