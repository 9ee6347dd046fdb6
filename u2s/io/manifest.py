"""Manifests: lists of image URIs that owners of huge buckets already have, read as streams of tables.

A manifest is one file, a folder of files, or an S3 Inventory ``manifest.json`` (:func:`manifest_files`
lists its data files, so each can be read by its own task). Each file is Parquet, ORC, CSV or JSON Lines
(CSV and JSON Lines may be compressed, e.g. ``.csv.gz``). Rows name their image either by a URI column
(``s3://…``, an absolute path, or a path relative to the manifest file's folder) or, like S3 Inventory,
by ``bucket`` and ``key`` columns. :func:`iter_manifest` reads one file in tables of at most
``batch_size`` rows, so memory is bounded by the batch and the reader's block, never by the file.

S3 Inventory (https://docs.aws.amazon.com/AmazonS3/latest/userguide/storage-inventory.html) lists every
object of a bucket: folder placeholders, non-current versions, delete markers and objects whose suffix
is not an image's are skipped (and counted); CSV inventories URL-encode their keys, which are decoded.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_plus

import pyarrow as pa

from u2s.config import InputConfig, StorageConfig
from u2s.io.errors import InputError
from u2s.io.storage import (
    LOCAL_SCHEMES,
    S3_SCHEMES,
    arrow_filesystem,
    filesystem,
    split_uri,
    to_uri,
    uri_join,
)

ManifestFormat = Literal["parquet", "orc", "csv", "jsonl"]

#: Data file suffixes; CSV and JSON Lines may also end in a compression suffix fsspec infers.
FORMATS: dict[str, ManifestFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".orc": "orc",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
INVENTORY_MANIFEST = "manifest.json"
#: Bytes per block of the streaming CSV reader (its batches hold about this much text).
CSV_BLOCK_SIZE = 1 << 20
#: Read buffer of Parquet column chunks: pages are read through it instead of whole row groups up front.
PARQUET_BUFFER_SIZE = 4 << 20
_REMOTE_BLOCK_SIZE = 8 * 2**20


@dataclass(frozen=True)
class ManifestColumns:
    """Which columns of a manifest hold what (see the ``manifest_*`` fields of ``InputConfig``)."""

    uri: str = "uri"
    id: str | None = None
    label: str | None = None
    names: tuple[str, ...] | None = None
    """Column names of headerless CSV files, in order; None: a CSV's first line is its header."""
    extensions: tuple[str, ...] = ()
    """Suffixes (lower case, with the dot) of the objects of a bucket/key listing that are images."""

    @classmethod
    def from_config(cls, cfg: InputConfig) -> ManifestColumns:
        names = tuple(cfg.manifest_columns) if cfg.manifest_columns else None
        extensions = tuple((e if e.startswith(".") else f".{e}").lower() for e in cfg.extensions)
        return cls(cfg.manifest_uri_column, cfg.id_column, cfg.label_column, names, extensions)


@dataclass(frozen=True)
class ManifestFile:
    """One data file of a manifest."""

    uri: str
    format: ManifestFormat
    names: tuple[str, ...] | None = None
    """Column names of a headerless CSV (an S3 Inventory's ``fileSchema``); None: from the config."""
    url_encoded_keys: bool = False
    """The ``key`` column is URL-encoded (S3 Inventory CSV)."""


# ------------------------------------------------------------------------------------------ listing


def manifest_format(uri: str) -> ManifestFormat:
    """The format of a manifest data file, from its suffix (``.csv.gz`` → csv)."""
    name = posixpath.basename(split_uri(uri)[1]).lower()
    stem, suffix = posixpath.splitext(name)
    if suffix in COMPRESSIONS:
        stem, suffix = posixpath.splitext(stem)
        if FORMATS.get(suffix) in ("csv", "jsonl"):
            return FORMATS[suffix]
    elif suffix in FORMATS:
        return FORMATS[suffix]
    raise InputError(
        f"not a manifest file: {uri} (expected {', '.join(FORMATS)}; CSV and JSON Lines may be compressed)"
    )


def _is_data_file(path: str, root: str) -> bool:
    """A manifest data file under ``root``, not hidden (``.x``) nor a by-product (``_SUCCESS``, ``_tmp/``)."""
    if any(part.startswith((".", "_")) for part in posixpath.relpath(path, root).split("/")):
        return False
    try:
        manifest_format(path)
    except InputError:
        return False
    return True


def manifest_files(uri: str, storage: StorageConfig) -> list[ManifestFile]:
    """The data files of the manifest at ``uri``, sorted: one file, every data file under a folder
    (recursively; hidden and ``_``-prefixed names skipped), or the files an S3 Inventory
    ``manifest.json`` lists (a folder holding a ``manifest.json`` counts as that inventory)."""
    fs, path = filesystem(uri, storage)
    fs.invalidate_cache(path)  # a long-lived process must see the current listing
    if not fs.exists(path):
        raise InputError(f"manifest not found: {uri}")
    if fs.isdir(path):
        inventory = posixpath.join(path, INVENTORY_MANIFEST)
        if fs.isfile(inventory):
            return _inventory_files(to_uri(fs, inventory), storage)
        files = [
            ManifestFile(to_uri(fs, p), manifest_format(p))
            for p in sorted(fs.find(path))
            if _is_data_file(p, path)
        ]
        if not files:
            raise InputError(
                f"no manifest files in {uri} (expected {', '.join(FORMATS)}, optionally compressed)"
            )
        return files
    if posixpath.basename(path) == INVENTORY_MANIFEST:
        return _inventory_files(uri, storage)
    return [ManifestFile(to_uri(fs, path), manifest_format(path))]


def _inventory_files(uri: str, storage: StorageConfig) -> list[ManifestFile]:
    """The data files of an S3 Inventory ``manifest.json``.

    AWS writes ``{prefix}/{source bucket}/{config}/{date}/manifest.json`` and lists data files by key
    as ``{prefix}/{source bucket}/{config}/data/{name}``; they are resolved next to the manifest's date
    folder, which is where AWS puts them and still holds for an inventory copied elsewhere (or locally).
    """
    fs, path = filesystem(uri, storage)
    try:
        doc = json.loads(fs.cat_file(path))
        file_format = str(doc["fileFormat"]).lower()
        keys = [str(entry["key"]) for entry in doc["files"]]
        schema = doc.get("fileSchema")
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"not an S3 Inventory manifest: {uri} ({type(e).__name__})") from None
    if file_format not in ("csv", "orc", "parquet"):
        raise InputError(f"S3 Inventory format {file_format!r} is not CSV, ORC or Parquet: {uri}")
    names = None
    if file_format == "csv":
        if not isinstance(schema, str) or not schema.strip():
            raise InputError(f"S3 Inventory manifest without a CSV fileSchema: {uri}")
        names = tuple(name.strip() for name in schema.split(","))
    config_root = posixpath.dirname(posixpath.dirname(uri.rstrip("/")))
    files = []
    for key in keys:
        at = f"/{key}".rfind("/data/")
        if at < 0:
            raise InputError(f"S3 Inventory data file outside a data/ folder in {uri}")
        data_uri = uri_join(config_root, key[at:])
        files.append(ManifestFile(data_uri, file_format, names, url_encoded_keys=file_format == "csv"))
    return sorted(files, key=lambda f: f.uri)


# ------------------------------------------------------------------------------------------ reading


def iter_manifest(
    file: ManifestFile | str,
    storage: StorageConfig,
    columns: ManifestColumns,
    batch_size: int,
    skipped: Counter[str] | None = None,
) -> Iterator[pa.Table]:
    """Tables of at most ``batch_size`` rows for one manifest data file, in file order.

    Each table has a ``source`` column (``s3://bucket/key``, or an absolute local path), and ``id`` and
    ``label`` columns (strings; an empty label is null) when ``columns`` names them. Rows of a bucket/key
    listing that are not current images are left out and counted in ``skipped`` (``folder``,
    ``not_latest``, ``delete_marker``, ``extension``). Raises :class:`~u2s.io.errors.InputError` for a
    missing file or column, an empty URI or id, or an unsupported URI scheme (naming the row, never its
    content).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if isinstance(file, str):
        file = ManifestFile(file, manifest_format(file))
    skipped = Counter() if skipped is None else skipped
    # A headerless CSV with bucket/key columns named in the config is an S3 Inventory data file too.
    decode_keys = file.url_encoded_keys or (file.format == "csv" and not file.names and bool(columns.names))
    folder, row = _folder(file.uri), 0
    try:
        for table in _read(file, storage, columns, batch_size):
            out = _resolve(table, row, file, folder, columns, decode_keys, skipped)
            row += table.num_rows
            if out.num_rows:
                yield out
    except FileNotFoundError:
        raise InputError(f"manifest file not found: {file.uri}") from None
    except pa.ArrowInvalid as e:  # not a Parquet/ORC file, a CSV row with the wrong number of fields...
        raise InputError(f"cannot read manifest {file.uri} ({type(e).__name__})") from None


def _read(file: ManifestFile, storage: StorageConfig, columns: ManifestColumns, batch_size: int):
    """Raw tables (only the columns that matter, all read) of at most ``batch_size`` rows."""
    reader = {"parquet": _read_parquet, "orc": _read_orc, "csv": _read_csv, "jsonl": _read_jsonl}[file.format]
    for table in reader(file, storage, columns, batch_size):
        for start in range(0, table.num_rows, batch_size):
            yield table.slice(start, batch_size)


def _normal(name: str) -> str:
    return name.lower().replace("_", "")


def _wanted(names: list[str], file: ManifestFile, columns: ManifestColumns) -> dict[str, str]:
    """Role → column name in the file: ``bucket``/``key`` (+ ``islatest``/``isdeletemarker``) when the
    file has both bucket and key columns, else ``uri``; plus ``id`` and ``label`` when configured."""
    by_normal = {_normal(name): name for name in names}
    if "bucket" in by_normal and "key" in by_normal and columns.uri not in names:
        roles = {
            role: by_normal[role]
            for role in ("bucket", "key", "islatest", "isdeletemarker")
            if role in by_normal
        }
    else:
        roles = {"uri": columns.uri}
    roles |= {role: column for role, column in (("id", columns.id), ("label", columns.label)) if column}
    missing = [column for column in roles.values() if column not in names]
    if missing:
        raise InputError(f"column {missing[0]!r} not in manifest {file.uri} (columns: {', '.join(names)})")
    return roles


def _renamed(table: pa.Table, roles: dict[str, str]) -> pa.Table:
    return pa.table({role: table.column(name) for role, name in roles.items()})


def _read_parquet(file, storage, columns, batch_size):
    import pyarrow.parquet as pq

    afs, path = arrow_filesystem(file.uri, storage)
    with afs.open_input_file(path) as f:
        # pre_buffer (pyarrow's default) reads whole row groups ahead: measured, memory then grows with the
        # file; a buffered stream reads page by page and stays flat.
        parquet = pq.ParquetFile(f, buffer_size=PARQUET_BUFFER_SIZE, pre_buffer=False)
        roles = _wanted(parquet.schema_arrow.names, file, columns)
        for batch in parquet.iter_batches(batch_size=batch_size, columns=list(dict.fromkeys(roles.values()))):
            yield _renamed(pa.Table.from_batches([batch]), roles)


def _read_orc(file, storage, columns, batch_size):
    """Stripe by stripe (ORC's unit of reading, 64 MiB by default as AWS writes them)."""
    import pyarrow.orc as orc

    afs, path = arrow_filesystem(file.uri, storage)
    with afs.open_input_file(path) as f:
        reader = orc.ORCFile(f)
        roles = _wanted(reader.schema.names, file, columns)
        for stripe in range(reader.nstripes):
            batch = reader.read_stripe(stripe, columns=list(dict.fromkeys(roles.values())))
            yield _renamed(pa.Table.from_batches([batch]), roles)


def _open_text(file: ManifestFile, storage: StorageConfig):
    fs, path = filesystem(file.uri, storage)
    return fs.open(path, "rb", block_size=_REMOTE_BLOCK_SIZE, compression="infer")


def _csv_header(stream) -> list[str]:
    """The first record of a CSV (its header), read with the csv module; the stream is rewound."""
    line = codecs.getreader("utf-8-sig")(stream).readline()
    stream.seek(0)
    return next(csv.reader([line]), [])


def _read_csv(file, storage, columns, batch_size):
    import pyarrow.csv as pcsv

    names = file.names or columns.names
    with _open_text(file, storage) as stream:
        header = list(names) if names else _csv_header(stream)
        roles = _wanted(header, file, columns)
        read = pcsv.ReadOptions(
            use_threads=False,  # parallelism comes from one task per file; threads would read blocks ahead
            column_names=list(names) if names else None,
            block_size=CSV_BLOCK_SIZE,
        )
        convert = pcsv.ConvertOptions(
            column_types={name: pa.string() for name in roles.values()},
            include_columns=list(dict.fromkeys(roles.values())),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        for batch in pcsv.open_csv(stream, read_options=read, convert_options=convert):
            yield _renamed(pa.Table.from_batches([batch]), roles)


def _read_jsonl(file, storage, columns, batch_size):
    """Line by line (Python's json): a JSON Lines row may hold any JSON type, which Arrow's block-wise
    type inference would reject when a later block differs."""
    roles: dict[str, str] | None = None
    rows: list[dict[str, Any]] = []
    with _open_text(file, storage) as stream:
        for number, line in enumerate(stream):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise InputError(f"line {number + 1} of manifest {file.uri} is not JSON") from None
            if not isinstance(record, dict):
                raise InputError(f"line {number + 1} of manifest {file.uri} is not a JSON object")
            if roles is None:
                roles = _wanted(list(record), file, columns)
            rows.append({role: _text(record.get(name)) for role, name in roles.items()})
            if len(rows) == batch_size:
                yield pa.Table.from_pylist(rows, schema=_string_schema(roles))
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=_string_schema(roles))


def _text(value: Any) -> str | None:
    """A JSON value as the string Arrow would cast it to (``true`` → ``"true"``, ``7`` → ``"7"``)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, bool | dict | list) else str(value)


def _string_schema(roles: dict[str, str]) -> pa.Schema:
    return pa.schema([(role, pa.string()) for role in roles])


# ------------------------------------------------------------------------------------------ sources


def _strings(table: pa.Table, role: str) -> list[str | None]:
    import pyarrow.compute as pc

    column = table.column(role)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        column = pc.cast(column, pa.string())
    return column.to_pylist()


def _resolve(
    table: pa.Table,
    first_row: int,
    file: ManifestFile,
    folder: str,
    columns: ManifestColumns,
    decode_keys: bool,
    skipped: Counter,
) -> pa.Table:
    """Raw manifest rows → ``source`` (+ ``id``, ``label``), listing-only rows dropped."""
    if "bucket" in table.column_names:
        keep, sources = _inventory_sources(table, first_row, file, columns, decode_keys, skipped)
    else:
        uris = _strings(table, "uri")
        keep = list(range(table.num_rows))
        sources = [_uri_source(uri, first_row + i, file, folder) for i, uri in enumerate(uris)]
    out = {"source": pa.array(sources, pa.string())}
    if columns.id:
        ids = _strings(table, "id")
        ids = [ids[i] for i in keep]
        empty = next((n for n, value in zip(keep, ids, strict=True) if not value), None)
        if empty is not None:
            raise InputError(f"row {first_row + empty + 1} of manifest {file.uri} has an empty id")
        out["id"] = pa.array(ids, pa.string())
    if columns.label:
        labels = _strings(table, "label")
        out["label"] = pa.array([labels[i] or None for i in keep], pa.string())  # CSV has no null but ""
    return pa.table(out)


def _uri_source(uri: str | None, row: int, file: ManifestFile, folder: str) -> str:
    """A manifest's image URI as a full URI: s3:// kept, local and relative paths made absolute."""
    scheme, rest = split_uri((uri or "").strip())
    if not rest.strip("/"):
        raise InputError(f"row {row + 1} of manifest {file.uri} has an empty image URI")
    if scheme in S3_SCHEMES:
        return f"s3://{rest}"
    if scheme not in LOCAL_SCHEMES:
        raise InputError(
            f"row {row + 1} of manifest {file.uri}: URI scheme {scheme!r} is not s3:// or a path"
        )
    if posixpath.isabs(rest):
        return os.path.normpath(rest)
    if split_uri(folder)[0]:  # relative to a manifest in object storage
        return uri_join(folder, rest)
    return os.path.normpath(os.path.join(folder, rest))


def _folder(uri: str) -> str:
    """The folder of a manifest file: ``s3://bucket/prefix``, or an absolute local path."""
    scheme, rest = split_uri(uri)
    if scheme in LOCAL_SCHEMES:
        return os.path.dirname(os.path.abspath(os.path.expanduser(rest)))
    return uri.rsplit("/", 1)[0]


def _inventory_sources(
    table: pa.Table,
    first_row: int,
    file: ManifestFile,
    columns: ManifestColumns,
    decode_keys: bool,
    skipped: Counter,
) -> tuple[list[int], list[str]]:
    """Rows of a bucket/key listing that are current images, and their ``s3://bucket/key``."""
    buckets, keys = _strings(table, "bucket"), _strings(table, "key")
    latest = _strings(table, "islatest") if "islatest" in table.column_names else None
    deleted = _strings(table, "isdeletemarker") if "isdeletemarker" in table.column_names else None
    keep, sources = [], []
    for i, (bucket, key) in enumerate(zip(buckets, keys, strict=True)):
        if not bucket or not key:
            raise InputError(f"row {first_row + i + 1} of manifest {file.uri} has an empty bucket or key")
        if decode_keys:
            key = unquote_plus(key)
        reason = None
        if key.endswith("/"):
            reason = "folder"
        elif latest is not None and (latest[i] or "").lower() == "false":
            reason = "not_latest"
        elif deleted is not None and (deleted[i] or "").lower() == "true":
            reason = "delete_marker"
        elif columns.extensions and posixpath.splitext(key)[1].lower() not in columns.extensions:
            reason = "extension"
        if reason:
            skipped[reason] += 1
            continue
        keep.append(i)
        sources.append(f"s3://{bucket}/{key}")
    return keep, sources
