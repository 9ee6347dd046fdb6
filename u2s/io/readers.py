"""Readers: a source dataset (local or ``s3://``) → a Ray Dataset of working rows, one per image.

Folder and COCO sources are listed on the driver into a sorted manifest of ``(id, source, label)``;
Ray tasks then fetch the bytes concurrently (``cat_ranges`` on s3fs runs many GETs at once). Parquet
sources are streamed per file with ``ParquetFile.iter_batches`` inside a generator UDF. Rows carry the
full working schema (:func:`u2s.schema.new_row`); an object that cannot be read still yields its row,
with ``status="error"`` and ``error="read: <reason>"``, so one bad object never stops a job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from u2s.config import InputConfig, Resources, StorageConfig
from u2s.io.storage import arrow_filesystem, filesystem, to_uri
from u2s.schema import mark_error, new_row, rows_to_table

if TYPE_CHECKING:
    import fsspec
    import ray.data

logger = logging.getLogger(__name__)

READ_STAGE = "read"


class InputError(ValueError):
    """The input cannot be read as configured (missing root, no images, duplicate ids...)."""


def stable_id(text: str) -> str:
    """A row id derived from a string (a source URI): the first 20 hex chars of its SHA-1."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


# ---------------------------------------------------------------- manifests (driver side)


def _is_hidden(path: str, root: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a component of ``path`` below ``root`` starts with one of ``prefixes`` (``._x.jpg``)."""
    relative = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
    return any(part.startswith(prefixes) for part in relative.split("/"))


def _list_files(
    uri: str, storage: StorageConfig, suffixes: set[str], skip: tuple[str, ...] = (".",)
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Sorted paths of the files under ``uri`` (recursively, or ``uri`` itself if a file) by suffix.

    Hidden files and folders (names starting with one of ``skip``) are left out: macOS ``._x.jpg``
    resource forks, ``.ipynb_checkpoints``; for Parquet also ``_SUCCESS``/``_common_metadata``.
    """
    fs, root = filesystem(uri, storage)
    fs.invalidate_cache(root)  # a long-lived process must see the current listing, not a cached one
    if not fs.exists(root):
        raise InputError(f"input not found: {uri}")
    paths = [
        path
        for path in fs.find(root)
        if posixpath.splitext(path)[1].lower() in suffixes and not _is_hidden(path, root, skip)
    ]
    return fs, sorted(paths)


def _suffixes(extensions: list[str]) -> set[str]:
    return {(e if e.startswith(".") else f".{e}").lower() for e in extensions}


def _folder_manifest(cfg: InputConfig, storage: StorageConfig) -> list[dict[str, Any]]:
    fs, paths = _list_files(cfg.uri, storage, _suffixes(cfg.extensions))
    items = []
    for path in paths:
        source = to_uri(fs, path)
        label = posixpath.basename(posixpath.dirname(path)) if cfg.format == "class_folders" else None
        items.append({"id": stable_id(source), "source": source, "label": label})
    return items


def _load_json(uri: str, storage: StorageConfig) -> Any:
    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"COCO annotations not found: {uri}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"COCO annotations are not valid JSON: {uri} ({type(e).__name__})") from None


def _coco_manifest(cfg: InputConfig, storage: StorageConfig) -> list[dict[str, Any]]:
    assert cfg.coco_annotations  # enforced by InputConfig
    fs, root = filesystem(cfg.uri, storage)
    if not fs.exists(root):
        raise InputError(f"input not found: {cfg.uri}")
    data = _load_json(cfg.coco_annotations, storage)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"COCO annotations have no 'images' list: {cfg.coco_annotations}")
    label = posixpath.basename(root.rstrip("/"))
    items = []
    for image in images:
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            raise InputError(f"COCO image entry without 'id' and 'file_name' in {cfg.coco_annotations}")
        source = to_uri(fs, posixpath.join(root, str(image["file_name"]).lstrip("/")))
        items.append({"id": str(image["id"]), "source": source, "label": label})
    return items


def _check_ids(items: list[dict[str, Any]], uri: str) -> None:
    dupes = [i for i, n in Counter(item["id"] for item in items).items() if n > 1]
    if dupes:
        shown = ", ".join(sorted(dupes)[:5])
        raise InputError(f"{len(dupes)} duplicate row id(s) in {uri} (e.g. {shown}); ids must be unique")


def build_manifest(cfg: InputConfig, storage: StorageConfig) -> list[dict[str, Any]]:
    """The sorted ``(id, source, label)`` list of a folder or COCO source, ``limit`` applied."""
    items = _coco_manifest(cfg, storage) if cfg.format == "coco" else _folder_manifest(cfg, storage)
    if not items:
        where = (
            f"annotations {cfg.coco_annotations}" if cfg.format == "coco" else f"extensions {cfg.extensions}"
        )
        raise InputError(f"no images found in {cfg.uri} (format {cfg.format}, {where})")
    _check_ids(items, cfg.uri)
    items.sort(key=lambda item: item["source"])
    return items[: cfg.limit] if cfg.limit else items


# ---------------------------------------------------------------- fetching (Ray tasks)


def fetch_bytes(uris: list[str], storage: StorageConfig) -> list[bytes | BaseException]:
    """Contents of each URI, in order; an object that cannot be read gives its exception instead.

    URIs on the same filesystem are fetched in one ``cat_ranges`` call (concurrent GETs on s3fs).
    """
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}
    for index, uri in enumerate(uris):
        fs, path = filesystem(uri, storage)
        group = groups.setdefault(id(fs), (fs, [], []))
        group[1].append(index)
        group[2].append(path)
    out: list[bytes | BaseException] = [b""] * len(uris)
    for fs, indices, paths in groups.values():
        try:
            contents = fs.cat_ranges(paths, None, None, on_error="return")
        except Exception as e:  # the whole call failed (e.g. no connection): fail these rows
            contents = [e] * len(paths)
        for index, data in zip(indices, contents, strict=True):
            out[index] = data
    return out


def _read_reason(error: BaseException) -> str:
    """Short, content-free reason of a failed read (the exception type only)."""
    return type(error).__name__


def _fetch_batch(batch: pa.Table, storage: StorageConfig) -> pa.Table:
    """Manifest rows → working rows with image bytes (or a ``read`` error)."""
    items = batch.to_pylist()
    contents = fetch_bytes([item["source"] for item in items], storage)
    rows = []
    for item, data in zip(items, contents, strict=True):
        ok = isinstance(data, bytes | bytearray | memoryview)
        row = new_row(item["id"], item["source"], item["label"], bytes(data) if ok else None)
        if not ok:
            mark_error(row, READ_STAGE, _read_reason(data) if isinstance(data, BaseException) else "no data")
        rows.append(row)
    return rows_to_table(rows)


# ---------------------------------------------------------------- parquet


def _image_bytes_getter(dtype: pa.DataType, column: str, uri: str):
    """A function from a cell of the image column to its bytes (HF ``Image`` struct or plain binary)."""
    if pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0:
        return lambda cell: cell.get("bytes") if cell else None
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return lambda cell: cell
    raise InputError(f"column {column!r} in {uri} is {dtype}, not an image struct {{bytes, path}} or binary")


def _parquet_files(cfg: InputConfig, storage: StorageConfig) -> list[str]:
    fs, paths = _list_files(cfg.uri, storage, {".parquet"}, skip=(".", "_"))
    if not paths:
        raise InputError(f"no .parquet files found in {cfg.uri}")
    return [to_uri(fs, path) for path in paths]


def _check_parquet_schema(cfg: InputConfig, storage: StorageConfig, file_uri: str) -> None:
    import pyarrow.parquet as pq

    afs, path = arrow_filesystem(file_uri, storage)
    with afs.open_input_file(path) as f:
        schema = pq.read_schema(f)
    for column in (cfg.image_column, cfg.id_column, cfg.label_column):
        if column and column not in schema.names:
            raise InputError(f"column {column!r} not in {file_uri} (columns: {', '.join(schema.names)})")
    _image_bytes_getter(schema.field(cfg.image_column).type, cfg.image_column, file_uri)


def _parquet_tasks(cfg: InputConfig, storage: StorageConfig) -> list[dict[str, Any]]:
    """One task per file: ``{"file": uri, "rows": cap or None}``; caps come from footers under ``limit``."""
    import pyarrow.parquet as pq

    files = _parquet_files(cfg, storage)
    _check_parquet_schema(cfg, storage, files[0])
    if not cfg.limit:
        return [{"file": uri, "rows": None} for uri in files]
    tasks, left = [], cfg.limit
    for uri in files:
        afs, path = arrow_filesystem(uri, storage)
        with afs.open_input_file(path) as f:
            num_rows = pq.ParquetFile(f).metadata.num_rows
        if num_rows:
            tasks.append({"file": uri, "rows": min(num_rows, left)})
            left -= tasks[-1]["rows"]
        if left <= 0:
            break
    return tasks


def _error_row(source: str, reason: str) -> dict:
    row = new_row(stable_id(source), source, None, None)
    mark_error(row, READ_STAGE, reason)
    return row


def _parquet_rows(
    batch: pa.RecordBatch, start: int, file_uri: str, cfg: InputConfig, get_bytes
) -> list[dict]:
    rows = []
    for offset, record in enumerate(batch.to_pylist()):
        source = f"{file_uri}#{start + offset}"
        row_id = str(record[cfg.id_column]) if cfg.id_column else stable_id(source)
        label = record[cfg.label_column] if cfg.label_column else None
        data = get_bytes(record[cfg.image_column])
        row = new_row(row_id, source, None if label is None else str(label), data)
        if data is None:
            mark_error(row, READ_STAGE, "no image bytes")
        rows.append(row)
    return rows


def _read_parquet_file(
    task: dict, cfg: InputConfig, storage: StorageConfig, batch_size: int
) -> Iterator[pa.Table]:
    """Stream one Parquet file as working-row tables; a file that fails mid-way ends with an error row."""
    import pyarrow.parquet as pq

    file_uri, cap = task["file"], task["rows"]
    columns = list(dict.fromkeys(c for c in (cfg.image_column, cfg.id_column, cfg.label_column) if c))
    done = 0
    try:
        afs, path = arrow_filesystem(file_uri, storage)
        with afs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            image_type = parquet.schema_arrow.field(cfg.image_column).type
            get_bytes = _image_bytes_getter(image_type, cfg.image_column, file_uri)
            for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
                if cap is not None:
                    batch = batch.slice(0, cap - done)
                yield rows_to_table(_parquet_rows(batch, done, file_uri, cfg, get_bytes))
                done += batch.num_rows
                if cap is not None and done >= cap:
                    return
    except Exception as e:  # unreadable or corrupt file: one error row where reading stopped
        logger.warning("cannot read %s at row %d: %s", file_uri, done, type(e).__name__)
        yield rows_to_table([_error_row(f"{file_uri}#{done}", _read_reason(e))])


def _read_parquet_batch(
    batch: pa.Table, cfg: InputConfig, storage: StorageConfig, batch_size: int
) -> Iterator[pa.Table]:
    for task in batch.to_pylist():
        yield from _read_parquet_file(task, cfg, storage, batch_size)


# ---------------------------------------------------------------- entry point


def read_source(input: InputConfig, storage: StorageConfig, resources: Resources) -> ray.data.Dataset:
    """A lazy Ray Dataset of working rows for ``input`` (see the module docstring).

    Raises :class:`InputError` before any Ray work (or import) when the input is missing, empty or
    inconsistent.
    """
    if input.format == "parquet":
        tasks = _parquet_tasks(input, storage)
        logger.info("reading %d parquet file(s) from %s", len(tasks), input.uri)
        return _from_items(tasks, len(tasks)).map_batches(
            _read_parquet_batch,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"cfg": input, "storage": storage, "batch_size": resources.batch_size},
            **resources.ray_remote_args(),
        )
    manifest = build_manifest(input, storage)
    logger.info("reading %d image(s) from %s (%s)", len(manifest), input.uri, input.format)
    return _from_items(manifest).map_batches(
        _fetch_batch,
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        fn_kwargs={"storage": storage},
        udf_modifying_row_count=False,
        **resources.ray_remote_args(),
    )


def _from_items(items: list[dict[str, Any]], num_blocks: int | None = None) -> ray.data.Dataset:
    import ray.data

    return ray.data.from_items(items, override_num_blocks=num_blocks)
