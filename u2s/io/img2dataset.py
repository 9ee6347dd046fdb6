"""img2dataset's output layouts: its image columns and its rows for failed downloads.

img2dataset (``--output_format parquet``) writes one row per URL with the image in a binary column named
after the encode format (``jpg``, ``png`` or ``webp``) beside ``key``, ``url``, ``caption``, ``status``
and ``error_message``; ``--output_format webdataset`` writes the same table (without the images) beside
each tar shard. URLs that failed to download are rows whose ``status`` is not ``success``: they become
error rows whose reason keeps only fixed phrases and the HTTP status code, never the URL or the message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

    from u2s.config import StorageConfig

#: The image columns img2dataset writes, one per ``--encode_format``, in the order they are tried.
IMAGE_COLUMNS = ("jpg", "png", "webp")
#: The columns that mark img2dataset's layout (also in the Parquet sidecar of each tar shard).
STATUS_COLUMNS = ("key", "status", "error_message")

_HTTP_STATUS = re.compile(r"\bHTTP Error (\d{3})\b")


def image_column(names: list[str], configured: str) -> str:
    """The image column of a Parquet schema: ``configured`` if present, else img2dataset's ``jpg``..."""
    if configured in names:
        return configured
    return next((name for name in IMAGE_COLUMNS if name in names), configured)


def has_statuses(names: list[str]) -> bool:
    """Whether a table has img2dataset's per-URL ``status`` and ``error_message`` columns."""
    return all(name in names for name in STATUS_COLUMNS)


def download_error(status: str | None, message: str | None) -> str | None:
    """The content-free reason of a row that img2dataset did not download (None: downloaded).

    ``HTTP Error 404: Not Found`` gives ``download failed (HTTP 404)``; other messages (which may hold
    host names or paths) give ``download failed``; an image img2dataset fetched but could not resize or
    re-encode gives ``image rejected by img2dataset``.
    """
    if status == "success":
        return None
    if status == "failed_to_resize":
        return "image rejected by img2dataset"
    code = _HTTP_STATUS.search(message or "")
    return f"download failed (HTTP {code.group(1)})" if code else "download failed"


def download_errors(table: pa.Table) -> list[str | None]:
    """:func:`download_error` of each row of a table with :data:`STATUS_COLUMNS`."""
    statuses = table.column("status").to_pylist()
    messages = table.column("error_message").to_pylist()
    return [download_error(s, m) for s, m in zip(statuses, messages, strict=True)]


def read_statuses(uri: str, storage: StorageConfig) -> pa.Table | None:
    """``key``, ``status`` and ``error_message`` of an img2dataset Parquet file, or None when it has none."""
    import pyarrow.parquet as pq

    from u2s.io.storage import arrow_filesystem

    afs, path = arrow_filesystem(uri, storage)
    with afs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        if not has_statuses(parquet.schema_arrow.names):
            return None
        return parquet.read(columns=list(STATUS_COLUMNS))
