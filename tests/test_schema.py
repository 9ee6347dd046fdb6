"""The data contract: private columns never in the safe schema; the safe table reads as an HF dataset."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
from PIL import Image

from u2s.schema import (
    PRIVATE_COLUMNS,
    SAFE_SCHEMA,
    SENSITIVE_SCHEMA,
    WORKING_SCHEMA,
    new_row,
    rows_to_table,
)


def test_safe_schema_has_no_private_or_identifying_columns():
    assert not {*PRIVATE_COLUMNS, "source", "categories", "timings", "thumbnail"} & set(SAFE_SCHEMA.names)
    assert {*PRIVATE_COLUMNS, "source", "categories"} <= set(SENSITIVE_SCHEMA.names)
    assert set(SAFE_SCHEMA.names) | set(SENSITIVE_SCHEMA.names) <= set(WORKING_SCHEMA.names)


def test_new_row_round_trips_through_arrow_and_never_names_the_image_after_its_source():
    row = new_row("a", "/x/jane_doe.png", "cat", b"\x89PNG")
    table = rows_to_table([row])
    assert table.schema == WORKING_SCHEMA
    assert table.to_pylist()[0]["image"] == {"bytes": b"\x89PNG", "path": None}


def test_safe_parquet_loads_with_datasets_and_decodes_images(tmp_path):
    import datasets

    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (200, 10, 10)).save(buf, format="PNG")
    rows = [new_row("a", "a.png", None, buf.getvalue()), new_row("b", "b.png", "x", None)]
    rows[0].update(status="kept", width=5, height=3, privacy_flag=False, categories=[])
    rows[1].update(status="error", error="decode: empty file", image=None)
    table = rows_to_table(rows).select(SAFE_SCHEMA.names).cast(SAFE_SCHEMA)
    pq.write_table(table, tmp_path / "part.parquet")
    assert "huggingface" in json.dumps(
        {k.decode(): v.decode() for k, v in pq.read_schema(tmp_path / "part.parquet").metadata.items()}
    )
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "*.parquet"), split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (5, 3)
    assert ds[1]["image"] is None and ds[1]["error"] == "decode: empty file"


def test_verification_publishes_only_its_attempt_count_and_verdict():
    # stage2.verify: what re-flagged (categories, face distances) stays in the sensitive table.
    assert {"verify_attempts", "verified"} <= set(SAFE_SCHEMA.names) & set(SENSITIVE_SCHEMA.names)
    assert "verify" in SENSITIVE_SCHEMA.names and "verify" not in SAFE_SCHEMA.names
    assert "candidate" not in set(SAFE_SCHEMA.names) | set(SENSITIVE_SCHEMA.names)  # a working column only
