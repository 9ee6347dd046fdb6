"""Model weights staged in object storage: an ``s3://`` model folder synced into a local cache, once per node.

A model location (``ModelConfig.model``, SafeAttention's ``weights``) may be an ``s3://bucket/prefix``
holding a saved model folder (``save_pretrained``, ``huggingface-cli download``, ``snapshot_download``).
When an engine or editor starts, on its worker, :func:`local_model` / :func:`local_location` sync that
prefix into the model cache and hand the local folder to the same ``from_pretrained`` that loads hub ids
and mounted paths. Many actors of one node (or of a cluster, on a shared volume) start together; the
first takes the cache entry's lock and downloads, the others wait and find it done:

- a cache entry per URI (and endpoint): ``<cache>/<bucket>--<name>-<hash>/``, holding ``.lock`` (an
  exclusive ``flock``) and one snapshot folder per content digest;
- the **digest** is the sha256 of the prefix's listing (relative key, size and ETag of every object),
  so a changed prefix is a new snapshot, and an unchanged one is a cache hit after one listing;
- files download in parallel (several files at once, large ones in ranged parts) into a hidden
  ``.tmp-*`` folder, are checked against the listed sizes, get a ``.u2s-staged.json`` marker and are then
  renamed into place: a snapshot folder exists only complete. Leftover temporary folders of a killed
  download are removed by the next lock holder; partial downloads are never used;
- with ``revision`` set to the digest (or its first characters), the content is pinned: a node that
  holds that snapshot loads it without listing the bucket, and a prefix whose content differs is refused;
- every use appends a line to the entry's ``events.jsonl`` (time, host, pid, ``downloaded`` or
  ``cached``, digest, bytes, seconds): on a shared volume, a record of which node fetched what.

The cache folder is ``storage.model_cache_dir``, else ``$U2S_MODEL_CACHE``, else ``~/.cache/u2s/models``,
resolved on the worker. Staging a new snapshot of a URI removes its older snapshots. Only model URIs,
sizes and digests are logged. Imports of s3fs happen on first use.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from u2s.config_base import is_object_store_uri

if TYPE_CHECKING:
    from collections.abc import Iterator

    from u2s.config import StorageConfig
    from u2s.config_base import ModelConfig

logger = logging.getLogger(__name__)

#: Environment variable naming the model cache folder (when ``storage.model_cache_dir`` is unset).
MODEL_CACHE_ENV = "U2S_MODEL_CACHE"
DEFAULT_MODEL_CACHE = "~/.cache/u2s/models"
#: Written into a snapshot folder last, before the folder is renamed into place.
MARKER = ".u2s-staged.json"
LOCK = ".lock"
EVENTS = "events.jsonl"
TMP_PREFIX = ".tmp-"

#: Files downloaded at once, ranged parts per large file, and the part size: at most
#: FILES_AT_ONCE × PARTS_AT_ONCE × PART_BYTES (512 MiB) of parts held in memory.
FILES_AT_ONCE = 4
PARTS_AT_ONCE = 8
PART_BYTES = 16 * 2**20

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class ModelNotFound(FileNotFoundError):
    """An object-storage model location holds no object (missing bucket, prefix or object, or empty)."""


@dataclass(frozen=True)
class StagedModel:
    """A model location synced into the local cache."""

    uri: str
    #: The local folder (or file, when ``uri`` names one object) to load from.
    path: str
    #: sha256 of the listing (relative key, size, ETag): the content's identity.
    digest: str
    files: int
    bytes: int
    #: Bytes this call downloaded: 0 on a cache hit (or when another process staged it meanwhile).
    downloaded_bytes: int


def model_cache_dir(storage: StorageConfig | None = None) -> Path:
    """The local model cache: ``storage.model_cache_dir``, else ``$U2S_MODEL_CACHE``, else
    ``~/.cache/u2s/models`` (resolved where this runs: on a worker, the worker's)."""
    configured = storage.model_cache_dir if storage is not None else None
    folder = configured or os.environ.get(MODEL_CACHE_ENV) or DEFAULT_MODEL_CACHE
    return Path(folder).expanduser().absolute()


def local_location(location: str, storage: StorageConfig | None = None, revision: str | None = None) -> str:
    """``location`` itself (a hub id or local path), or the local copy of an object-storage location."""
    if not is_object_store_uri(location):
        return location
    return stage(location, storage, revision).path


def local_model(model: ModelConfig, storage: StorageConfig | None = None) -> ModelConfig:
    """``model`` itself, or for an ``s3://`` model a copy that names its staged local folder (revision
    cleared: it pinned the staged content, which the loaders must not look up on the hub)."""
    if not is_object_store_uri(model.model):
        return model
    staged = stage(model.model, storage, model.revision)
    return model.model_copy(update={"model": staged.path, "revision": None})


def stage(
    uri: str,
    storage: StorageConfig | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> StagedModel:
    """Sync the object-storage model ``uri`` (a prefix, or one object) into the local cache; see the
    module docstring. ``revision``: a digest (prefix) the content must have. ``cache_dir`` overrides
    :func:`model_cache_dir`."""
    from u2s.config import StorageConfig

    storage = storage or StorageConfig()
    uri = uri.rstrip("/")
    root = Path(cache_dir).expanduser().absolute() if cache_dir else model_cache_dir(storage)
    entry = root / _entry_name(uri, storage)
    if revision:
        pinned = _pinned_snapshot(entry, revision.lower())
        if pinned is not None:  # the pinned content is here: no listing
            return _hit(entry, pinned)
    fs, path = _filesystem(uri, storage)
    objects = _list(fs, path, uri)
    digest = listing_digest(objects)
    if revision and not digest.startswith(revision.lower()):
        raise ValueError(
            f"{uri} holds content {digest[:16]}, not the pinned revision {revision}: stage that revision "
            "again or update the pin"
        )
    snapshot = entry / digest
    if (found := _complete(snapshot)) is not None:
        return _hit(entry, found)
    entry.mkdir(parents=True, exist_ok=True)
    with _locked(entry / LOCK, uri):
        if (found := _complete(snapshot)) is not None:  # another process staged it while we waited
            return _hit(entry, found)
        _remove_temporaries(entry)
        start = time.perf_counter()
        downloaded = _download(fs, path, uri, objects, entry, snapshot, digest)
        _record(entry, "downloaded", downloaded, time.perf_counter() - start)
        _prune(entry, keep=snapshot.name)
    return downloaded


# -- listing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Object:
    key: str  # full path on the filesystem (bucket/key)
    rel: str  # relative path inside the snapshot
    size: int
    etag: str


def _filesystem(uri: str, storage: StorageConfig) -> tuple[Any, str]:
    """An s3fs filesystem with a connection pool sized for parallel downloads, and the path on it."""
    import s3fs

    from u2s.io.storage import s3_options, split_uri

    scheme, rest = split_uri(uri)
    if scheme != "s3" or not rest.strip("/"):
        raise ValueError(f"unsupported model location {uri!r}: use s3://bucket/prefix")
    options = s3_options(storage)
    options["config_kwargs"] = {
        **options["config_kwargs"], "max_pool_connections": FILES_AT_ONCE * PARTS_AT_ONCE
    }  # fmt: skip
    # A private instance: fsspec's shared one keeps listings cached, and this one is sized for downloads.
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True, use_listings_cache=False)
    return fs, rest.strip("/")


def _list(fs: Any, path: str, uri: str) -> list[_Object]:
    """Every object under ``path`` (or the object ``path`` itself), sorted; :class:`ModelNotFound` if none."""
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        found = {}
    except Exception as e:
        e.add_note(f"while listing model {uri}")
        raise
    objects = []
    for name, info in sorted(found.items()):
        if info.get("type") == "directory" or name.endswith("/"):
            continue  # folder placeholders
        rel = name[len(path) + 1 :] if name != path else name.rsplit("/", 1)[-1]
        parts = rel.split("/")
        if not rel or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{uri}: object key {name!r} does not map to a local file")
        etag = str(info.get("ETag") or info.get("etag") or info.get("LastModified") or "").strip('"')
        objects.append(_Object(name, rel, int(info.get("size") or 0), etag))
    if not objects:
        raise ModelNotFound(f"no model files at {uri}: the bucket, prefix or object is missing or empty")
    return objects


def listing_digest(objects: list[_Object]) -> str:
    """sha256 of the sorted ``relative key, size, ETag`` lines: changes when any object changes."""
    lines = sorted(f"{o.rel}\t{o.size}\t{o.etag}" for o in objects)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# -- the cache ----------------------------------------------------------------------------------------


def _entry_name(uri: str, storage: StorageConfig) -> str:
    """``<bucket>--<last path part>-<hash of endpoint + URI>``: readable, and distinct per location."""
    parts = uri.split("://", 1)[1].split("/")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{parts[0]}--{parts[-1]}")[:80]
    source = f"{storage.endpoint_url or ''}|{uri}"
    return f"{readable}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def _read_marker(snapshot: Path) -> dict[str, Any] | None:
    try:
        return json.loads((snapshot / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _complete(snapshot: Path) -> StagedModel | None:
    """The snapshot when it is complete: its marker is there and every listed file has its size."""
    marker = _read_marker(snapshot)
    if marker is None:
        return None
    files: dict[str, int] = marker.get("files", {})
    for rel, size in files.items():
        try:
            if (snapshot / rel).stat().st_size != size:
                return None
        except OSError:
            return None
    target = snapshot / marker["single"] if marker.get("single") else snapshot
    return StagedModel(marker["uri"], str(target), marker["digest"], len(files), sum(files.values()), 0)


def _pinned_snapshot(entry: Path, revision: str) -> StagedModel | None:
    try:
        names = [name for name in os.listdir(entry) if _DIGEST.match(name) and name.startswith(revision)]
    except FileNotFoundError:
        return None
    for name in names:
        if (found := _complete(entry / name)) is not None:
            return found
    return None


def _hit(entry: Path, staged: StagedModel) -> StagedModel:
    logger.info("model %s: cached (%d files, %.2f GB, content %s)", staged.uri, staged.files,
                staged.bytes / 1e9, staged.digest[:16])  # fmt: skip
    _record(entry, "cached", staged, 0.0)
    return staged


def _record(entry: Path, event: str, staged: StagedModel, seconds: float) -> None:
    """Append one line to the entry's event log (one ``write`` of a short line in append mode)."""
    import socket

    line = json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
        "pid": os.getpid(), "event": event, "digest": staged.digest, "bytes": staged.downloaded_bytes,
        "seconds": round(seconds, 3),
    })  # fmt: skip
    try:
        with open(entry / EVENTS, "a") as f:
            f.write(line + "\n")
    except OSError:  # a read-only cache still serves its copies
        logger.warning("model %s: cannot append to the model cache's event log", staged.uri)


@contextmanager
def _locked(path: Path, uri: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released when the process dies, so never stale)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            logger.info("model %s: another process is staging it, waiting", uri)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_temporaries(entry: Path) -> None:
    """Temporary folders left by a killed download (only the lock holder writes one)."""
    for child in entry.iterdir():
        if child.name.startswith(TMP_PREFIX):
            shutil.rmtree(child, ignore_errors=True)


def _prune(entry: Path, keep: str) -> None:
    """Older snapshots of this URI: its content changed, they will not be loaded again."""
    for child in entry.iterdir():
        if child.name != keep and _DIGEST.match(child.name):
            shutil.rmtree(child, ignore_errors=True)


def _download(
    fs: Any, path: str, uri: str, objects: list[_Object], entry: Path, snapshot: Path, digest: str
) -> StagedModel:
    total = sum(o.size for o in objects)
    free = shutil.disk_usage(entry).free
    if total > free:
        raise OSError(
            errno.ENOSPC, f"model {uri} needs {total / 1e9:.2f} GB, the model cache at {entry.parent} has "
            f"{free / 1e9:.2f} GB free",
        )  # fmt: skip
    logger.info("model %s: staging %d files, %.2f GB", uri, len(objects), total / 1e9)
    start = time.perf_counter()
    tmp = entry / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        local = [str(tmp / o.rel) for o in objects]
        for name in local:
            os.makedirs(os.path.dirname(name), exist_ok=True)
        fs.get([o.key for o in objects], local, batch_size=FILES_AT_ONCE, max_concurrency=PARTS_AT_ONCE,
               chunksize=PART_BYTES)  # fmt: skip
        for o, name in zip(objects, local, strict=True):
            if os.path.getsize(name) != o.size:
                raise OSError(f"model {uri}: {o.rel} changed while it was downloaded; start again")
        single = objects[0].rel if len(objects) == 1 and objects[0].key == path else None
        marker = {"uri": uri, "digest": digest, "single": single, "files": {o.rel: o.size for o in objects},
                  "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        if snapshot.exists():  # an incomplete snapshot (files removed from the cache by hand)
            shutil.rmtree(snapshot)
        os.rename(tmp, snapshot)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    logger.info("model %s: staged %d files, %.2f GB in %.1f s (%.0f MB/s), content %s", uri, len(objects),
                total / 1e9, seconds, total / 1e6 / max(seconds, 1e-3), digest[:16])  # fmt: skip
    target = snapshot / single if single else snapshot
    return StagedModel(uri, str(target), digest, len(objects), total, total)
