"""WebDataset tar shards through real Ray, local and on a real S3 server (moto): samples grouped by key,
the image member chosen by `input.extensions`, labels from members, damaged tars as error rows."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from u2s.config import InputConfig, Resources, StorageConfig
from u2s.io.ids import IdKey, keyed_hash
from u2s.io.listing import list_input
from u2s.io.readers import InputError, read_listing, read_source
from u2s.io.storage import filesystem, uri_join
from u2s.io.webdataset import split_name
from u2s.schema import WORKING_SCHEMA

RESOURCES = Resources(batch_size=2, num_cpus=0.5)
LOCAL = StorageConfig()
KEY = IdKey.generate()


def image(seed: int, fmt: str = "PNG", size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 11 % 256, seed % 256)).save(buf, fmt)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, content)`` members in order (what WebDataset writers produce)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data := tar_bytes(members))
    return data


def rows_of(ds) -> list[dict]:
    rows = ds.take_all()
    assert ds.schema().base_schema == WORKING_SCHEMA
    return sorted(rows, key=lambda r: r["source"])


def test_member_names_split_into_key_and_extension() -> None:
    assert split_name("a/b.seg.PNG") == ("a/b", "seg.png")
    assert split_name("000010.jpg") == ("000010", "jpg")
    assert split_name("README") is None and split_name(".hidden") is None and split_name("a/b.") is None


def test_samples_by_key_with_preferred_image_labels_and_error_rows(tmp_path, ray_cluster) -> None:
    a = tmp_path / "shards" / "a.tar"
    pictures = {"s0": image(0, "JPEG"), "s1": image(1, "JPEG"), "dir/s2": image(2), "s5": image(5, "JPEG")}
    write_tar(a, [
        ("s0.jpg", pictures["s0"]), ("s0.txt", b" cat \n"), ("s0.json", b'{"label": "feline", "n": 1}'),
        ("s1.png", image(9)), ("s1.jpg", pictures["s1"]), ("s1.txt", b"dog"),  # jpg comes first
        ("dir/s2.png", pictures["dir/s2"]), ("dir/s2.json", b'{"n": 2}'),
        ("s3.json", b"{}"), ("s3.txt", b"metadata only"),  # no image: skipped, counted
        ("s4.mp4", b"\0\0\0 ftyp"), ("s4.txt", b"video"),  # a sample without an image: an error row
        ("s5.JPEG", pictures["s5"]), ("NOEXT", b"x"),
    ])  # fmt: skip
    b = tmp_path / "shards" / "more" / "b.tar"
    pictures["t0"] = image(7, "WEBP")
    write_tar(b, [("t0.webp", pictures["t0"]), ("t0.txt", b"bird")])
    write_tar(tmp_path / "shards" / "_tmp.tar", [("x0.jpg", image(3))])  # in-progress writes: not read
    (tmp_path / "shards" / "notes.md").write_text("not a shard")

    cfg = InputConfig(uri=str(tmp_path / "shards"), format="webdataset", label_member="txt")
    listing = list_input(cfg, LOCAL, RESOURCES, KEY)
    assert listing.shards == 2 and listing.rows == 6
    assert listing.skipped_extensions == {"webdataset: sample without image": 1, "(none)": 1}
    rows = rows_of(read_listing(listing, cfg, LOCAL, RESOURCES))
    shard_of = {"t0": b}
    by_key = {r["source"].rpartition("#")[2]: r for r in rows}
    assert sorted(by_key) == ["dir/s2", "s0", "s1", "s4", "s5", "t0"]
    for key, row in by_key.items():
        assert row["source"] == f"{shard_of.get(key, a)}#{key}"
        assert row["id"] == keyed_hash(KEY, row["source"])
    for key, data in pictures.items():
        assert by_key[key]["image"]["bytes"] == data and by_key[key]["status"] is None, key
    assert [by_key[k]["label"] for k in ("s0", "s1", "dir/s2", "t0")] == ["cat", "dog", None, "bird"]
    assert by_key["s4"]["status"] == "error" and by_key["s4"]["error"] == "read: no image member"
    assert by_key["s4"]["image"]["bytes"] is None

    # Keys as ids, a JSON field as the label, one shard file as the input.
    cfg = InputConfig(uri=str(a), format="webdataset", id="column", label_member="json:label")
    rows = rows_of(read_source(cfg, LOCAL, RESOURCES))
    assert {r["id"]: r["label"] for r in rows} == {"s0": "feline", "s1": None, "dir/s2": None, "s4": None,
                                                   "s5": None}  # fmt: skip


def test_truncated_tars_list_what_they_can_and_the_rest_are_error_rows(tmp_path, ray_cluster) -> None:
    pictures = [image(i, size=(40, 40)) for i in range(4)]
    members = [m for i, p in enumerate(pictures) for m in ((f"k{i}.png", p), (f"k{i}.txt", b"x"))]
    data = write_tar(tmp_path / "full.tar", members)
    k2_data = data.index(pictures[2])
    (tmp_path / "cut" / "in-data").mkdir(parents=True)
    (tmp_path / "cut" / "in-data" / "a.tar").write_bytes(data[: k2_data + 50])  # inside k2.png's bytes
    (tmp_path / "cut" / "in-header").mkdir()
    k3_header = data.index(pictures[3]) - 512
    (tmp_path / "cut" / "in-header" / "a.tar").write_bytes(data[: k3_header + 100])  # inside k3's header

    for case, readable, unreadable in (
        ("in-data", ["k0", "k1"], ["k2"]),
        ("in-header", ["k0", "k1", "k2"], []),
    ):
        shard = tmp_path / "cut" / case / "a.tar"
        cfg = InputConfig(uri=str(shard.parent), format="webdataset", id="source_hash")
        listing = list_input(cfg, LOCAL, RESOURCES)
        assert listing.unreadable_files == 1
        rows = rows_of(read_listing(listing, cfg, LOCAL, RESOURCES))
        sources = [r["source"] for r in rows]
        assert len(sources) == len(set(sources)) == len(readable) + len(unreadable) + 1, case
        by_source = {r["source"]: r for r in rows}
        for key in readable:
            row = by_source[f"{shard}#{key}"]
            assert row["image"]["bytes"] == pictures[int(key[1])] and row["status"] is None, (case, key)
        for key in unreadable:  # listed (its header was read), its bytes cut off
            row = by_source[f"{shard}#{key}"]
            assert (
                row["status"] == "error"
                and row["error"] == "read: ReadError"
                and row["image"]["bytes"] is None
            )
        rest = by_source[str(shard)]  # what follows the damage is unknown: one row stands for it
        assert rest["error"] == "read: unreadable tar (ReadError)" and rest["image"]["bytes"] is None


def test_a_shard_cut_after_listing_gives_an_error_row_per_unread_sample(tmp_path, ray_cluster) -> None:
    pictures = [image(i, size=(40, 40)) for i in range(5)]
    shard = tmp_path / "s" / "0.tar"
    data = write_tar(shard, [(f"{i:03d}.png", p) for i, p in enumerate(pictures)])
    cfg = InputConfig(uri=str(shard.parent), format="webdataset")
    listing = list_input(cfg, LOCAL, RESOURCES, KEY)
    assert listing.rows == 5 and listing.unreadable_files == 0
    shard.write_bytes(data[: data.index(pictures[2]) + 10])  # the shard changes before the fetch
    rows = rows_of(read_listing(listing, cfg, LOCAL, RESOURCES))
    assert [r["source"] for r in rows] == [f"{shard}#{i:03d}" for i in range(5)]  # each sample once
    assert [r["image"]["bytes"] for r in rows[:2]] == pictures[:2] and rows[0]["status"] is None
    assert [r["error"] for r in rows[2:]] == ["read: ReadError"] * 3
    assert all(r["image"]["bytes"] is None for r in rows[2:])


def test_webdataset_on_s3_and_a_resumed_run_opens_only_unfinished_shards(
    s3_endpoint, s3_bucket, ray_cluster
) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    pictures = {f"{s}/{i}": image(10 * n + i) for n, s in enumerate(("a", "b")) for i in range(3)}
    fs, _ = filesystem(s3_bucket, storage)
    for shard in ("a", "b"):
        members = [(f"{k.split('/')[1]}.png", data) for k, data in pictures.items() if k.startswith(shard)]
        fs.pipe(filesystem(uri_join(s3_bucket, "wds", f"{shard}.tar"), storage)[1], tar_bytes(members))
    cfg = InputConfig(uri=uri_join(s3_bucket, "wds"), format="webdataset")
    listing = list_input(cfg, storage, RESOURCES, KEY)
    assert listing.shards == 2 and listing.rows == 6
    rows = rows_of(read_listing(listing, cfg, storage, RESOURCES))
    got = {f"{r['source'].rsplit('/', 1)[1][0]}/{r['source'].rpartition('#')[2]}": r for r in rows}
    assert {k: r["image"]["bytes"] for k, r in got.items()} == pictures
    assert all(r["source"].startswith(f"{s3_bucket}/wds/") for r in rows)

    # A resumed run: shard a finished, then deleted; no fetch may open it.
    done = pa.array([r["id"] for k, r in got.items() if k.startswith("a/")])
    fs.rm(filesystem(uri_join(s3_bucket, "wds", "a.tar"), storage)[1])
    rows = rows_of(read_listing(listing, cfg, storage, RESOURCES, done))
    assert sorted(r["source"] for r in rows) == [f"{s3_bucket}/wds/b.tar#{i}" for i in range(3)]
    assert all(r["status"] is None for r in rows)


def test_webdataset_config_and_input_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="label_member"):
        InputConfig(uri="/x", format="parquet", label_member="txt")
    with pytest.raises(ValueError, match="id_column"):
        InputConfig(uri="/x", format="webdataset", id_column="key")
    assert InputConfig(uri="/x", format="webdataset", id="column").id == "column"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(InputError, match=r"no \.tar shards"):
        list_input(InputConfig(uri=str(tmp_path / "empty"), format="webdataset"), LOCAL, RESOURCES, KEY)
