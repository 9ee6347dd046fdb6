"""WebDataset tar shards: samples listed by key, their image bytes streamed out of the tar.

A shard is a tar whose members are grouped into samples by key (the WebDataset convention): the member
``dir/0001.seg.png`` belongs to sample ``dir/0001`` as its ``seg.png``; a sample's members are consecutive.
Each sample is one input record with the source ``<shard uri>#<key>`` (hashed into its id, or the key
itself with ``input.id: column``); its image is the member whose extension comes first in
``input.extensions``, and ``input.label_member`` (``txt``, or ``json:<field>``) gives its label.

Shards are read front to back by stdlib :mod:`tarfile` in stream mode (``r|*``) over an fsspec file,
never unpacked to disk. A tar has no index, and one sequential read of a shard is far cheaper than a
ranged request per sample of a few kB; the ``webdataset`` package streams tars the same way but brings
its own pipeline and dependencies that a listing and a reader do not need. A listing task reads the
headers (and the label members); a fetch task reads its shard again, keeps only the image bytes of the
samples still wanted, and stops once it has them all (a resumed run drops finished ids before any
shard is opened).

A truncated or corrupt shard never fails the job: the samples before the damage are read, each one not
read becomes an error row with the exception type as its reason. Shards written by img2dataset have a
Parquet sidecar (``00000.tar`` + ``00000.parquet``) listing every URL with its download status: its
failed downloads, and the samples it lists that the tar lacks, become error rows too
(:mod:`u2s.io.img2dataset`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO

import pyarrow as pa

from u2s.io.img2dataset import download_errors, read_statuses
from u2s.io.storage import TransientStorageError, filesystem, is_transient, to_uri
from u2s.io.tables import ShardStats, records_by_part, working_table
from u2s.io.tables import manifest_table as _table

if TYPE_CHECKING:
    import fsspec

    from u2s.config import InputConfig, StorageConfig

logger = logging.getLogger(__name__)

#: Suffixes of tar shards (``r|*`` also reads compressed tars).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Members that describe a sample rather than hold its image: a sample of these only is skipped.
METADATA_EXTENSIONS = frozenset({"txt", "json", "cls", "caption"})
#: The reason of a sample with members but no image among them.
NO_IMAGE = "no image member"


def tar_shards(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """URIs of the tar shards at ``root`` (one file, or every ``*.tar`` below a folder), sorted."""
    if not fs.isdir(root):
        return [to_uri(fs, root)]
    paths = []
    for path in fs.find(root):
        relative = posixpath.relpath(path, root)
        if path.endswith(TAR_SUFFIXES) and not any(p.startswith((".", "_")) for p in relative.split("/")):
            paths.append(path)
    return [to_uri(fs, path) for path in sorted(paths)]


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name (``a/b.seg.PNG`` → ``("a/b", "seg.png")``), None without one."""
    folder, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    if not dot or not stem or not extension:
        return None
    return posixpath.join(folder, stem), extension.lower()


def image_extensions(extensions: list[str]) -> list[str]:
    """``input.extensions`` as member extensions, in order of preference (``.JPG`` → ``jpg``)."""
    return list(dict.fromkeys(e.lower().lstrip(".") for e in extensions))


class _CheckedTarInfo(tarfile.TarInfo):
    """A header reader that treats a cut-off or garbled header as damage, not as the end of the tar."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError):
            raise tarfile.ReadError("truncated or corrupt header") from None


def _open_tar(f: BinaryIO) -> tarfile.TarFile:
    return tarfile.open(fileobj=f, mode="r|*", tarinfo=_CheckedTarInfo)


def _label_reader(label_member: str | None) -> tuple[str | None, Callable[[bytes], str | None]]:
    """The extension of the label member and how its content becomes a label."""
    if not label_member:
        return None, lambda data: None
    extension, _, field = label_member.partition(":")
    if not field:
        return extension, lambda data: data.decode("utf-8", "replace").strip()

    def from_json(data: bytes) -> str | None:
        try:
            value = json.loads(data)
        except ValueError:
            return None
        value = value.get(field) if isinstance(value, dict) else None
        return None if value is None else str(value)

    return extension, from_json


# ---------------------------------------------------------------- listing (one Ray task per shard)


def list_tar_shard(
    uri: str, input: InputConfig, storage: StorageConfig, stats: ShardStats, make_id: Callable[[str], str]
) -> pa.Table:
    """The manifest rows of one shard: a row per sample with an image, or with an error."""

    fs, path = filesystem(uri, storage)
    label_extension, read_label = _label_reader(input.label_member)
    samples: dict[str, dict[str, bytes | None]] = {}
    damage = None
    try:
        with fs.open(path, "rb") as f, _open_tar(f) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_name(member.name)
                if parts is None:
                    stats.skipped_extensions["(none)"] = stats.skipped_extensions.get("(none)", 0) + 1
                    continue
                key, extension = parts
                content = tar.extractfile(member).read() if extension == label_extension else None
                samples.setdefault(key, {})[extension] = content
    except Exception as e:  # a damaged shard: what was listed stays, the rest becomes error rows
        if is_transient(e):
            raise
        damage = type(e).__name__
        stats.unreadable_files += 1
        logger.warning("a tar shard is unreadable after %d samples (%s)", len(samples), damage)

    preferred = image_extensions(input.extensions)
    keys, labels, errors = [], [], []
    metadata = METADATA_EXTENSIONS | {label_extension}
    for key, members in samples.items():
        has_image = any(e in members for e in preferred)
        if not has_image and set(members) <= metadata:
            name = "webdataset: sample without image"
            stats.skipped_extensions[name] = stats.skipped_extensions.get(name, 0) + 1
            continue
        label = members.get(label_extension) if label_extension else None
        keys.append(key)
        labels.append(read_label(label) if label is not None else None)
        errors.append(None if has_image else f"read: {NO_IMAGE}")

    listed = set(keys)
    statuses = _sidecar_statuses(fs, path, storage)
    if statuses is not None:  # img2dataset: its failed downloads and the samples the tar lacks
        for key, error in zip(statuses.column("key").to_pylist(), download_errors(statuses), strict=True):
            if key is None or key in listed:
                continue
            keys.append(key)
            labels.append(None)
            errors.append(f"read: {error}" if error else f"read: {damage or 'sample missing from tar'}")
            listed.add(key)
    sources = [f"{uri}#{key}" for key in keys]
    ids = list(keys) if input.id == "column" else [make_id(source) for source in sources]
    if damage and statuses is None:  # samples after the damage are unknown: one error row stands for them
        ids.append(make_id(uri))
        sources.append(uri)
        labels.append(None)
        errors.append(f"read: unreadable tar ({damage})")
    n = len(ids)
    return _table(ids, sources, labels, parts=[uri] * n, rows=list(range(n)), errors=errors)


def _sidecar_statuses(fs: fsspec.AbstractFileSystem, path: str, storage: StorageConfig) -> pa.Table | None:
    """img2dataset's per-URL statuses beside a shard (``00000.parquet`` for ``00000.tar``), if any."""
    suffix = next((s for s in TAR_SUFFIXES if path.endswith(s)), "")
    sidecar = f"{path.removesuffix(suffix)}.parquet"
    if not fs.exists(sidecar):
        return None
    try:
        return read_statuses(to_uri(fs, sidecar), storage)
    except Exception as e:
        if is_transient(e):
            raise
        logger.warning("an img2dataset sidecar is unreadable (%s); its failed downloads are not listed",
                       type(e).__name__)  # fmt: skip
        return None


# ---------------------------------------------------------------- fetch (a generator UDF)


def fetch_samples(
    batch: pa.Table, input: InputConfig, storage: StorageConfig, batch_size: int
) -> Iterator[pa.Table]:
    """Manifest rows of tar shards → working rows, shard by shard, in blocks of ``batch_size`` rows."""

    for uri, records in records_by_part(batch):
        if uri is None:
            yield records
            continue
        for positions, contents, errors in _read_shard(uri, records, input, storage, batch_size):
            yield working_table(records.take(positions), contents, errors)


def _read_shard(
    uri: str, records: pa.Table, input: InputConfig, storage: StorageConfig, batch_size: int
) -> Iterator[tuple[list[int], list[bytes | None], list[str | None]]]:
    """``(positions, image bytes, errors)`` for ``records`` (samples of one shard), each position once."""
    wanted = {source[len(uri) + 1 :]: i for i, source in enumerate(records.column("source").to_pylist())}
    preferred = image_extensions(input.extensions)
    picked: list[tuple[int, bytes | None, str | None]] = []
    seen: set[int] = set()

    def finish(key: str | None, members: dict[str, bytes]) -> None:
        if key in wanted and wanted[key] not in seen:
            data = next((members[e] for e in preferred if e in members), None)
            picked.append((wanted[key], data, None if data is not None else NO_IMAGE))
            seen.add(wanted[key])

    def flush() -> Iterator[tuple[list[int], list[bytes | None], list[str | None]]]:
        if picked:
            positions, contents, errors = map(list, zip(*picked, strict=True))
            picked.clear()
            yield positions, contents, errors

    key, members = None, {}
    try:
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f, _open_tar(f) as tar:
            for member in tar:
                parts = split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    finish(key, members)
                    if len(picked) >= batch_size:
                        yield from flush()
                    if len(seen) == len(wanted):
                        key = None
                        break
                    key, members = parts[0], {}
                if key in wanted and parts[1] in preferred:
                    members[parts[1]] = tar.extractfile(member).read()
            finish(key, members)
        yield from flush()
    except Exception as e:  # damaged or vanished shard: every sample not yet read becomes an error row
        if is_transient(e):
            raise TransientStorageError(type(e).__name__) from None
        if members:  # the sample being read when the damage came: its members read in full
            finish(key, members)
        yield from flush()
        rest = [i for i in range(records.num_rows) if i not in seen]
        logger.warning("a tar shard failed with %d of %d samples unread (%s)", len(rest), records.num_rows,
                       type(e).__name__)  # fmt: skip
        seen.update(rest)
        if rest:
            yield rest, [None] * len(rest), [type(e).__name__] * len(rest)
    missing = [i for i in range(records.num_rows) if i not in seen]
    if missing:
        yield missing, [None] * len(missing), ["sample missing from tar"] * len(missing)
