"""Listing (Ray tasks) and reading on every format, local (tmp_path) and on a real S3 server (moto),
through real Ray: one working row per input record, errors as rows, ids unique."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from u2s.config import InputConfig, Resources, StorageConfig
from u2s.io.ids import IdKey
from u2s.io.listing import list_input
from u2s.io.readers import InputError, drop_done, read_listing, read_source
from u2s.io.storage import filesystem, uri_join
from u2s.schema import IMAGE_TYPE, WORKING_SCHEMA

RESOURCES = Resources(batch_size=3, num_cpus=0.5)
LOCAL = StorageConfig()
KEY = IdKey.generate()  # the output's id key a run would make (input.id: keyed, the default)


def png(seed: int, size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 11 % 256, seed % 256)).save(buf, "PNG")
    return buf.getvalue()


def write_files(root: Path, names: list[str]) -> dict[str, bytes]:
    """Write a distinct small image (or junk, for non-image suffixes) at each relative name."""
    contents = {}
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(i))
        contents[str(path)] = path.read_bytes()
    return contents


def sha20(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def assert_keyed(rows: list[dict]) -> None:
    """Keyed ids: unique, as long as unkeyed ones, and none is the SHA-1 of its source (which anyone who
    guesses the source can compute)."""
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)
    assert not {sha20(r["source"]) for r in rows} & set(ids)


def read(cfg: InputConfig, storage: StorageConfig = LOCAL) -> list[dict]:
    ds = read_source(cfg, storage, RESOURCES, KEY)
    rows = ds.take_all()
    assert ds.schema().base_schema == WORKING_SCHEMA
    return sorted(rows, key=lambda r: r["source"])


def assert_fresh(row: dict) -> None:
    """A row as the reader leaves it: stage outputs all null."""
    for name in ("width", "height", "status", "error", "privacy_flag", "public_caption", "editor", "seed"):
        assert row[name] is None, name


# --------------------------------------------------------------------------------------- local folders

FOLDER = ["a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt", "._a.jpg", ".cache/e.png"]


def test_image_folder_local(tmp_path, ray_cluster) -> None:
    files = write_files(tmp_path / "ds", FOLDER)
    expected = {p: b for p, b in files.items() if not p.endswith(".txt") and "/." not in p}
    cfg = InputConfig(uri=str(tmp_path / "ds"), format="image_folder")
    rows = read(cfg)
    assert [r["source"] for r in rows] == sorted(expected)
    assert_keyed(rows)
    for row in rows:
        assert row["label"] is None
        assert row["image"] == {"bytes": expected[row["source"]], "path": None}  # never the source path
        assert_fresh(row)
    again = read(cfg)
    assert [r["id"] for r in again] == [r["id"] for r in rows]  # stable across reads with the same key
    other = read_source(cfg, LOCAL, RESOURCES, IdKey.generate()).take_all()
    assert not {r["id"] for r in other} & {r["id"] for r in rows}  # another output's key: other ids
    unkeyed = read(cfg.model_copy(update={"id": "source_hash"}))
    assert [r["id"] for r in unkeyed] == [sha20(r["source"]) for r in rows]  # source_hash: as before


def test_class_folders_and_limit(tmp_path, ray_cluster) -> None:
    names = ["cat/1.jpg", "cat/2.jpg", "dog/1.jpg", "dog/x/3.png", "zebra/9.gif"]
    write_files(tmp_path / "caltech", names)
    cfg = InputConfig(uri=str(tmp_path / "caltech"), format="class_folders")
    rows = read(cfg)
    assert [r["label"] for r in rows] == ["cat", "cat", "dog", "x", "zebra"]
    assert_keyed(rows)
    unkeyed = read(cfg.model_copy(update={"id": "source_hash"}))
    assert [r["id"] for r in unkeyed] == [sha20(str(tmp_path / "caltech" / n)) for n in names]
    limited = read(cfg.model_copy(update={"limit": 2}))
    assert [r["source"] for r in limited] == [r["source"] for r in rows[:2]]  # first sources in order


def test_custom_extensions_and_skipped_files_are_counted(tmp_path, ray_cluster) -> None:
    write_files(tmp_path, ["a.jpg", "b.JXL", "c.png", "sub/d.txt", "sub/e.jpg"])
    cfg = InputConfig(uri=str(tmp_path), extensions=["jxl", ".PNG"])
    assert [Path(r["source"]).name for r in read(cfg)] == ["b.JXL", "c.png"]
    listing = list_input(cfg, LOCAL, RESOURCES, KEY)
    assert listing.rows == 2 and listing.skipped_extensions == {".jpg": 2, ".txt": 1}


def test_single_file_uri(tmp_path, ray_cluster) -> None:
    write_files(tmp_path, ["one.jpg", "two.jpg"])
    rows = read(InputConfig(uri=str(tmp_path / "one.jpg")))
    assert [r["source"] for r in rows] == [str(tmp_path / "one.jpg")]


def test_finished_ids_are_dropped_before_any_byte_is_fetched(tmp_path, ray_cluster) -> None:
    write_files(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    cfg = InputConfig(uri=str(tmp_path))
    listing = list_input(cfg, LOCAL, RESOURCES, KEY)
    ids = {Path(r["source"]).name: r["id"] for r in listing.dataset.take_all()}
    done = pa.array([ids["a.jpg"], ids["c.jpg"]])
    (tmp_path / "a.jpg").unlink()  # a fetch of a finished row would now fail: it must not happen
    rows = read_listing(listing, cfg, LOCAL, RESOURCES, done).take_all()
    assert [Path(r["source"]).name for r in rows] == ["b.jpg"] and rows[0]["status"] is None
    manifest = listing.dataset.to_arrow_refs()
    import ray

    kept = pa.concat_tables([drop_done(ray.get(ref), done) for ref in manifest])
    assert kept.column("id").to_pylist() == [ids["b.jpg"]]


def test_file_deleted_after_listing_becomes_an_error_row(tmp_path, ray_cluster) -> None:
    files = write_files(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    ds = read_source(InputConfig(uri=str(tmp_path)), LOCAL, RESOURCES, KEY)  # lazy: only the listing ran
    (tmp_path / "b.jpg").unlink()
    rows = sorted(ds.take_all(), key=lambda r: r["source"])
    assert len(rows) == 3
    gone = rows[1]
    assert gone["source"] == str(tmp_path / "b.jpg")
    assert_keyed(rows)
    assert gone["status"] == "error" and gone["error"] == "read: FileNotFoundError"
    assert gone["image"]["bytes"] is None
    assert rows[0]["image"]["bytes"] == files[str(tmp_path / "a.jpg")] and rows[0]["status"] is None


# ------------------------------------------------------------------------------------------------ COCO


def coco_json(ids_names: list[tuple[int, str]]) -> bytes:
    images = [{"id": i, "file_name": n, "width": 6, "height": 4} for i, n in ids_names]
    return json.dumps({"images": images, "annotations": [], "categories": []}).encode()


def test_coco_local(tmp_path, ray_cluster) -> None:
    files = write_files(tmp_path / "val2014", ["COCO_val2014_000042.jpg", "COCO_val2014_000007.jpg"])
    ann = tmp_path / "annotations" / "instances_val2014.json"
    ann.parent.mkdir()
    ann.write_bytes(
        coco_json([(42, "COCO_val2014_000042.jpg"), (7, "COCO_val2014_000007.jpg"), (9, "missing.jpg")])
    )
    cfg = InputConfig(uri=str(tmp_path / "val2014") + "/", format="coco", coco_annotations=str(ann))
    rows = read(cfg)
    assert [(r["id"], Path(r["source"]).name) for r in rows] == [
        ("7", "COCO_val2014_000007.jpg"), ("42", "COCO_val2014_000042.jpg"), ("9", "missing.jpg"),
    ]  # fmt: skip
    assert {r["label"] for r in rows} == {"val2014"}  # the split name is the class hint
    for row in rows[:2]:
        assert row["image"]["bytes"] == files[row["source"]] and row["status"] is None
    assert rows[2]["error"] == "read: FileNotFoundError" and rows[2]["image"]["bytes"] is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (coco_json([(1, "a.jpg"), (1, "b.jpg")]), "duplicate row id"),
        (b"{not json", "not valid JSON"),
        (b'{"annotations": []}', "no 'images' list"),
        (coco_json([]), "no images found"),
        (b'{"images": [{"id": 3}]}', "entry #0 has no 'id' or no 'file_name'"),
    ],
)
def test_coco_input_errors(tmp_path, content: bytes, match: str) -> None:
    write_files(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    (tmp_path / "ann.json").write_bytes(content)
    cfg = InputConfig(uri=str(tmp_path / "imgs"), format="coco", coco_annotations=str(tmp_path / "ann.json"))
    with pytest.raises(InputError, match=match):
        read_source(cfg, LOCAL, RESOURCES, KEY)


def test_coco_missing_annotations(tmp_path) -> None:
    (tmp_path / "imgs").mkdir()
    cfg = InputConfig(uri=str(tmp_path / "imgs"), format="coco", coco_annotations=str(tmp_path / "nope.json"))
    with pytest.raises(InputError, match=r"annotations not found: .*nope\.json"):
        read_source(cfg, LOCAL, RESOURCES, KEY)


# ------------------------------------------------------------------------------------------- folder errors


def test_missing_root_and_empty_folder(tmp_path) -> None:
    with pytest.raises(InputError, match=f"input not found: {tmp_path}/absent"):
        read_source(InputConfig(uri=str(tmp_path / "absent")), LOCAL, RESOURCES, KEY)
    write_files(tmp_path / "empty", ["readme.txt", ".hidden.jpg"])
    with pytest.raises(InputError, match="no images found in"):
        read_source(InputConfig(uri=str(tmp_path / "empty"), format="class_folders"), LOCAL, RESOURCES, KEY)


# --------------------------------------------------------------------------------------------- Parquet


def hf_table(start: int, n: int, *, with_null: bool = False) -> pa.Table:
    images = [{"bytes": png(start + i), "path": f"img{start + i}.png"} for i in range(n)]
    if with_null:
        images[-1] = {"bytes": None, "path": "external.png"}
    return pa.table(
        {
            "image_id": pa.array([1000 + start + i for i in range(n)], pa.int64()),
            "cls": pa.array([f"class{(start + i) % 2}" for i in range(n)]),
            "pic": pa.array(images, IMAGE_TYPE),
        }
    )


def test_parquet_hf_image_folder_local(tmp_path, ray_cluster) -> None:
    (tmp_path / "pq").mkdir()
    pq.write_table(hf_table(0, 4), tmp_path / "pq" / "train-0.parquet", row_group_size=2)
    pq.write_table(hf_table(4, 3, with_null=True), tmp_path / "pq" / "train-1.parquet")
    (tmp_path / "pq" / "_SUCCESS").write_bytes(b"")
    cfg = InputConfig(
        uri=str(tmp_path / "pq"),
        format="parquet",
        image_column="pic",
        id_column="image_id",
        label_column="cls",
    )
    rows = sorted(read(cfg), key=lambda r: int(r["id"]))
    assert [r["id"] for r in rows] == [str(1000 + i) for i in range(7)]
    assert [r["label"] for r in rows] == [f"class{i % 2}" for i in range(7)]
    first, second = str(tmp_path / "pq" / "train-0.parquet"), str(tmp_path / "pq" / "train-1.parquet")
    expected_sources = [f"{first}#{i}" for i in range(4)] + [f"{second}#{i}" for i in range(3)]
    assert [r["source"] for r in rows] == expected_sources
    for i, row in enumerate(rows[:6]):
        assert row["image"]["bytes"] == png(i) and row["status"] is None
    assert rows[6]["status"] == "error" and rows[6]["error"] == "read: no image bytes"

    limited = read(cfg.model_copy(update={"limit": 5}))
    assert sorted(r["source"] for r in limited) == sorted(expected_sources[:5])


def test_parquet_binary_column_single_file_default_ids(tmp_path, ray_cluster) -> None:
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"image": pa.array([png(i) for i in range(3)], pa.binary())}), path)
    rows = read(InputConfig(uri=str(path), format="parquet"))
    assert [r["source"] for r in rows] == [f"{path}#{i}" for i in range(3)]
    assert_keyed(rows)  # a hash of file + row, keyed like any source
    unkeyed = read(InputConfig(uri=str(path), format="parquet", id="source_hash"))
    assert [r["id"] for r in unkeyed] == [sha20(f"{path}#{i}") for i in range(3)]
    assert [r["image"]["bytes"] for r in rows] == [png(i) for i in range(3)]
    assert all(r["label"] is None for r in rows)


def test_parquet_corrupt_file_gives_an_error_row(tmp_path, ray_cluster) -> None:
    pq.write_table(hf_table(0, 2).select(["pic"]).rename_columns(["image"]), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    rows = read(InputConfig(uri=str(tmp_path), format="parquet"))
    # No readable footer: the number of records is unknown, so the file is one error row.
    assert len(rows) == 3 and [r["status"] for r in rows] == [None, None, "error"]
    assert rows[2]["source"] == str(tmp_path / "b.parquet") and rows[2]["error"].startswith("read: ")
    listing = list_input(InputConfig(uri=str(tmp_path), format="parquet"), LOCAL, RESOURCES, KEY)
    assert listing.unreadable_files == 1


def test_parquet_file_failing_mid_way_gives_one_error_row_per_unread_record(tmp_path, ray_cluster) -> None:
    path = tmp_path / "mid.parquet"
    pq.write_table(hf_table(0, 6).select(["pic"]), path, row_group_size=2, compression="none")
    data = bytearray(path.read_bytes())
    metadata = pq.ParquetFile(path).metadata
    # Corrupt the pages of the last row group only: the first two groups (4 records) stay readable.
    column = metadata.row_group(2).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))
    rows = read(InputConfig(uri=str(path), format="parquet", image_column="pic"))
    assert [r["source"] for r in rows] == [f"{path}#{i}" for i in range(6)]  # every record exactly once
    assert [r["status"] for r in rows] == [None] * 4 + ["error"] * 2
    assert all(r["error"].startswith("read: ") for r in rows[4:])
    assert [r["image"]["bytes"] for r in rows[:4]] == [png(i) for i in range(4)]


def test_parquet_duplicate_ids_fail_fast_naming_them(tmp_path, ray_cluster) -> None:
    table = hf_table(0, 4)
    table = table.set_column(0, "image_id", pa.array([1, 2, 2, 3], pa.int64()))
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(
        hf_table(10, 2).set_column(0, "image_id", pa.array([3, 4], pa.int64())), tmp_path / "b.parquet"
    )
    cfg = InputConfig(uri=str(tmp_path), format="parquet", image_column="pic", id_column="image_id")
    with pytest.raises(InputError, match=r"duplicate row ids .* \(e\.g\. 2, 3\)"):
        list_input(cfg, LOCAL, RESOURCES, KEY)


def test_parquet_input_errors(tmp_path) -> None:
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match=r"no \.parquet files"):
        read_source(InputConfig(uri=str(tmp_path / "none"), format="parquet"), LOCAL, RESOURCES, KEY)
    pq.write_table(hf_table(0, 1), tmp_path / "x.parquet")
    cases = [
        ({}, "column 'image' not in"),
        ({"image_column": "pic", "label_column": "nope"}, "column 'nope' not in"),
        ({"image_column": "cls"}, "not an image struct"),
    ]
    for update, match in cases:
        cfg = InputConfig(uri=str(tmp_path / "x.parquet"), format="parquet", **update)
        with pytest.raises(InputError, match=match):
            read_source(cfg, LOCAL, RESOURCES, KEY)


# ------------------------------------------------------------------------------------------------- S3


def upload(bucket: str, storage: StorageConfig, names: list[str], prefix: str) -> dict[str, bytes]:
    contents = {}
    for i, name in enumerate(names):
        uri = uri_join(bucket, prefix, name)
        fs, path = filesystem(uri, storage)
        fs.pipe(path, png(i))
        contents[uri] = png(i)
    return contents


def test_image_folder_on_s3(s3_endpoint, s3_bucket, ray_cluster) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    files = upload(s3_bucket, storage, ["x/a.jpg", "x/sub/b.PNG", "x/c.txt", "y/other.jpg"], "data")
    cfg = InputConfig(uri=uri_join(s3_bucket, "data", "x"), format="class_folders")
    ds = read_source(cfg, storage, RESOURCES, KEY)
    fs, path = filesystem(uri_join(s3_bucket, "data/x/a.jpg"), storage)
    fs.rm(path)  # deleted after listing
    rows = sorted(ds.take_all(), key=lambda r: r["source"])
    assert [r["source"] for r in rows] == [f"{s3_bucket}/data/x/a.jpg", f"{s3_bucket}/data/x/sub/b.PNG"]
    assert [r["label"] for r in rows] == ["x", "sub"]
    assert_keyed(rows)
    assert rows[0]["error"] == "read: FileNotFoundError" and rows[0]["image"]["bytes"] is None
    assert rows[1]["image"]["bytes"] == files[rows[1]["source"]] and rows[1]["status"] is None
    with pytest.raises(InputError, match="input not found"):
        read_source(InputConfig(uri=uri_join(s3_bucket, "nothing-here")), storage, RESOURCES, KEY)


def test_coco_on_s3(s3_endpoint, s3_bucket, ray_cluster) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    files = upload(s3_bucket, storage, ["val2017/000001.jpg", "val2017/000002.jpg"], "coco")
    fs, ann = filesystem(uri_join(s3_bucket, "coco/annotations/instances_val2017.json"), storage)
    fs.pipe(ann, coco_json([(2, "000002.jpg"), (1, "000001.jpg")]))
    cfg = InputConfig(
        uri=uri_join(s3_bucket, "coco/val2017"), format="coco", coco_annotations=f"s3://{ann}", limit=1
    )
    rows = read(cfg, storage)
    expected = [("1", f"{s3_bucket}/coco/val2017/000001.jpg", "val2017")]
    assert [(r["id"], r["source"], r["label"]) for r in rows] == expected
    assert rows[0]["image"]["bytes"] == files[rows[0]["source"]]


def test_parquet_on_s3(s3_endpoint, s3_bucket, ray_cluster) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    fs, root = filesystem(uri_join(s3_bucket, "hf/data"), storage)
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(hf_table(3 * i, 3).rename_columns(["image_id", "label", "image"]), buf)
        fs.pipe(f"{root}/train-{i:05d}-of-00002.parquet", buf.getvalue())
    cfg = InputConfig(
        uri=uri_join(s3_bucket, "hf/data"), format="parquet", label_column="label", id="source_hash"
    )
    rows = read(cfg, storage)
    expected = [f"{s3_bucket}/hf/data/train-{i:05d}-of-00002.parquet#{j}" for i in range(2) for j in range(3)]
    assert [r["source"] for r in rows] == expected
    assert [r["id"] for r in rows] == [sha20(s) for s in expected]
    assert [r["image"]["bytes"] for r in rows] == [png(i) for i in range(6)]
    assert [r["label"] for r in rows] == [f"class{i % 2}" for i in range(6)]


# ---------------------------------------------------------------------------------------- read → decode


def test_read_then_decode_through_ray(tmp_path, ray_cluster) -> None:
    """The reader's rows feed DecodeStage in Ray tasks, as the pipeline chains them."""
    from u2s.config import DecodeConfig
    from u2s.io.decode_stage import DecodeStage

    write_files(tmp_path, ["good.png", "gone.png"])
    (tmp_path / "broken.jpg").write_bytes(b"not really a jpeg")
    ds = read_source(InputConfig(uri=str(tmp_path)), LOCAL, RESOURCES, KEY)
    (tmp_path / "gone.png").unlink()
    stage = DecodeStage(DecodeConfig(), thumbnail_side=4, metadata="keep")
    ds = ds.map_batches(lambda batch: stage(batch), batch_size=2, batch_format="pyarrow", num_cpus=0.5)
    rows = {Path(r["source"]).name: r for r in ds.take_all()}
    good = rows["good.png"]
    assert (good["width"], good["height"], good["status"]) == (6, 4, None)
    assert good["image"] == {"bytes": png(0), "path": f"{good['id']}.png"}
    assert Image.open(io.BytesIO(good["thumbnail"])).size == (4, 3)  # the VLM's copy, made once
    assert rows["broken.jpg"]["error"].startswith("decode: not an image")
    assert rows["broken.jpg"]["image"]["bytes"] == b"not really a jpeg"
    assert rows["gone.png"]["error"] == "read: FileNotFoundError"  # the first failure is the one kept
    assert rows["gone.png"]["timings"]["decode"] is None


# --------------------------------------------------------------------------------------- block sizes


def test_rows_reach_the_pools_in_blocks_of_one_batch(tmp_path, ray_cluster) -> None:
    """A folder is one listing shard, but many blocks of `batch_size` rows downstream: a pool actor takes
    a block per task, so a single block would keep every pool at one actor."""
    write_files(tmp_path / "ds", [f"{i:02d}.png" for i in range(10)])
    cfg = InputConfig(uri=str(tmp_path / "ds"), format="image_folder")
    listing = list_input(cfg, LOCAL, RESOURCES, KEY)
    assert listing.dataset.materialize().num_blocks() == 1  # the whole shard in one listing block
    blocks = read_listing(listing, cfg, LOCAL, RESOURCES).materialize()
    sizes = sorted(meta.num_rows for bundle in blocks.iter_internal_ref_bundles() for meta in bundle.metadata)
    assert sizes == [1, 3, 3, 3]


def test_parquet_rows_come_in_a_block_per_file(tmp_path, ray_cluster) -> None:
    """Parquet records are read in one pass per file: the pools scale across files."""
    (tmp_path / "pq").mkdir()
    for k in range(3):
        pq.write_table(hf_table(4 * k, 4), tmp_path / "pq" / f"part-{k}.parquet")
    cfg = InputConfig(uri=str(tmp_path / "pq"), format="parquet", image_column="pic")
    blocks = read_source(cfg, LOCAL, RESOURCES, KEY).materialize()
    sizes = sorted(meta.num_rows for bundle in blocks.iter_internal_ref_bundles() for meta in bundle.metadata)
    assert sizes == [4, 4, 4]
