"""Readers: a listed source (:mod:`u2s.io.listing`) → a Ray Dataset of working rows, one per image.

Ray tasks fetch the bytes of each manifest row concurrently (``cat_ranges`` on s3fs runs many GETs at
once); Parquet sources are read per row group, only the image column and only the rows still wanted.
Every manifest row yields exactly one working row (:func:`u2s.schema.new_row` layout): an object that
is missing or unreadable yields its row with ``status="error"`` and ``error="read: <reason>"``, so one
bad object never stops a job, and a Parquet file that fails mid-way yields one error row per unread
record. Storage that stays unreachable after botocore's retries is different: the task raises
:class:`~u2s.io.storage.TransientStorageError`, which Ray Data retries in the task
(:func:`u2s.io.storage.retry_transient_errors`); a job that still fails says so and ``--resume``
finishes it later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from u2s.config import InputConfig, Resources, StorageConfig
from u2s.io.errors import InputError
from u2s.io.ids import IdKey
from u2s.io.listing import Listing, list_input, stable_id
from u2s.io.storage import TransientStorageError, arrow_filesystem, filesystem, is_transient
from u2s.io.tables import MANIFEST_SCHEMA, image_bytes_getter, records_by_part, working_table

if TYPE_CHECKING:
    import fsspec
    import ray
    import ray.data

__all__ = ["InputError", "fetch", "fetch_bytes", "image_bytes_getter", "read_source", "stable_id"]

logger = logging.getLogger(__name__)

#: Read buffer of Parquet column chunks (see :data:`u2s.io.manifest.PARQUET_BUFFER_SIZE`).
PARQUET_BUFFER_SIZE = 4 << 20


def _reason(error: BaseException) -> str:
    """Short, content-free reason of a failed read (the exception type only)."""
    return type(error).__name__


# ---------------------------------------------------------------- objects by URI


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
        except Exception as e:  # the whole call failed (e.g. no connection): every row gets the error
            contents = [e] * len(paths)
        for index, data in zip(indices, contents, strict=True):
            out[index] = data
    return out


def _fetch_uris(batch: pa.Table, storage: StorageConfig) -> pa.Table:
    """Manifest rows → working rows with the bytes of each ``source`` URI (or a ``read`` error)."""
    errors: list[str | None] = batch.column("error").to_pylist()
    todo = [i for i, error in enumerate(errors) if error is None]
    contents: list[bytes | None] = [None] * batch.num_rows
    sources = batch.column("source").to_pylist()
    for i, data in zip(todo, fetch_bytes([sources[i] for i in todo], storage), strict=True):
        if isinstance(data, bytes | bytearray | memoryview):
            contents[i] = bytes(data)
        elif isinstance(data, BaseException) and is_transient(data):
            raise TransientStorageError(_reason(data)) from None
        else:
            errors[i] = _reason(data) if isinstance(data, BaseException) else "no data"
    return working_table(batch, contents, errors)


# ---------------------------------------------------------------- Parquet records


def _by_row_group(metadata: Any, rows: list[int]) -> dict[int, dict[int, int]]:
    """For each row group holding some of ``rows`` (file row indices): {index within group: position}."""
    import bisect

    starts, start = [], 0
    for group in range(metadata.num_row_groups):
        starts.append(start)
        start += metadata.row_group(group).num_rows
    groups: dict[int, dict[int, int]] = {}
    for position, row in enumerate(rows):
        group = bisect.bisect_right(starts, row) - 1
        groups.setdefault(group, {})[row - starts[group]] = position
    return groups


def _read_file_records(
    file_uri: str, records: pa.Table, input: InputConfig, storage: StorageConfig, batch_size: int
) -> Iterator[pa.Table]:
    """The working rows of ``records`` (manifest rows of one Parquet file), row group by row group.

    Only the image column is read, in batches of ``batch_size`` within each row group. If the file fails
    part-way, every record not yet yielded becomes an error row.
    """
    import pyarrow.parquet as pq

    from u2s.io.img2dataset import image_column

    yielded: set[int] = set()
    try:
        afs, path = arrow_filesystem(file_uri, storage)
        with afs.open_input_file(path) as f:
            # No read-ahead of whole row groups: pages stream through a small buffer (flat memory).
            parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=PARQUET_BUFFER_SIZE)
            column = image_column(parquet.schema_arrow.names, input.image_column)
            get_bytes = image_bytes_getter(parquet.schema_arrow.field(column).type, column, file_uri)
            groups = _by_row_group(parquet.metadata, records.column("row").to_pylist())
            for group, wanted in sorted(groups.items()):
                offset = 0
                for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group],
                                                  columns=[column]):  # fmt: skip
                    cells = batch.column(0).to_pylist()
                    picked = [
                        (wanted[offset + i], cell) for i, cell in enumerate(cells) if offset + i in wanted
                    ]
                    offset += len(cells)
                    if not picked:
                        continue
                    contents = [get_bytes(cell) for _, cell in picked]
                    errors = [None if data is not None else "no image bytes" for data in contents]
                    positions = [position for position, _ in picked]
                    yield working_table(records.take(positions), contents, errors)
                    yielded.update(positions)
    except InputError:
        raise
    except Exception as e:  # unreadable or corrupt file: one error row per record not yet read
        if is_transient(e):
            raise TransientStorageError(_reason(e)) from None
        rest = [i for i in range(records.num_rows) if i not in yielded]
        logger.warning("a parquet file failed with %d of %d records unread: %s", len(rest), records.num_rows,
                       _reason(e))  # fmt: skip
        if rest:
            yield working_table(records.take(rest), [None] * len(rest), [_reason(e)] * len(rest))


def _fetch_records(batch: pa.Table, input: InputConfig, storage: StorageConfig, batch_size: int):
    """Manifest rows of Parquet inputs → working rows, file by file (a generator UDF)."""
    for file_uri, records in records_by_part(batch):
        if file_uri is None:
            yield records
        else:
            yield from _read_file_records(file_uri, records, input, storage, batch_size)


# ---------------------------------------------------------------- the plan's source


#: Finished ids, ready for lookups, per object ref: built once per worker process, not once per block.
_DONE_LOOKUPS: dict[Any, Any] = {}


def _done_lookup(done: Any) -> Any:
    """``done`` as a sorted NumPy array of fixed-width ids (searched, not hashed, per block), or as the
    Arrow array itself when ids differ in length. Cached per object ref (the last one only)."""
    import numpy as np
    import ray

    key = done.hex() if isinstance(done, ray.ObjectRef) else id(done)
    if key not in _DONE_LOOKUPS:
        ids = ray.get(done) if isinstance(done, ray.ObjectRef) else done
        ids = ids.cast(pa.binary()) if len(ids) else ids
        lengths = pc.min_max(pc.binary_length(ids)).as_py() if len(ids) else {"min": 0, "max": 0}
        if len(ids) and lengths["min"] == lengths["max"] > 0 and not ids.null_count:
            width = lengths["max"]
            data = ids.buffers()[2]  # the ids back to back: a fixed-width array without a copy
            start = int(np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset])  # a slice's first id
            lookup: Any = np.sort(np.frombuffer(data, dtype=f"S{width}", count=len(ids), offset=start))
        else:
            lookup = ids
        _DONE_LOOKUPS.clear()
        _DONE_LOOKUPS[key] = lookup
    return _DONE_LOOKUPS[key]


def drop_done(batch: pa.Table, done: Any) -> pa.Table:
    """Manifest rows whose id is not in ``done`` (an Arrow array of finished ids, or its object ref).

    The finished ids (up to every row of the input) are prepared once per worker (:func:`_done_lookup`);
    each block is then a binary search of its ids, not a new hash set of all of them.
    """
    import numpy as np

    lookup = _done_lookup(done)
    ids = batch.column("id")
    if not isinstance(lookup, np.ndarray):
        return batch.filter(pc.invert(pc.is_in(ids, value_set=lookup)))
    if not len(lookup) or not batch.num_rows:
        return batch
    wanted = np.array(ids.cast(pa.binary()).to_pylist(), dtype=lookup.dtype)
    at = np.minimum(np.searchsorted(lookup, wanted), len(lookup) - 1)
    lengths = pc.binary_length(ids.cast(pa.binary())).to_numpy(zero_copy_only=False)
    finished = (lookup[at] == wanted) & (lengths == lookup.dtype.itemsize)  # no match by truncation
    return batch.filter(pa.array(~finished))


def fetch(
    manifest: ray.data.Dataset, input: InputConfig, storage: StorageConfig, resources: Resources,
    done: Any = None,
) -> ray.data.Dataset:  # fmt: skip
    """Working rows for a manifest dataset (lazy). ``done``: ids to skip before any byte is fetched."""
    remote_args = resources.ray_remote_args()
    if done is not None:
        manifest = manifest.map_batches(
            drop_done, fn_kwargs={"done": done}, batch_format="pyarrow", batch_size=None, num_cpus=0.1
        )
    if input.format == "parquet":
        # Whole blocks (a listing task emits one file's records per block): one pass per file. Its
        # output is a block per file, so pools scale across files.
        kwargs = {"input": input, "storage": storage, "batch_size": resources.batch_size}
        return manifest.map_batches(
            _fetch_records, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow", **remote_args
        )
    if input.format == "webdataset":  # like Parquet: a listing block per shard, one pass over each tar
        from u2s.io.webdataset import fetch_samples

        kwargs = {"input": input, "storage": storage, "batch_size": resources.batch_size}
        return manifest.map_batches(
            fetch_samples, fn_kwargs=kwargs, batch_size=None, batch_format="pyarrow", **remote_args
        )
    # A listing block holds a whole shard (e.g. every file of one folder). Streamed into blocks of one
    # fetch batch first: fetch and decode keep that size, so they run as many tasks, and the model pools
    # get a block per batch. A pool actor takes a block per task and Ray Data grows a pool on the tasks
    # queued at its actors: one block for the whole shard would keep every pool at one actor. (The
    # split runs on the small manifest rows; a split after fetch would hold a whole CPU for as long as
    # fetch feeds it, which starves the pools' scale-up on a small machine.)
    return manifest.repartition(target_num_rows_per_block=resources.batch_size).map_batches(
        _fetch_uris, fn_kwargs={"storage": storage}, batch_size=resources.batch_size, batch_format="pyarrow",
        udf_modifying_row_count=False, **remote_args,
    )  # fmt: skip


def read_source(
    input: InputConfig, storage: StorageConfig, resources: Resources, id_key: IdKey | None = None
) -> ray.data.Dataset:
    """A Ray Dataset of working rows (``id``, ``source``, ``label``, ``image``...) for ``input``.

    Lists the input in Ray tasks now (:func:`u2s.io.listing.list_input`, which raises
    :class:`InputError` for a missing, empty or inconsistent input); fetching is lazy. ``id_key``: the
    key of the output whose ids these rows must match (``input.id: keyed``, :mod:`u2s.io.ids`).
    """
    return fetch(list_input(input, storage, resources, id_key).dataset, input, storage, resources)


def read_listing(listing: Listing, input: InputConfig, storage: StorageConfig, resources: Resources,
                 done: Any = None) -> ray.data.Dataset:  # fmt: skip
    """:func:`fetch` over an existing listing (what a run does after checking its fingerprint)."""
    return fetch(listing.dataset, input, storage, resources, done)


__all__ += ["MANIFEST_SCHEMA", "drop_done", "read_listing"]
