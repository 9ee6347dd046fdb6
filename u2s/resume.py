"""``--resume``: continue an interrupted run where its committed files end.

A safe file is the commit record of its rows (see :mod:`u2s.io.writers`), so the finished rows of an
interrupted run are exactly the ids in its safe table. Resuming reads only that ``id`` column, deletes
sensitive files that have no safe twin (a write that died between the two) and leftover temporary
files, and hands the finished ids to the plan, which drops them before any byte is fetched.

``--retry-errors`` first takes the error rows out of the outputs, so that the plan processes them again.
Each file pair holding some is rewritten without them under a new name (``<name>.r1.parquet``, then
``.r2``...), sensitive file first, then its safe twin, each atomically (local: a temporary file renamed;
S3: an object appears whole), then the old pair is deleted, safe file first. Whatever point a crash
stops this at, the next resume finds one of three states and completes it: a new sensitive file without
its safe twin (deleted, like any uncommitted file), both pairs (the newer one supersedes: the older pair
is deleted), or an old sensitive file without its twin (deleted). Every id stays in both tables exactly
once, or in neither, to be processed again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from u2s.config import OutputConfig, StorageConfig
from u2s.io.storage import arrow_filesystem, filesystem, is_local
from u2s.io.writers import parquet_files, read_columns, remove_broken_files
from u2s.schema import Status

logger = logging.getLogger(__name__)


@dataclass
class ResumeState:
    """What an earlier attempt left: finished ids and the files this resume cleaned up."""

    done: pa.Array
    orphans_removed: int
    temporaries_removed: int
    superseded_removed: int = 0  # older pairs of a rewrite an earlier resume did not finish
    retried: int = 0  # error rows taken out to be processed again (``retry_errors``)


#: ``<stem>.parquet`` or its rewrites ``<stem>.r<n>.parquet`` (the file pair without its error rows).
_VERSION = re.compile(r"^(?P<stem>.+?)(?:\.r(?P<n>\d+))?\.parquet$")


def _version(name: str) -> tuple[str, int]:
    match = _VERSION.match(name)
    return (match["stem"], int(match["n"] or 0)) if match else (name, 0)


def _remove_temporaries(uri: str, storage: StorageConfig) -> int:
    """Delete the hidden ``.*.tmp`` files a killed local write left under ``uri``; returns how many."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        return 0
    names = [entry for entry in fs.ls(path, detail=False) if entry.rsplit("/", 1)[-1].endswith(".tmp")]
    for entry in names:
        fs.rm(entry)
    return len(names)


def _remove(uri: str, storage: StorageConfig, name: str) -> None:
    fs, root = filesystem(uri, storage)
    path = f"{root.rstrip('/')}/{name}"
    if fs.exists(path):
        fs.rm(path)


def _remove_superseded(output: OutputConfig, storage: StorageConfig) -> int:
    """Finish rewrites that a crash interrupted: of the safe files of one stem only the newest stays; each
    older one goes, then its sensitive twin. Returns how many pairs were removed."""
    names = parquet_files(output.uri, storage)
    newest: dict[str, int] = {}
    for name in names:
        stem, n = _version(name)
        newest[stem] = max(newest.get(stem, 0), n)
    stale = [name for name in names if _version(name)[1] < newest[_version(name)[0]]]
    for name in stale:
        _remove(output.uri, storage, name)
        _remove(output.sensitive_uri, storage, name)
    return len(stale)


def _write_atomically(table: pa.Table, uri: str, storage: StorageConfig, name: str, compression: str) -> None:
    """``table`` as the Parquet file ``name`` under ``uri``, visible only once whole."""
    import pyarrow.parquet as pq

    fs, root = arrow_filesystem(uri, storage)
    final = f"{root.rstrip('/')}/{name}"
    path = f"{root.rstrip('/')}/.{name}.tmp" if is_local(uri) else final  # S3: the object appears on close
    with fs.open_output_stream(path) as stream:
        pq.write_table(table, stream, compression=None if compression == "none" else compression)
    if path != final:
        fs.move(path, final)


def _drop_error_rows(output: OutputConfig, storage: StorageConfig) -> int:
    """Rewrite every file pair that holds error rows without them (see the module doc); returns how many
    rows were taken out."""
    import pyarrow.parquet as pq

    safe_fs, safe_root = arrow_filesystem(output.uri, storage)
    sensitive_fs, sensitive_root = arrow_filesystem(output.sensitive_uri, storage)
    removed = 0
    for name in parquet_files(output.uri, storage):
        safe_path, sensitive_path = f"{safe_root.rstrip('/')}/{name}", f"{sensitive_root.rstrip('/')}/{name}"
        status = pq.read_table(safe_path, columns=["id", "status"], filesystem=safe_fs)
        failed = pc.equal(status.column("status"), Status.ERROR.value)
        if not pc.any(failed).as_py():
            continue
        errors = status.column("id").filter(failed)
        stem, n = _version(name)
        renamed = f"{stem}.r{n + 1}.parquet"
        sensitive = pq.read_table(sensitive_path, filesystem=sensitive_fs)
        sensitive = sensitive.filter(pc.invert(pc.is_in(sensitive.column("id"), value_set=errors)))
        if sensitive.num_rows:  # the new pair, sensitive file first: the safe file commits it
            _write_atomically(sensitive, output.sensitive_uri, storage, renamed, output.compression)
            safe = pq.read_table(safe_path, filesystem=safe_fs)
            safe = safe.filter(pc.invert(pc.is_in(safe.column("id"), value_set=errors)))
            _write_atomically(safe, output.uri, storage, renamed, output.compression)
        _remove(output.uri, storage, name)  # the old pair, safe file first
        _remove(output.sensitive_uri, storage, name)
        removed += len(errors)
    return removed


def reconcile(output: OutputConfig, storage: StorageConfig, retry_errors: bool = False) -> ResumeState:
    """Clean up after an interrupted attempt and return the ids it finished; with ``retry_errors``, take
    its error rows out of both tables first (they are processed again)."""
    remove_broken_files(output, storage)  # no valid footer: not committed (with its twin)
    superseded = _remove_superseded(output, storage)
    safe = set(parquet_files(output.uri, storage))
    orphans = [name for name in parquet_files(output.sensitive_uri, storage) if name not in safe]
    fs, root = filesystem(output.sensitive_uri, storage)
    for name in orphans:
        fs.rm(f"{root.rstrip('/')}/{name}")
    temporaries = _remove_temporaries(output.uri, storage) + _remove_temporaries(
        output.sensitive_uri, storage
    )
    retried = _drop_error_rows(output, storage) if retry_errors else 0
    done = read_columns(output.uri, storage, ["id"]).column("id").combine_chunks()
    if orphans or temporaries or superseded:
        logger.info("resume: removed %d uncommitted sensitive file(s), %d temporary file(s), %d superseded "
                    "file pair(s)", len(orphans), temporaries, superseded)  # fmt: skip
    unique = pc.count_distinct(done).as_py() if len(done) else 0
    if unique != len(done):
        raise RuntimeError(
            f"the safe table at {output.uri} holds duplicate ids: it was not written by u2s alone"
        )
    return ResumeState(done=done, orphans_removed=len(orphans), temporaries_removed=temporaries,
                       superseded_removed=superseded, retried=retried)  # fmt: skip
