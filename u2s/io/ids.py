"""Row ids that confirm nothing: a keyed hash of each source, with a secret kept beside the sensitive table.

A row id derived from a path must not let anyone who guesses the path (``.../patients/jane_doe/scan1.png``)
confirm that the image is in the dataset and find its row. With ``input.id: keyed`` (the default) an id is
the HMAC-SHA256 of the source under a per-output secret key, truncated to 20 hex characters like the
unkeyed ids (``source_hash``, the SHA-1 of the source, which anyone can recompute). The key is generated
when an output is first written (a fresh output, ``overwrite`` included, gets a fresh key) and stored only
beside the sensitive table, as :data:`ID_KEY_NAME`, before any row; ``--resume`` reads it back, so resumed
rows get the same ids. Only the sensitive table maps an id back to its source.

The key never appears in a config, a run record or a log line: :class:`IdKey` prints as ``IdKey(...)``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from u2s.config import InputConfig, OutputConfig, StorageConfig
from u2s.io.errors import InputError
from u2s.io.storage import filesystem, is_local, uri_join

#: The key's file name, directly under ``output.sensitive_uri`` (hidden from table listings by its ``_``).
ID_KEY_NAME = "_id_key"
KEY_BYTES = 32
ID_CHARS = 20


class IdKeyError(InputError):
    """The id key of an output is missing or unreadable where ids must match earlier rows."""


@dataclass(frozen=True)
class IdKey:
    """A secret id key. Travels to the listing tasks as a task argument; never printed."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("an id key has at least 16 bytes")

    @classmethod
    def generate(cls) -> IdKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def __repr__(self) -> str:
        return "IdKey(...)"


def source_hash(text: str) -> str:
    """Unkeyed id: the first 20 hex characters of the SHA-1 of ``text`` (anyone can recompute it)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:ID_CHARS]


def keyed_hash(key: IdKey, text: str) -> str:
    """Keyed id: the first 20 hex characters of HMAC-SHA256(key, ``text``)."""
    return hmac.new(key.secret, text.encode("utf-8"), hashlib.sha256).hexdigest()[:ID_CHARS]


def id_function(input: InputConfig, key: IdKey | None) -> Callable[[str], str]:
    """How ids are derived from a source string (a URI, or ``file#row``) under ``input.id``.

    ``column`` inputs take ids from the data; their hashed fallbacks (a Parquet file whose id column is
    unreadable) are keyed when a key is given.
    """
    if input.id == "source_hash":
        return source_hash
    if key is not None:
        return lambda text: keyed_hash(key, text)
    if input.id == "keyed":
        raise IdKeyError("input.id: keyed needs the output's id key (written beside the sensitive table)")
    return source_hash


def needs_key(input: InputConfig) -> bool:
    return input.id == "keyed"


def key_uri(sensitive_uri: str) -> str:
    return uri_join(sensitive_uri, ID_KEY_NAME)


def read_id_key(sensitive_uri: str, storage: StorageConfig) -> IdKey | None:
    """The id key stored beside the sensitive table at ``sensitive_uri``, or None when there is none."""
    fs, path = filesystem(key_uri(sensitive_uri), storage)
    fs.invalidate_cache(path)
    try:
        text = fs.cat_file(path).decode("ascii").strip()
    except FileNotFoundError:
        return None
    try:
        return IdKey(bytes.fromhex(text))
    except ValueError:
        raise IdKeyError(f"the id key {key_uri(sensitive_uri)} is not a hex key") from None


def write_id_key(sensitive_uri: str, storage: StorageConfig, key: IdKey) -> None:
    """Store ``key`` beside the sensitive table (a local file is readable by its owner only)."""
    uri = key_uri(sensitive_uri)
    data = (key.secret.hex() + "\n").encode("ascii")
    fs, path = filesystem(uri, storage)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    fs.pipe_file(path, data)


def _has_rows(uri: str, storage: StorageConfig) -> bool:
    """Whether the safe table at ``uri`` holds a committed file (a safe file commits its rows)."""
    fs, path = filesystem(uri, storage)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return False
    names = (entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    return any(name.endswith(".parquet") and not name.startswith((".", "_")) for name in names)


def output_id_key(
    input: InputConfig, output: OutputConfig, storage: StorageConfig, resume: bool
) -> IdKey | None:
    """The key a run's ids are made with, stored beside the sensitive table before any row is written
    (None when ``input.id`` needs no key). Call it after the outputs are prepared.

    A fresh output gets a fresh key (``overwrite`` too: the old rows and their ids are gone), or the key
    of the run ``input.id_key_from`` names. A resumed one reuses its stored key; if there is none while
    rows were written already, their ids cannot be matched and :class:`IdKeyError` is raised
    (``--force`` cannot help).
    """
    if not needs_key(input):
        return None
    sensitive_uri = output.sensitive_uri
    if resume:
        key = read_id_key(sensitive_uri, storage)
        if key is not None:
            return key
        if _has_rows(output.uri, storage):
            raise IdKeyError(
                f"cannot resume with input.id: keyed: there is no id key at {key_uri(sensitive_uri)}, so "
                "the ids of new rows would not match the rows already written (were they written with "
                "input.id: source_hash?); resume with the same input.id, or write to a new output"
            )
    key = IdKey.generate()
    if input.id_key_from:  # another run's key, so that the two runs' ids match
        key = read_id_key(input.id_key_from, storage)
        if key is None:
            raise IdKeyError(f"input.id_key_from: no id key at {key_uri(input.id_key_from)}")
    write_id_key(sensitive_uri, storage, key)
    return key
