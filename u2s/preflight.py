"""Checks made before Ray starts: what would otherwise fail minutes later, inside an actor, in a traceback.

Each failed check raises :class:`PreflightError` with one line that names the setting and the fix:

- **models**: a model given as a local folder (``/``, ``~``, ``./`` paths) must exist, for every model the
  job loads (stage-1 calls on local engines, the editors of every edit attempt). Hub ids and ``s3://``
  models are resolved where they load (a hub id may be cached, an object store is staged per node).
- **storage**: every ``s3://`` location of the job (input, both outputs) is reached once with short
  timeouts and no retries, so missing credentials, an unreachable endpoint or a denied bucket are named
  in seconds, not after botocore's retries.
- **input**: the input location (or the COCO annotation file) exists.

The output locations themselves (bucket exists, a probe can be written and deleted) are checked by
:func:`u2s.io.writers.prepare_outputs`, which runs next, also before Ray.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from u2s.io.storage import bucket_of, filesystem, split_uri

if TYPE_CHECKING:
    from u2s.config import JobConfig, ModelConfig, StorageConfig

#: Seconds to open a connection to the object store while checking (the job's own settings apply later).
CONNECT_TIMEOUT_S = 3.0
#: Seconds to wait for the object store's answer while checking.
READ_TIMEOUT_S = 10.0

_PATH_PREFIXES = ("/", "~", "./", "../")


class PreflightError(ValueError):
    """The job cannot start; the message is one line with the fix."""


def models_in_use(cfg: JobConfig) -> dict[str, ModelConfig]:
    """The models this job loads itself, by config field: stage-1 models on local engines (none when
    ``input.stage1_from`` takes stage 1's results from an earlier run), every editor."""
    from u2s.pipeline import stage1_pools

    models: dict[str, ModelConfig] = {}
    for pool in stage1_pools(cfg):
        if pool.engine != "http":
            name = "vlm" if pool.vision else "llm"
            models[f"stage1.{name}.model"] = getattr(cfg.stage1, name)
    attempts = cfg.stage2.verify.max_attempts if cfg.stage2.verify.enabled else 1
    for attempt in range(1, attempts + 1):
        editor = cfg.stage2.attempt(attempt).editor
        settings = getattr(cfg.stage2, editor, None)
        model = getattr(settings, "model", None)
        if model is not None and hasattr(model, "model"):
            models[f"stage2.{editor}.model.model"] = model
    return models


def _tiny_models_hint(path: str) -> str:
    """The command that builds the tiny random models, when ``path`` is where they should be."""
    folder = os.path.dirname(path.rstrip("/"))
    expected = os.environ.get("U2S_TINY_MODELS")
    if os.path.basename(folder) == "tiny-models" or (expected and os.path.abspath(expected) == folder):
        return (
            f": build the tiny models there with `u2s tiny-models {folder}` (make demo does), or set "
            "U2S_TINY_MODELS to the folder that holds them"
        )
    return ": check the path, or give a Hugging Face model id"


def check_models(cfg: JobConfig) -> None:
    """Every local model folder the job loads exists (see the module docstring)."""
    for field, model in models_in_use(cfg).items():
        location = model.model
        if not location.startswith(_PATH_PREFIXES):
            continue
        path = os.path.expanduser(location)
        if not os.path.isdir(path):
            raise PreflightError(f"{field}: no model folder at {path}{_tiny_models_hint(path)}")


def _quick(storage: StorageConfig) -> StorageConfig:
    return storage.model_copy(
        update={"max_attempts": 1, "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}
    )


def _names(error: BaseException) -> set[str]:
    """Class names along ``error``'s type and cause chain."""
    names: set[str] = set()
    seen = 0
    while error is not None and seen < 8:
        names.update(cls.__name__ for cls in type(error).__mro__)
        error, seen = error.__cause__ or error.__context__, seen + 1
    return names


def _storage_problem(uri: str, storage: StorageConfig, error: BaseException) -> str:
    names = _names(error)
    endpoint = storage.endpoint_url or "AWS S3"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return (
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE (or storage.anon=true for a public bucket)"
        )
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ReadTimeoutError",
                "ClientConnectorError", "TimeoutError"}:  # fmt: skip
        return (
            f"cannot reach {endpoint} for {uri} within {CONNECT_TIMEOUT_S:g} s: check storage.endpoint_url "
            "and the network"
        )
    if "PermissionError" in names:
        return f"access to {uri} is denied with the credentials found: check the bucket policy and the role"
    return f"cannot reach {uri} ({type(error).__name__})"


def check_storage(cfg: JobConfig) -> None:
    """Each bucket of the job answers, quickly (see the module docstring)."""
    storage = _quick(cfg.storage)
    uris = [cfg.input.stage1_from or cfg.input.uri, cfg.output.uri, cfg.output.sensitive_uri]
    checked: set[str] = set()
    for uri in uris:
        bucket = bucket_of(uri)
        if bucket is None or bucket in checked:
            continue
        checked.add(bucket)
        fs, _ = filesystem(uri, storage)
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            continue  # a missing bucket: the input or output check names it
        except Exception as e:
            if "PermissionError" in _names(e) and "NoCredentialsError" not in _names(e):
                continue  # no s3:ListBucket: the output probe and the listing decide
            raise PreflightError(_storage_problem(uri, cfg.storage, e)) from None


def check_input(cfg: JobConfig) -> None:
    """The input location exists (and the COCO annotation file, for ``coco``); with ``input.stage1_from``,
    the earlier run's sensitive output instead."""
    storage = _quick(cfg.storage)
    required = [("input.uri", cfg.input.uri)]
    if cfg.input.stage1_from:
        required = [("input.stage1_from", cfg.input.stage1_from)]
    elif cfg.input.format == "coco" and cfg.input.coco_annotations:
        required.append(("input.coco_annotations", cfg.input.coco_annotations))
    for field, uri in required:
        fs, path = filesystem(uri, storage)
        try:
            found = fs.exists(path)
        except Exception as e:
            raise PreflightError(_storage_problem(uri, cfg.storage, e)) from None
        if not found:
            where = "folder or file" if split_uri(uri)[0] in ("", "file") else "prefix or object"
            raise PreflightError(f"{field}: no {where} at {uri}")


def check_job(cfg: JobConfig) -> None:
    """Every check of this module, the data's locations first; raises :class:`PreflightError`."""
    check_storage(cfg)
    check_input(cfg)
    check_models(cfg)
