"""A tiny u2s run to fine-tune on: originals on the S3 server, a safe and a sensitive table written with
the contract's schemas, edited images made by the cpu-tiny preset's InstructPix2Pix editor."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from finetune_helpers import png, tiny_editor

from u2s.testing.images import noise_image

EDITED = 10  # rows with status edited; one kept and one error row besides
SIZE = (40, 32)


@pytest.fixture(scope="session")
def tiny_ip2p(tiny_models) -> Path:
    return tiny_models["instruct_pix2pix"]


@pytest.fixture(scope="session")
def tiny_clip(tiny_models) -> Path:
    return tiny_models["clip"]


@pytest.fixture(scope="session")
def tiny_run(s3_endpoint, tiny_ip2p) -> dict:
    """One run's tables on S3: ``EDITED`` edited rows, a kept and an error row; originals on S3 too."""
    import uuid

    import boto3

    from u2s.config import StorageConfig
    from u2s.io.storage import arrow_filesystem
    from u2s.schema import SENSITIVE_SCHEMA, safe_schema
    from u2s.stage2.editors.base import EditPrompt

    bucket = f"ft-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    originals = [noise_image(*SIZE, seed=i) for i in range(EDITED + 2)]
    ids = [f"img-{i:02d}" for i in range(EDITED + 2)]
    for i, img in enumerate(originals):
        s3.put_object(Bucket=bucket, Key=f"originals/{ids[i]}.png", Body=png(img))
    editor = tiny_editor(tiny_ip2p)
    prompts = [
        EditPrompt(edit_instruction=f"replace the face {i}", public_caption=f"a photo {i}")
        for i in range(EDITED)
    ]
    edits = editor.edit(originals[:EDITED], prompts, list(range(EDITED)))
    statuses = ["edited"] * EDITED + ["kept", "error"]
    safe, sensitive = [], []
    for i, id in enumerate(ids):
        edited = statuses[i] == "edited"
        image = {"bytes": png(edits[i]), "path": None} if edited else None
        if statuses[i] == "kept":
            image = {"bytes": png(originals[i]), "path": None}
        safe.append({"id": id, "image": image, "status": statuses[i], "width": SIZE[0], "height": SIZE[1],
                     "public_caption": prompts[i].public_caption if edited else None,
                     "error": "edit: RuntimeError" if statuses[i] == "error" else None})  # fmt: skip
        sensitive.append({"id": id, "source": f"s3://{bucket}/originals/{id}.png", "status": statuses[i],
                          "public_caption": prompts[i].public_caption if edited else None,
                          "edit_instruction": prompts[i].edit_instruction if edited else None})  # fmt: skip
    for name, rows, schema in (("safe", safe, safe_schema()), ("sensitive", sensitive, SENSITIVE_SCHEMA)):
        fs, path = arrow_filesystem(f"s3://{bucket}/run/{name}/part-00000.parquet", storage)
        with fs.open_output_stream(path) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
    return {
        "safe": f"s3://{bucket}/run/safe",
        "sensitive": f"s3://{bucket}/run/sensitive",
        "bucket": f"s3://{bucket}",
        "storage": storage,
        "ids": ids[:EDITED],
        "originals": {ids[i]: png(originals[i]) for i in range(EDITED)},
        "edited": {ids[i]: png(edits[i]) for i in range(EDITED)},
        "prompts": {ids[i]: prompts[i] for i in range(EDITED)},
    }
