"""iter_coco_images: COCO JSON streamed from local disk and a real S3 server, errors, and a memory bound."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from u2s.config import StorageConfig
from u2s.io.coco import iter_coco_images
from u2s.io.errors import InputError
from u2s.io.storage import filesystem, uri_join

LOCAL = StorageConfig()


def coco(images: list[dict], annotations: int = 2) -> dict:
    """A COCO instances document as the official files lay it out (info and licenses first)."""
    return {
        "info": {"description": "test", "year": 2017},
        "licenses": [{"id": 1, "name": "CC BY 4.0"}],
        "images": images,
        "annotations": [
            {"id": i, "image_id": i % 7, "bbox": [1.5, 2, 3, 4], "segmentation": [[1.0, 2.0, 3.5, 4.0]]}
            for i in range(annotations)
        ],
        "categories": [{"id": 1, "name": "person"}],
    }


IMAGES = [
    {"id": 139, "file_name": "000000000139.jpg", "width": 640, "height": 426},
    {"id": 285, "file_name": "sub/000000000285.jpg", "width": 586, "height": 640},
    {"id": "a-7", "file_name": "named id.png"},
]
EXPECTED = [("139", "000000000139.jpg"), ("285", "sub/000000000285.jpg"), ("a-7", "named id.png")]


def test_local_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco(IMAGES)))
    assert list(iter_coco_images(str(path), LOCAL)) == EXPECTED


def test_images_after_annotations_and_gzip(tmp_path):
    """Key order is free in JSON; compressed annotation files are read as they are."""
    doc = coco(IMAGES, annotations=50)
    doc = {"annotations": doc.pop("annotations"), **doc}
    path = tmp_path / "instances.json.gz"
    path.write_bytes(gzip.compress(json.dumps(doc).encode()))
    assert list(iter_coco_images(str(path), LOCAL)) == EXPECTED


def test_empty_images_array_yields_nothing(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco([])))
    assert list(iter_coco_images(str(path), LOCAL)) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_n', "not valid JSON"),
        ("\x00\x01 not json", "not valid JSON"),
        (json.dumps({"annotations": [], "categories": []}), "no 'images' list"),
        (json.dumps({"images": {"id": 1, "file_name": "a.jpg"}}), "no 'images' list"),
        (json.dumps([{"id": 1, "file_name": "a.jpg"}]), "no 'images' list"),
        (
            json.dumps(coco([{"id": 1, "file_name": "a.jpg"}, {"file_name": "b.jpg"}])),
            r"entry #1 has no 'id'",
        ),
        (json.dumps(coco([{"id": 1, "file_name": ""}])), r"entry #0 has no 'id' or no 'file_name'"),
        (json.dumps(coco([{"id": None, "file_name": "a.jpg"}])), r"entry #0"),
        (json.dumps(coco(["a.jpg"])), r"entry #0"),
    ],
    ids=[
        "truncated",
        "binary",
        "no-images",
        "images-object",
        "top-level-list",
        "no-id",
        "empty-name",
        "null-id",
        "str",
    ],
)
def test_errors(tmp_path, text, match):
    path = tmp_path / "instances.json"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        list(iter_coco_images(str(path), LOCAL))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"annotations not found: .*absent\.json"):
        list(iter_coco_images(str(tmp_path / "absent.json"), LOCAL))


def test_s3(s3_endpoint, s3_bucket):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    uri = uri_join(s3_bucket, "coco/annotations/instances_val2017.json")
    fs, path = filesystem(uri, storage)
    fs.pipe(path, json.dumps(coco(IMAGES)).encode())
    assert list(iter_coco_images(uri, storage)) == EXPECTED
    with pytest.raises(InputError, match="annotations not found"):
        list(iter_coco_images(uri_join(s3_bucket, "coco/absent.json"), storage))


def write_large_coco(path: Path, images: int, annotations_per_image: int) -> None:
    """A COCO-shaped file written piece by piece (the test process never holds it), polygons included."""
    polygon = json.dumps([[round(100 + 37.3 * (k % 11), 2) for k in range(60)]])
    with path.open("w") as f:
        f.write('{"info": {"year": 2017}, "images": [')
        f.writelines(
            f'{"," if i else ""}{{"id": {i}, "file_name": "{i:012d}.jpg", "width": 640, "height": 480}}'
            for i in range(images)
        )
        f.write('], "annotations": [')
        f.writelines(
            f'{"," if i else ""}{{"id": {i}, "image_id": {i % images}, "segmentation": {polygon}}}'
            for i in range(images * annotations_per_image)
        )
        f.write('], "categories": [{"id": 1, "name": "person"}]}')


def test_memory_stays_far_below_the_file_size(tmp_path):
    """A memory bound, not a timing bound: the traced peak while streaming is < 1/5 of the file."""
    path = tmp_path / "instances_large.json"
    write_large_coco(path, images=30_000, annotations_per_image=2)
    size = path.stat().st_size
    assert size > 20 * 2**20

    tracemalloc.start()
    try:
        count, last = 0, None
        for pair in iter_coco_images(str(path), LOCAL):
            count, last = count + 1, pair
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (count, last) == (30_000, ("29999", "000000029999.jpg"))
    print(f"file {size / 2**20:.1f} MiB, traced peak {peak / 2**20:.2f} MiB")
    assert peak < size / 5
