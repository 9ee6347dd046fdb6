"""Folder listings fan out: a flat folder or S3 prefix is listed by several tasks (a shard size set small
here), every file once, with the ids and fingerprint that one listing of the whole folder gives."""

from __future__ import annotations

import pyarrow as pa
import pytest

from u2s.config import InputConfig, Resources, StorageConfig
from u2s.io import fanout
from u2s.io.ids import IdKey
from u2s.io.listing import list_input, plan_shards, top_folders

RESOURCES = Resources(batch_size=4, num_cpus=0.5)
LOCAL = StorageConfig()
KEY = IdKey.generate()
SMALL = 4  # files per listing task in these tests

#: Flat names of several patterns (a counter, hex, odd characters): the ranges must cover any key.
FLAT = [f"img_{i:04d}.png" for i in range(23)] + [
    "0a3f.png", "ff01.png", "Zebra.png", "_under.png", "a b.png", "~tilde.png", "é-accent.png", "Ω.png",
]  # fmt: skip
NESTED = ["sub/deep/x.png", "sub/y.png", "sub2/z.png"]
OTHER = ["notes.txt", ".hidden.png", "sub/.cache/k.png"]


def _tables(listing) -> list[pa.Table]:
    import ray

    return ray.get(listing.dataset.to_arrow_refs())


def _assert_fanned_out(small, whole, expected: set[str]) -> None:
    tables = [t for t in _tables(small) if t.num_rows]
    sources = [s for t in tables for s in t.column("source").to_pylist()]
    assert small.shards == len(tables) > len(expected) // SMALL  # several tasks' tables
    assert all(t.num_rows <= SMALL for t in tables)
    assert all(t.column("source").to_pylist() == sorted(t.column("source").to_pylist()) for t in tables)
    assert len(sources) == len(set(sources)) and set(sources) == expected  # disjoint, and all of them
    assert small.rows == whole.rows == len(expected) and small.fingerprint == whole.fingerprint
    ids = {r["source"]: r["id"] for t in tables for r in t.to_pylist()}
    assert ids == {r["source"]: r["id"] for r in whole.dataset.take_all()}
    assert small.skipped_extensions == whole.skipped_extensions == {".txt": 1}


def test_flat_local_folder_is_listed_in_bounded_shards(tmp_path, ray_cluster, monkeypatch) -> None:
    for name in FLAT + NESTED + OTHER:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    cfg = InputConfig(uri=str(tmp_path), format="class_folders")
    assert [s.kind for s in plan_shards(cfg, LOCAL)] == ["dir"]  # the driver lists nothing
    whole = list_input(cfg, LOCAL, RESOURCES, KEY)
    monkeypatch.setattr(fanout, "SHARD_ROWS", SMALL)
    small = list_input(cfg, LOCAL, RESOURCES, KEY)
    _assert_fanned_out(small, whole, {str(tmp_path / name) for name in FLAT + NESTED})
    labels = {r["source"]: r["label"] for r in small.dataset.take_all()}
    assert (
        labels[str(tmp_path / "sub/deep/x.png")] == "deep"
        and labels[str(tmp_path / "Ω.png")] == tmp_path.name
    )
    assert top_folders(cfg, LOCAL) == ["sub", "sub2"] and top_folders(cfg, LOCAL, max_entries=5) is None


def test_flat_s3_prefix_is_listed_by_key_ranges(s3_endpoint, s3_bucket, ray_cluster, monkeypatch) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    for name in FLAT + NESTED + OTHER + ["sub/"]:  # "sub/": a folder marker, not a file
        s3.put_object(Bucket=bucket, Key=f"in/{name}", Body=b"x")
    s3.put_object(Bucket=bucket, Key="in.png", Body=b"x")  # beside the prefix, not in it
    storage = StorageConfig(endpoint_url=s3_endpoint)
    cfg = InputConfig(uri=f"{s3_bucket}/in")
    assert [s.kind for s in plan_shards(cfg, storage)] == ["range"]
    whole = list_input(cfg, storage, RESOURCES, KEY)
    monkeypatch.setattr(fanout, "SHARD_ROWS", SMALL)
    small = list_input(cfg, storage, RESOURCES, KEY)
    _assert_fanned_out(small, whole, {f"{s3_bucket}/in/{name}" for name in FLAT + NESTED})
    assert [r["source"] for r in small.dataset.take_all()] == sorted(
        f"{s3_bucket}/in/{n}" for n in FLAT + NESTED
    )
    assert top_folders(cfg, storage) == ["sub", "sub2"]


@pytest.mark.parametrize(
    ("first", "last", "upto"),
    [
        ("p/img_0000.png", "p/img_0099.png", None),
        ("p/a", "p/a", "p/b"),
        ("p/0a", "p/0f", None),
        ("p/~", "p/~~", None),
    ],
)
def test_split_points_lie_inside_the_rest_of_the_range(first, last, upto) -> None:
    points = fanout.split_points(first, last, upto, floor=2)
    assert points == sorted(set(points)) and len(points) <= fanout.SPLIT_WIDTH
    assert all(p > last and (upto is None or p < upto) and p.startswith("p/") for p in points)
