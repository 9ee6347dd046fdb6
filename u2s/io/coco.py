"""COCO instances JSON → ``(image id, file name)`` pairs, streamed.

A COCO annotation file holds every polygon of every object, and reaches hundreds of MB (COCO 2017 train:
448 MB); only its ``images`` array matters to u2s. ijson parses the file as it is read (its C backend,
yajl2_c), so memory stays at one image entry plus read buffers whatever the file's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from u2s.config import StorageConfig
from u2s.io.errors import InputError
from u2s.io.storage import filesystem

#: Read buffer of remote files (s3fs's default block is 50 MiB).
_BLOCK_SIZE = 8 * 2**20


def iter_coco_images(uri: str, storage: StorageConfig) -> Iterator[tuple[str, str]]:
    """``(str(id), file_name)`` of each entry of the ``images`` array of the COCO JSON at ``uri``.

    ``uri`` is a local path or ``s3://`` URI (``.gz`` and other compressions fsspec knows are inferred
    from the suffix). Raises :class:`~u2s.io.errors.InputError` for a missing file, invalid JSON, a file
    without an ``images`` array, or an entry without ``id`` or ``file_name`` (naming the entry's index).
    An empty ``images`` array yields nothing.
    """
    import ijson

    fs, path = filesystem(uri, storage)
    try:
        file = fs.open(path, "rb", block_size=_BLOCK_SIZE, compression="infer")
    except FileNotFoundError:
        raise InputError(f"COCO annotations not found: {uri}") from None
    with file:
        found = 0
        try:
            for index, image in enumerate(ijson.items(file, "images.item", use_float=True)):
                yield _entry(image, index, uri)
                found += 1
        except (ijson.JSONError, UnicodeDecodeError) as e:
            raise InputError(f"COCO annotations are not valid JSON: {uri} ({type(e).__name__})") from None
        if not found:
            file.seek(0)
            _check_images_array(file, uri)


def _entry(image: Any, index: int, uri: str) -> tuple[str, str]:
    if not isinstance(image, dict) or image.get("id") is None or not image.get("file_name"):
        raise InputError(f"COCO image entry #{index} has no 'id' or no 'file_name' in {uri}")
    return str(image["id"]), str(image["file_name"])


def _check_images_array(file, uri: str) -> None:
    """Nothing was yielded: fine for ``"images": []``, an error when there is no such array."""
    import ijson

    try:
        for prefix, event, _ in ijson.parse(file):
            if prefix == "images":
                if event == "start_array":
                    return
                break
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise InputError(f"COCO annotations are not valid JSON: {uri} ({type(e).__name__})") from None
    raise InputError(f"COCO annotations have no 'images' list: {uri}")
