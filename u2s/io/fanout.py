"""Splitting a folder's key space so that listing tasks fan out, whatever the layout.

A listing task lists at most :data:`SHARD_ROWS` files and hands what remains to new tasks:

- **S3**: a *range* shard is the keys ``after < key <= upto`` below the input prefix, listed with
  ``ListObjectsV2`` (no delimiter, so nested folders are in the range too) from ``StartAfter=after``.
  A task that reaches :data:`SHARD_ROWS` keys stops, and the rest of its range is cut at up to
  :data:`SPLIT_WIDTH` points (:func:`split_points`) into ranges listed by new tasks, which split
  again while they are large. Ranges cover the key space whatever its characters, so every key is
  listed exactly once; the points only decide how evenly the work is spread.
- **Local files**: a directory's entries come from one ``os.scandir`` (a directory cannot be read from
  the middle), run in a task that returns its files in sorted chunks of :data:`SHARD_ROWS` and its
  subdirectories as new shards.
"""

from __future__ import annotations

import os
import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import s3fs

#: Most files one listing task lists before the rest goes to new tasks; also the most rows of one
#: listed table (one block of the manifest dataset).
SHARD_ROWS = 10_000

#: Most new ranges one S3 range task splits the rest of its range into.
SPLIT_WIDTH = 32

_CLASSES = (string.digits, string.ascii_uppercase, string.ascii_lowercase)
_OTHER = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"  # in code-point order
_PAGE = 1000  # ListObjectsV2's most keys per page


def scan_local_dir(path: str) -> tuple[list[str], list[str]]:
    """The files and subdirectories of one local directory (sorted paths), hidden (``.x``) ones left out."""
    files, dirs = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            (dirs if entry.is_dir() else files).append(entry.path)
    return sorted(files), sorted(dirs)


def list_s3_range(
    fs: s3fs.S3FileSystem, bucket: str, prefix: str, after: str | None, upto: str | None, max_keys: int
) -> tuple[list[str], bool]:
    """Keys ``after < key <= upto`` below ``prefix`` in key order, at most ``max_keys``; ``True`` with
    them when the range may hold more (the rest starts after the last key)."""
    keys: list[str] = []
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if after:
        request["StartAfter"] = after
    while True:
        request["MaxKeys"] = min(_PAGE, max_keys - len(keys))
        page = fs.call_s3("list_objects_v2", **request)
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if upto is not None and key > upto:
                return keys, False
            if not key.endswith("/"):  # folder markers are not files
                keys.append(key)
        if not page.get("IsTruncated"):
            return keys, False
        if len(keys) >= max_keys:
            return keys, True
        request.pop("StartAfter", None)
        request["ContinuationToken"] = page["NextContinuationToken"]


def _class(char: str) -> str:
    """The characters of ``char``'s class: digits, upper or lower case letters, or a few common ones."""
    return next((c for c in _CLASSES if char in c), "")


def _later(char: str) -> str:
    """The characters of ``char``'s class after it; a few common ones for a character of no class."""
    chars = _class(char)
    later = "".join(c for c in (chars or _OTHER) if c > char)
    return later if chars else later[:4]


def split_points(first: str, last: str, upto: str | None, floor: int) -> list[str]:
    """Cut points ``last < p < upto`` for the rest of a range whose listed keys went from ``first`` to
    ``last`` (ranges ``(last, p1], (p1, p2], …, (pn, upto]``).

    The keys listed so far vary from the first character where ``first`` and ``last`` differ; the rest
    of the range is guessed to go on there and at the characters before it (a counter rolls over). At
    each such position, the points are ``last``'s head followed by each later character of the same
    class (digits, upper or lower case letters; a few common ones otherwise), the deepest position
    first, up to :data:`SPLIT_WIDTH` points; the first block after ``last`` is cut one character
    finer. ``floor``: the length of the prefix that every key shares.
    """
    common = len(os.path.commonprefix([first, last]))  # noqa: RUF071 (characters, not paths)
    points: set[str] = set()
    for i in range(min(common, len(last) - 1), floor - 1, -1):
        later = _later(last[i])
        if later and not points and i + 1 < len(last):  # the next block, as dense as the listed one?
            points.update(last[:i] + later[0] + c for c in _class(last[i + 1]))  # cut one level finer
        points.update(last[:i] + c for c in later)
        if len(points) >= SPLIT_WIDTH:
            break
    inside = sorted(p for p in points if p > last and (upto is None or p < upto))
    return inside[:SPLIT_WIDTH]
