"""One storage layer for local paths and ``s3://`` URIs (fsspec for bytes, pyarrow for tables).

Every reader and writer resolves a URI here, so S3 settings (endpoint, region, anonymous access) are
honoured the same way everywhere. Credentials are never passed in or logged: s3fs/botocore take them
from the standard AWS chain (environment, profile, instance/pod role), and botocore also honours
``$AWS_ENDPOINT_URL`` when no endpoint is configured.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import TYPE_CHECKING, Any

import fsspec

from u2s.config import StorageConfig

if TYPE_CHECKING:
    import pyarrow.fs

S3_SCHEMES = ("s3",)
LOCAL_SCHEMES = ("", "file")


def split_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/key"`` → ``("s3", "bucket/key")``; a plain path → ``("", path)``."""
    if "://" not in uri:
        return "", uri
    scheme, _, rest = uri.partition("://")
    return scheme.lower(), rest


def is_local(uri: str) -> bool:
    """Whether ``uri`` names the local filesystem (a plain path or ``file://``)."""
    return split_uri(uri)[0] in LOCAL_SCHEMES


def _local_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


class TransientStorageError(OSError):
    """Storage stayed unreachable or kept throttling after botocore's retries; Ray Data retries the work.

    The message is the original exception's type only (messages can quote object keys, i.e. paths).
    """


def retry_transient_errors(storage: StorageConfig) -> None:
    """Have Ray Data retry map and write work that raised :class:`TransientStorageError`, up to
    ``storage.task_retries`` times with exponential backoff, inside the task (Ray Data's own
    ``retried_map_errors``: a retried generator skips the batches it already produced)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.retried_map_errors = [TransientStorageError.__name__]
    context.max_map_retries = storage.task_retries


#: Exception class names (anywhere in the MRO) that mean "the storage could not be reached" rather than
#: "this object is missing or unreadable": botocore, aiohttp and builtin connection/timeout errors.
_TRANSIENT_NAMES = frozenset({
    "ConnectionError", "TimeoutError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError", "ClientOSError",
    "ClientPayloadError", "ServerTimeoutError", "ProxyConnectionError", "IncompleteReadError",
})  # fmt: skip


#: S3 error codes that mean "try again later" (throttling, an overloaded or failing server): botocore
#: retries them ``storage.max_attempts`` times; past that they surface as a ``ClientError`` with the code, or
#: through s3fs as an ``OSError`` raised from it (``s3fs.errors.translate_boto_error``).
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "ServiceUnavailable",
    "InternalError", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "500", "502", "503", "504",
})  # fmt: skip


def _is_transient_response(error: BaseException) -> bool:
    """Whether ``error`` carries a botocore error response that says "try again later" (by its error
    code, or an HTTP status of 429 or 5xx)."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return False
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in _TRANSIENT_CODES or (isinstance(status, int) and (status == 429 or status >= 500))


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a connection or timeout failure, or
    throttling or a server error of the object store that outlasted botocore's retries."""
    seen = 0
    while error is not None and seen < 8:
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__):
            return True
        if _is_transient_response(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def s3_options(storage: StorageConfig) -> dict[str, Any]:
    """``s3fs.S3FileSystem`` keyword arguments for ``storage``; unset fields are left to the AWS chain.

    botocore retries each request (``max_attempts``, ``retry_mode``: exponential backoff with jitter) and
    bounds connects and reads by the configured timeouts, so a short outage of the store is ridden out.
    """
    options: dict[str, Any] = {
        "anon": storage.anon,
        "config_kwargs": {
            "retries": {"max_attempts": storage.max_attempts, "mode": storage.retry_mode},
            "connect_timeout": storage.connect_timeout,
            "read_timeout": storage.read_timeout,
        },
    }
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    if storage.region:
        options["client_kwargs"] = {"region_name": storage.region}
    return options


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path on it (no protocol; local paths made absolute).

    Instances are cached by fsspec (one per set of options per process), so calling this per row is cheap.
    """
    scheme, rest = split_uri(uri)
    if scheme in LOCAL_SCHEMES:
        return fsspec.filesystem("file"), _local_path(rest)
    if scheme in S3_SCHEMES:
        import s3fs

        path = rest.rstrip("/")
        if not path:
            raise ValueError(f"S3 URI without a bucket: {uri!r}")
        return s3fs.S3FileSystem(**s3_options(storage or StorageConfig())), path
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")


def arrow_filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem (for pyarrow/Ray Data reads and writes) and the path on it.

    S3 goes through s3fs wrapped in ``PyFileSystem(FSSpecHandler(...))``: one code path that honours the
    configured endpoint, region and anonymous access exactly as :func:`filesystem` does.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, storage)
    if is_local(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Full URI of ``path`` on ``fs``: ``s3://bucket/key``, or an absolute path for local files."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return _local_path(path)
    scheme, rest = split_uri(path)
    return f"{protocols[0]}://{rest if scheme else path}"


def uri_join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (``uri_join("s3://b/root/", "x/y.jpg")`` → ``s3://b/root/x/y.jpg``)."""
    scheme, rest = split_uri(uri)
    joined = posixpath.join(rest, *(p.lstrip("/") for p in parts if p))
    return f"{scheme}://{joined}" if scheme else joined


def make_dirs(uri: str, storage: StorageConfig | None = None) -> None:
    """Make the folder ``uri`` and its parents on local disk; nothing on object storage.

    An object store needs no folders, and s3fs's ``makedirs``/``mkdir`` create a missing *bucket*: a
    misspelt output bucket would become a new one with default policies. Never call them on S3.
    """
    if is_local(uri):
        fs, path = filesystem(uri, storage)
        fs.makedirs(path, exist_ok=True)


class OutputUnavailable(RuntimeError):
    """An output location cannot be written: its bucket is missing, or writing or deleting there fails."""


#: Name prefix of the empty object :func:`check_output_location` writes and deletes (hidden: ``.``).
PROBE_PREFIX = ".u2s-write-probe-"


def bucket_of(uri: str) -> str | None:
    """The bucket of an object-storage URI (``s3://bucket/prefix`` → ``bucket``); None for local paths."""
    if is_local(uri):
        return None
    return split_uri(uri)[1].strip("/").split("/", 1)[0]


def check_output_location(uri: str, storage: StorageConfig | None = None) -> None:
    """Fail fast unless ``uri`` can take output, creating no bucket: on S3 the bucket must exist
    (HeadBucket), then an empty probe object is written under the prefix and deleted again (what a run,
    ``--resume`` and ``overwrite`` do there). A local folder is made if missing and probed the same way.

    Raises :class:`OutputUnavailable` with a one-line reason naming the bucket or location.
    """
    fs, path = filesystem(uri, storage)
    bucket = bucket_of(uri)
    if bucket is None:
        try:
            make_dirs(uri, storage)
        except OSError as e:
            raise OutputUnavailable(f"cannot create the output folder {uri} ({type(e).__name__})") from None
    else:
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise OutputUnavailable(
                f"bucket {bucket!r} (of {uri}) does not exist; u2s never creates buckets: check the "
                "name, or create it with the access policy this output needs"
            ) from None
        except PermissionError:
            pass  # no s3:ListBucket on it: the probe write below tells whether the output is usable
        except Exception as e:
            if is_transient(e):
                raise OutputUnavailable(f"cannot reach the storage of {uri} ({type(e).__name__})") from None
            raise OutputUnavailable(f"cannot check bucket {bucket!r} of {uri} ({type(e).__name__})") from None
        fs.invalidate_cache(path)
    probe = f"{path.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
    except Exception as e:
        raise OutputUnavailable(f"cannot write to {uri} ({type(e).__name__})") from None
    try:
        fs.rm_file(probe)
    except Exception as e:
        raise OutputUnavailable(
            f"cannot delete from {uri} ({type(e).__name__}); --resume and output.overwrite delete files "
            f"there (remove the empty probe object {PROBE_PREFIX}* by hand)"
        ) from None
    finally:
        fs.invalidate_cache(path)


def write_json(uri: str, storage: StorageConfig | None, record: dict[str, Any]) -> str:
    """Write ``record`` as indented JSON at ``uri`` (local or s3://; local parent folders made, no
    bucket ever created); returns ``uri``."""
    import json

    fs, path = filesystem(uri, storage)
    parent = posixpath.dirname(path)
    if parent and is_local(uri):
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=False, default=str)
    return uri


def read_json(uri: str, storage: StorageConfig | None) -> dict[str, Any] | None:
    """The JSON object at ``uri``, or None when there is none."""
    import json

    fs, path = filesystem(uri, storage)
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
