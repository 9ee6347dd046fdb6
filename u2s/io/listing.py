"""Input listing off the driver: Ray tasks turn a source into a manifest of ``(id, source, label)`` rows.

The driver only splits the source into *shards* (a folder's root, Parquet files, manifest files, the
COCO annotation file) and collects, per shard, object references to its manifest tables and a few
counts. Each shard is listed by a Ray task (a key range of an S3 prefix or one local directory, a
Parquet footer and id column, a streamed COCO JSON, a manifest file), so the driver's memory does not
grow with the number of images. Folder listings fan out (:mod:`u2s.io.fanout`): a task lists at most
``fanout.SHARD_ROWS`` files and returns the rest of its key range, or its subdirectories, as new
shards, so a flat prefix of millions of keys is listed by many tasks at once. Before any model runs,
rows listed twice (the same id and source) are dropped and counted, and one id for different sources
is refused (:mod:`u2s.io.duplicates`). The manifest tables stay in Ray's object store and become the
plan's first dataset (``ray.data.from_arrow_refs``); the bytes are fetched later, by
:mod:`u2s.io.readers`, after rows that a resumed run already finished have been dropped.

Ids are made as ``input.id`` says (:mod:`u2s.io.ids`): keyed hashes of the sources by default, whose key
reaches the listing tasks as an argument. Each shard also returns an order-independent fingerprint of
its ``(id, source)`` pairs; their sum is the input's fingerprint, which the run record keeps so that
``--resume`` refuses a changed input (the same key gives the same ids, hence the same fingerprint).
"""

from __future__ import annotations

import itertools
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from u2s.config import InputConfig, Resources, StorageConfig
from u2s.io.errors import InputError
from u2s.io.ids import IdKey, id_function, source_hash
from u2s.io.storage import TransientStorageError, arrow_filesystem, filesystem, is_transient, to_uri
from u2s.io.tables import MASK64, Shard, ShardStats, image_bytes_getter
from u2s.io.tables import fingerprint as _fingerprint
from u2s.io.tables import manifest_table as _table

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import fsspec
    import ray
    import ray.data

logger = logging.getLogger(__name__)


def stable_id(text: str) -> str:
    """The unkeyed row id of a string (``input.id: source_hash``): the first 20 hex chars of its SHA-1."""
    return source_hash(text)


@dataclass
class Listing:
    """The input's manifest, as a Ray Dataset of :data:`MANIFEST_SCHEMA` rows, and what listing found."""

    dataset: ray.data.Dataset
    rows: int
    fingerprint: str
    skipped_extensions: dict[str, int]
    unreadable_files: int
    unreadable_records: int
    shards: int
    duplicates_dropped: int = 0  # rows listed again with the same id and source
    stage1_from: Any = None  # input.stage1_from: the earlier run read (a u2s.io.stage1_from.SourceRun)

    def stats(self) -> dict[str, Any]:
        """Counts for the run record (no paths)."""
        return {
            "rows": self.rows, "shards": self.shards, "skipped_extensions": self.skipped_extensions,
            "unreadable_files": self.unreadable_files, "unreadable_records": self.unreadable_records,
            "duplicates_dropped": self.duplicates_dropped,
        }  # fmt: skip


# ---------------------------------------------------------------- driver: shards


def _suffixes(extensions: list[str]) -> set[str]:
    return {(e if e.startswith(".") else f".{e}").lower() for e in extensions}


def plan_shards(input: InputConfig, storage: StorageConfig) -> list[Shard]:
    """Split the source into listing shards (cheap: one directory level, or the Parquet file names)."""
    fs, root = filesystem(input.uri, storage)
    fs.invalidate_cache(root)
    if input.format == "coco":
        assert input.coco_annotations  # enforced by InputConfig
        if not fs.exists(root):
            raise InputError(f"input not found: {input.uri}")
        return [Shard("coco", input.coco_annotations)]
    if input.format == "manifest":
        from u2s.io.manifest import manifest_files

        return [Shard("manifest", file.uri, manifest=file) for file in manifest_files(input.uri, storage)]
    if not fs.exists(root):
        raise InputError(f"input not found: {input.uri}")
    if input.format == "webdataset":
        from u2s.io.webdataset import tar_shards

        shards = [Shard("webdataset", uri) for uri in tar_shards(fs, root)]
        if not shards:
            raise InputError(f"no .tar shards found in {input.uri}")
        return shards
    if input.format == "parquet":
        skip = (".", "_")  # _SUCCESS, _common_metadata
        paths = fs.find(root) if fs.isdir(root) else [root]
        files = sorted(p for p in paths if p.endswith(".parquet") and not _is_hidden(p, root, skip))
        if not files:
            raise InputError(f"no .parquet files found in {input.uri}")
        return [Shard("parquet", to_uri(fs, path)) for path in files]
    if fs.info(root)["type"] != "directory":  # bounded: a stat, or one S3 request of one key
        return [Shard("files", input.uri, (to_uri(fs, root),))]
    # Nothing listed here: the root's tasks fan out (u2s.io.fanout).
    return [Shard("range" if _is_s3(fs) else "dir", to_uri(fs, root))]


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "s3" in protocols


def top_folders(input: InputConfig, storage: StorageConfig, max_entries: int = 10_000) -> list[str] | None:
    """Names of the root's subfolders (not hidden), or ``None`` when the root has more than
    ``max_entries`` entries (then it is not read further; the driver never lists a whole prefix)."""
    fs, root = filesystem(input.uri, storage)
    if not _is_s3(fs):
        if not fs.isdir(root):
            return []
        with os.scandir(root) as it:
            entries = list(itertools.islice(it, max_entries + 1))
        if len(entries) > max_entries:
            return None
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    bucket, _, key = root.partition("/")
    request = {"Bucket": bucket, "Prefix": f"{key}/" if key else "", "Delimiter": "/"}
    names, seen = [], 0
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        seen += len(page.get("Contents", ())) + len(page.get("CommonPrefixes", ()))
        if seen > max_entries:
            return None
        names += [p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in page.get("CommonPrefixes", ())]
        if not page.get("IsTruncated"):
            return sorted(n for n in names if not n.startswith("."))
        request["ContinuationToken"] = page["NextContinuationToken"]


def _is_hidden(path: str, root: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a component of ``path`` below ``root`` starts with one of ``prefixes`` (``._x.jpg``)."""
    head = root.rstrip("/") + "/"
    if path.startswith(head):  # the common case, without relpath's normalising (a listing's hot loop)
        relative = path[len(head) :]
    else:
        relative = posixpath.relpath(path, root) if path != root else posixpath.basename(path)
    return any(part.startswith(prefixes) for part in relative.split("/"))


# ---------------------------------------------------------------- tasks: one shard each


def _image_files(
    fs: fsspec.AbstractFileSystem, paths: list[str], root: str, suffixes: set[str], stats: ShardStats
) -> list[str]:
    kept = []
    for path in paths:
        if _is_hidden(path, root, (".",)):
            continue
        suffix = posixpath.splitext(path)[1].lower()
        if suffix in suffixes:
            kept.append(path)
        else:
            key = suffix or "(none)"
            stats.skipped_extensions[key] = stats.skipped_extensions.get(key, 0) + 1
    return sorted(kept)


def _list_folder_shard(
    shard: Shard, input: InputConfig, storage: StorageConfig, stats: ShardStats, make_id: Callable[[str], str]
) -> pa.Table:
    fs, root = filesystem(input.uri, storage)
    if shard.kind == "folder":
        _, prefix = filesystem(shard.uri, storage)
        paths = fs.find(prefix)
    else:
        paths = [filesystem(uri, storage)[1] for uri in shard.files]
    root = root if fs.isdir(root) else posixpath.dirname(root)
    paths = _image_files(fs, paths, root, _suffixes(input.extensions), stats)
    sources = [to_uri(fs, path) for path in paths]
    labels = (
        [posixpath.basename(posixpath.dirname(path)) for path in paths]
        if input.format == "class_folders"
        else [None] * len(paths)
    )
    return _table([make_id(source) for source in sources], sources, labels)


def _folder_table(
    fs: fsspec.AbstractFileSystem,
    paths: list[str],
    root: str,
    input: InputConfig,
    stats: ShardStats,
    make_id: Callable[[str], str],
) -> pa.Table:
    paths = _image_files(fs, paths, root, _suffixes(input.extensions), stats)
    # Local paths here are absolute and normal (os.scandir of a normal path); S3 ones are bucket/key.
    sources = [f"s3://{path}" for path in paths] if _is_s3(fs) else paths
    labels = (
        [posixpath.basename(posixpath.dirname(path)) for path in paths]
        if input.format == "class_folders"
        else [None] * len(paths)
    )
    return _table([make_id(source) for source in sources], sources, labels)


def _list_tree_shard(
    shard: Shard,
    input: InputConfig,
    storage: StorageConfig,
    stats: ShardStats,
    make_id: Callable[[str], str],
    shard_rows: int,
) -> Iterator[pa.Table]:
    """The tables of a dir or range shard (sorted, at most ``shard_rows`` files listed for each); what
    is left to list goes to ``stats.children``."""
    from u2s.io import fanout

    fs, root = filesystem(input.uri, storage)
    if shard.kind == "dir":
        files, dirs = fanout.scan_local_dir(filesystem(shard.uri, storage)[1])
        for start in range(0, max(len(files), 1), shard_rows):
            yield _folder_table(fs, files[start : start + shard_rows], root, input, stats, make_id)
        stats.children = [Shard("dir", to_uri(fs, path)) for path in dirs]
        return
    bucket, _, key = root.partition("/")
    prefix = f"{key}/" if key else ""
    keys, more = fanout.list_s3_range(fs, bucket, prefix, shard.after, shard.upto, shard_rows)
    yield _folder_table(fs, [f"{bucket}/{k}" for k in keys], root, input, stats, make_id)
    if more:
        cuts = [keys[-1], *fanout.split_points(keys[0], keys[-1], shard.upto, len(prefix)), shard.upto]
        stats.children = [Shard("range", shard.uri, after=lo, upto=hi) for lo, hi in itertools.pairwise(cuts)]


def _list_coco_shard(
    shard: Shard, input: InputConfig, storage: StorageConfig, make_id: Callable[[str], str]
) -> pa.Table:
    from u2s.io.coco import iter_coco_images

    fs, root = filesystem(input.uri, storage)
    label = posixpath.basename(root.rstrip("/"))
    ids, sources = [], []
    for image_id, file_name in iter_coco_images(shard.uri, storage):
        source = to_uri(fs, posixpath.join(root, file_name.lstrip("/")))
        ids.append(image_id if input.id == "column" else make_id(source))  # column: the COCO image id
        sources.append(source)
    table = _table(ids, sources, [label] * len(ids))
    return table.sort_by("source")


def _list_parquet_shard(
    shard: Shard, input: InputConfig, storage: StorageConfig, stats: ShardStats, make_id: Callable[[str], str]
) -> pa.Table:
    """One record per row of the file: ids and labels from their columns (only those are read)."""
    import pyarrow.parquet as pq

    file_uri = shard.uri
    afs, path = arrow_filesystem(file_uri, storage)
    try:
        with afs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            num_rows = parquet.metadata.num_rows
            schema = parquet.schema_arrow
    except Exception as e:  # no readable footer: the number of records is unknown
        stats.unreadable_files += 1
        logger.warning(
            "cannot read a parquet footer (%s); the file counts as one error row", type(e).__name__
        )
        return _table(
            [make_id(file_uri)], [file_uri], [None], errors=[f"read: unreadable file ({type(e).__name__})"]
        )
    sources = [f"{file_uri}#{i}" for i in range(num_rows)]
    columns = [c for c in (input.id_column, input.label_column) if c]
    from u2s.io import img2dataset

    image_column = img2dataset.image_column(schema.names, input.image_column)
    missing = [c for c in (image_column, *columns) if c not in schema.names]
    if missing:
        raise InputError(f"column {missing[0]!r} not in {file_uri} (columns: {', '.join(schema.names)})")

    image_bytes_getter(schema.field(image_column).type, image_column, file_uri)  # type check
    ids = [make_id(source) for source in sources]
    labels: list[str | None] = [None] * num_rows
    error = None
    if columns:
        try:
            with afs.open_input_file(path) as f:
                values = pq.ParquetFile(f).read(columns=columns)
            if input.id_column:
                ids = [None if v is None else str(v) for v in values.column(input.id_column).to_pylist()]
            if input.label_column:
                labels = [
                    None if v is None else str(v) for v in values.column(input.label_column).to_pylist()
                ]
        except Exception as e:  # records known from the footer, their ids unreadable: one error row each
            error = f"read: unreadable id/label columns ({type(e).__name__})"
            stats.unreadable_records += num_rows
            ids = [make_id(source) for source in sources]
    missing_ids = [i for i, row_id in enumerate(ids) if row_id is None]
    if missing_ids:
        raise InputError(f"{len(missing_ids)} null id(s) in column {input.id_column!r} of {file_uri}")
    errors = [error] * num_rows
    if error is None and img2dataset.has_statuses(schema.names):  # img2dataset: failed downloads
        statuses = img2dataset.read_statuses(file_uri, storage)
        errors = [None if e is None else f"read: {e}" for e in img2dataset.download_errors(statuses)]
    return _table(
        ids, sources, labels, parts=[file_uri] * num_rows, rows=list(range(num_rows)), errors=errors
    )  # fmt: skip


def _list_manifest_shard(
    shard: Shard, input: InputConfig, storage: StorageConfig, stats: ShardStats, make_id: Callable[[str], str]
) -> pa.Table:
    from u2s.io.manifest import ManifestColumns, iter_manifest

    tables, skipped = [], Counter()
    columns = ManifestColumns.from_config(input)
    for batch in iter_manifest(shard.manifest, storage, columns, batch_size=65536, skipped=skipped):
        sources = batch.column("source").to_pylist()
        ids = (
            [str(v) for v in batch.column("id").to_pylist()]
            if "id" in batch.schema.names
            else [make_id(s) for s in sources]
        )
        labels = batch.column("label").to_pylist() if "label" in batch.schema.names else [None] * len(ids)
        tables.append(_table(ids, sources, [None if v is None else str(v) for v in labels]))
    stats.skipped_extensions.update({f"manifest: {reason}": n for reason, n in skipped.items()})
    return pa.concat_tables(tables) if tables else _table([], [], [])


def list_shard(
    shard: Shard, input: InputConfig, storage: StorageConfig, id_key: IdKey | None = None
) -> tuple[pa.Table, ShardStats]:
    """The manifest table of one shard (in source order) and its stats; runs in a Ray task.

    ``id_key``: the output's id key (``input.id: keyed``; see :mod:`u2s.io.ids`).
    """
    stats = ShardStats()
    make_id = id_function(input, id_key)
    if shard.kind in ("folder", "files"):
        table = _list_folder_shard(shard, input, storage, stats, make_id)
    elif shard.kind == "parquet":
        table = _list_parquet_shard(shard, input, storage, stats, make_id)
    elif shard.kind == "coco":
        table = _list_coco_shard(shard, input, storage, make_id)
    elif shard.kind == "manifest":
        table = _list_manifest_shard(shard, input, storage, stats, make_id)
    elif shard.kind == "webdataset":
        from u2s.io.webdataset import list_tar_shard

        table = list_tar_shard(shard.uri, input, storage, stats, make_id)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")
    stats.rows = table.num_rows
    stats.fingerprint = _fingerprint(table.column("id").to_pylist(), table.column("source").to_pylist())
    return table, stats


def iter_shard(
    shard: Shard,
    input: InputConfig,
    storage: StorageConfig,
    id_key: IdKey | None = None,
    shard_rows: int | None = None,
) -> Iterator[pa.Table | ShardStats]:
    """The manifest tables of one shard, then its stats (with the shards it leaves to new tasks)."""
    if shard.kind not in ("dir", "range"):
        table, stats = list_shard(shard, input, storage, id_key)
        yield table
        yield stats
        return
    from u2s.io import fanout

    stats = ShardStats()
    make_id = id_function(input, id_key)
    for table in _list_tree_shard(shard, input, storage, stats, make_id, shard_rows or fanout.SHARD_ROWS):
        print_ = _fingerprint(table.column("id").to_pylist(), table.column("source").to_pylist())
        stats.tables.append((table.num_rows, print_))
        stats.rows += table.num_rows
        stats.fingerprint = (stats.fingerprint + print_) & MASK64
        yield table
    yield stats


def _list_shard_task(
    shard: Shard, input: InputConfig, storage: StorageConfig, id_key: IdKey | None, shard_rows: int
) -> Iterator[pa.Table | ShardStats]:
    """:func:`iter_shard` in a Ray task (a streaming generator: its tables are owned by the driver)."""
    try:
        yield from iter_shard(shard, input, storage, id_key, shard_rows)
    except Exception as e:
        if is_transient(e):  # Ray re-runs the task (storage.task_retries)
            raise TransientStorageError(type(e).__name__) from None
        raise


def _head(table: pa.Table, n: int) -> tuple[pa.Table, int]:
    head = table.slice(0, n)
    return head, _fingerprint(head.column("id").to_pylist(), head.column("source").to_pylist())


# ---------------------------------------------------------------- driver: the listing


def list_input(
    input: InputConfig, storage: StorageConfig, resources: Resources, id_key: IdKey | None = None
) -> Listing:
    """List ``input`` in Ray tasks (one per shard, and one per shard a folder's tasks leave); the driver
    keeps only references and counts.

    ``id_key``: the output's id key, required by ``input.id: keyed`` (:func:`u2s.io.ids.output_id_key`);
    it reaches the tasks as an argument and is never logged. Rows listed again with the same id and
    source are dropped (counted in ``duplicates_dropped``). Raises :class:`InputError` when the input is
    missing or empty, or when one id names different sources (ids are the join and resume key).
    """
    import ray
    import ray.data

    from u2s.io import fanout
    from u2s.io.duplicates import drop_duplicates

    id_function(input, id_key)  # no key for keyed ids: fail here, not in every task

    try:
        parts, stats = _run_shards(plan_shards(input, storage), input, storage, resources, id_key,
                                   fanout.SHARD_ROWS)  # fmt: skip
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, InputError):  # the input's own problem: say it plainly
            raise InputError(str(e.cause)) from None
        raise
    table_refs, counts, fingerprints = [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]
    if input.limit is not None:
        table_refs, counts, fingerprints = _limit(table_refs, counts, fingerprints, input.limit)
    rows = sum(counts)
    if rows == 0:
        where = (
            f"annotations {input.coco_annotations}"
            if input.format == "coco"
            else f"extensions {input.extensions}"
        )
        raise InputError(f"no images found in {input.uri} (format {input.format}, {where})")
    table_refs, counts, fingerprints, dropped, clashes = drop_duplicates(
        table_refs, counts, fingerprints, resources.num_cpus
    )
    if clashes:
        raise InputError(
            f"duplicate row ids in {input.uri} (e.g. {', '.join(clashes)}), each naming different sources; "
            "ids must be unique"
        )
    if dropped:
        logger.info("dropped %d row(s) listed twice (the same id and source)", dropped)
    rows = sum(counts)
    dataset = ray.data.from_arrow_refs(table_refs)
    fingerprint = sum(fingerprints) & MASK64  # of the rows kept: what the written tables must hold
    skipped: Counter[str] = Counter()
    for s in stats:
        skipped.update(s.skipped_extensions)
    if skipped:
        logger.info(
            "skipped %d file(s) by extension (%s); input.extensions selects images",
            sum(skipped.values()), ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())),
        )  # fmt: skip
    return Listing(
        dataset=dataset, rows=rows, fingerprint=f"{rows}:{fingerprint:016x}",
        skipped_extensions=dict(skipped), unreadable_files=sum(s.unreadable_files for s in stats),
        unreadable_records=sum(s.unreadable_records for s in stats), shards=len(table_refs),
        duplicates_dropped=dropped,
    )  # fmt: skip


def _run_shards(
    shards: list[Shard],
    input: InputConfig,
    storage: StorageConfig,
    resources: Resources,
    id_key: IdKey | None,
    shard_rows: int,
) -> tuple[list[tuple[ray.ObjectRef, int, int]], list[ShardStats]]:
    """List ``shards`` and the shards they leave, each in a Ray task as soon as it is known.

    Returns ``(table ref, rows, fingerprint)`` per non-empty table, in a fixed order (shard by shard,
    a shard's tables before the shards it left, these in their order: key order for S3 ranges) whatever
    order the tasks finish in, and every task's stats. The tables stay in the object store.
    """
    import ray

    task = ray.remote(_list_shard_task).options(
        num_returns="streaming", num_cpus=resources.num_cpus, max_retries=storage.task_retries,
        retry_exceptions=[TransientStorageError],
    )  # fmt: skip
    running: dict[ray.ObjectRef, tuple[Any, tuple[int, ...]]] = {}

    def submit(shard: Shard, order: tuple[int, ...]) -> None:
        generator = task.remote(shard, input, storage, id_key, shard_rows)
        running[generator.completed()] = (generator, order)

    for i, shard in enumerate(shards):
        submit(shard, (i,))
    parts: list[tuple[tuple[int, ...], tuple[ray.ObjectRef, int, int]]] = []
    all_stats: list[ShardStats] = []
    while running:
        [done], _ = ray.wait(list(running), num_returns=1)
        generator, order = running.pop(done)
        ray.get(done)  # raises the task's error
        refs = list(generator)
        stats: ShardStats = ray.get(refs[-1])
        all_stats.append(stats)
        sizes = stats.tables or [(stats.rows, stats.fingerprint)]
        for j, (ref, (rows, print_)) in enumerate(zip(refs[:-1], sizes, strict=True)):
            if rows:
                parts.append(((*order, 0, j), (ref, rows, print_)))
        for j, child in enumerate(stats.children):
            submit(child, (*order, 1, j))
        stats.children, stats.tables = [], []
    parts.sort(key=lambda part: part[0])
    return [part for _, part in parts], all_stats


def _limit(
    table_refs: list, counts: list[int], fingerprints: list[int], limit: int
) -> tuple[list, list[int], list[int]]:
    """The first ``limit`` records in listing order: whole shards, then the head of the last one."""
    import ray

    refs, kept_counts, kept_prints, left = [], [], [], limit
    for ref, count, print_ in zip(table_refs, counts, fingerprints, strict=True):
        if left <= 0:
            break
        if count > left:
            head, print_ref = ray.remote(_head).options(num_cpus=0, num_returns=2).remote(ref, left)
            ref, count, print_ = head, left, ray.get(print_ref)
        refs.append(ref)
        kept_counts.append(count)
        kept_prints.append(print_)
        left -= count
    return refs, kept_counts, kept_prints
