"""``--resume``: continue an interrupted run where its committed files end.

A safe file is the commit record of its rows (see :mod:`u2s.io.writers`), so the finished rows of an
interrupted run are exactly the ids in its safe table. Resuming reads only that ``id`` column, deletes
sensitive files that have no safe twin (a write that died between the two) and leftover temporary
files, and hands the finished ids to the plan, which drops them before any byte is fetched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from u2s.config import OutputConfig, StorageConfig
from u2s.io.storage import filesystem
from u2s.io.writers import parquet_files, read_columns, remove_broken_files

logger = logging.getLogger(__name__)


@dataclass
class ResumeState:
    """What an earlier attempt left: finished ids and the files this resume cleaned up."""

    done: pa.Array
    orphans_removed: int
    temporaries_removed: int


def _remove_temporaries(uri: str, storage: StorageConfig) -> int:
    """Delete the hidden ``.*.tmp`` files a killed local write left under ``uri``; returns how many."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        return 0
    names = [entry for entry in fs.ls(path, detail=False) if entry.rsplit("/", 1)[-1].endswith(".tmp")]
    for entry in names:
        fs.rm(entry)
    return len(names)


def reconcile(output: OutputConfig, storage: StorageConfig) -> ResumeState:
    """Clean up after an interrupted attempt and return the ids it finished."""
    remove_broken_files(output, storage)  # no valid footer: not committed (with its twin)
    safe = set(parquet_files(output.uri, storage))
    orphans = [name for name in parquet_files(output.sensitive_uri, storage) if name not in safe]
    fs, root = filesystem(output.sensitive_uri, storage)
    for name in orphans:
        fs.rm(f"{root.rstrip('/')}/{name}")
    temporaries = _remove_temporaries(output.uri, storage) + _remove_temporaries(
        output.sensitive_uri, storage
    )
    done = read_columns(output.uri, storage, ["id"]).column("id").combine_chunks()
    if orphans or temporaries:
        logger.info("resume: removed %d uncommitted sensitive file(s), %d temporary file(s)",
                    len(orphans), temporaries)  # fmt: skip
    unique = pc.count_distinct(done).as_py() if len(done) else 0
    if unique != len(done):
        raise RuntimeError(
            f"the safe table at {output.uri} holds duplicate ids: it was not written by u2s alone"
        )
    return ResumeState(done=done, orphans_removed=len(orphans), temporaries_removed=temporaries)
