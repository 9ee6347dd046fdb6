"""Manifest inputs: Parquet/CSV/JSON Lines/ORC lists of URIs and S3 Inventories, on disk and on a real S3."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import tracemalloc
from collections import Counter
from pathlib import Path
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.orc as orc
import pyarrow.parquet as pq
import pytest

from u2s.config import InputConfig, StorageConfig
from u2s.io.errors import InputError
from u2s.io.manifest import ManifestColumns, ManifestFile, iter_manifest, manifest_files
from u2s.io.storage import filesystem, uri_join

LOCAL = StorageConfig()
COLUMNS = ManifestColumns(id="image_id", label="label")


def rows_of(tables) -> list[dict]:
    return [row for table in tables for row in table.to_pylist()]


def read_all(uri: str, storage=LOCAL, columns=COLUMNS, batch_size=1000, skipped=None) -> list[dict]:
    return rows_of(
        table
        for file in manifest_files(uri, storage)
        for table in iter_manifest(file, storage, columns, batch_size, skipped)
    )


def write_csv(path: Path, rows: list[list], header: list[str] | None = None, gz: bool = False) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if gz else data)


# ------------------------------------------------------------------------------------------ URI lists


def uri_rows(root: Path) -> tuple[list[dict], list[dict]]:
    """Manifest rows of every kind of URI, and the rows iter_manifest must yield for a manifest in root."""
    rows = [
        {"uri": "s3://photos/a/1.jpg", "image_id": 7, "label": "cat"},
        {"uri": "images/2.png", "image_id": 8, "label": None},
        {"uri": "../elsewhere/3.jpg", "image_id": 9, "label": "dog"},
        {"uri": str(root / "abs" / "4.jpg"), "image_id": 10, "label": "cat"},
        {"uri": f"file://{root}/abs/5.jpg", "image_id": 11, "label": "cat"},
    ]
    expected = [
        {"source": "s3://photos/a/1.jpg", "id": "7", "label": "cat"},
        {"source": str(root / "images" / "2.png"), "id": "8", "label": None},
        {"source": str(root.parent / "elsewhere" / "3.jpg"), "id": "9", "label": "dog"},
        {"source": str(root / "abs" / "4.jpg"), "id": "10", "label": "cat"},
        {"source": str(root / "abs" / "5.jpg"), "id": "11", "label": "cat"},
    ]
    return rows, expected


def write_manifest(path: Path, rows: list[dict]) -> None:
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    elif name.endswith(".orc"):
        orc.write_table(pa.Table.from_pylist(rows), path)
    elif ".csv" in name:
        header = list(rows[0])
        write_csv(path, [[r[k] for k in header] for r in rows], header, gz=name.endswith(".gz"))
    else:
        text = "\n\n".join(json.dumps(r) for r in rows) + "\n"
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())


@pytest.mark.parametrize(
    "name", ["list.parquet", "list.orc", "list.csv", "list.csv.gz", "list.jsonl", "list.jsonl.gz"]
)
def test_uri_manifest_in_every_format(tmp_path, name):
    rows, expected = uri_rows(tmp_path)
    write_manifest(tmp_path / name, rows)
    assert manifest_files(str(tmp_path / name), LOCAL) == [
        ManifestFile(str(tmp_path / name), name.split(".")[1])  # type: ignore[arg-type]
    ]
    tables = list(iter_manifest(str(tmp_path / name), LOCAL, COLUMNS, batch_size=2))
    assert [t.num_rows for t in tables] == [2, 2, 1]
    assert all(
        t.schema == pa.schema([("source", pa.string()), ("id", pa.string()), ("label", pa.string())])
        for t in tables
    )
    assert rows_of(tables) == expected


def test_only_the_source_without_id_and_label_columns(tmp_path):
    rows, expected = uri_rows(tmp_path)
    write_manifest(tmp_path / "list.parquet", rows)
    assert read_all(str(tmp_path / "list.parquet"), columns=ManifestColumns()) == [
        {"source": e["source"]} for e in expected
    ]


def test_csv_keeps_ids_as_written_and_reads_quoted_fields(tmp_path):
    write_csv(
        tmp_path / "m.csv",
        [["007", "s3://b/with, comma.jpg", 'a "quoted" label'], ["0", "s3://b/x.jpg", ""]],
        ["image_id", "path", "label"],
    )
    columns = ManifestColumns(uri="path", id="image_id", label="label")
    assert read_all(str(tmp_path / "m.csv"), columns=columns) == [
        {"source": "s3://b/with, comma.jpg", "id": "007", "label": 'a "quoted" label'},
        {"source": "s3://b/x.jpg", "id": "0", "label": None},  # an empty field is no label
    ]


def test_headerless_csv_with_configured_column_names(tmp_path):
    write_csv(tmp_path / "m.csv.gz", [["1", "s3://b/1.jpg", "x"], ["2", "s3://b/2.jpg", "y"]], gz=True)
    cfg = InputConfig(
        uri=str(tmp_path / "m.csv.gz"), format="manifest", manifest_columns=["n", "url", "cls"],
        manifest_uri_column="url", id_column="n", label_column="cls",
    )  # fmt: skip
    columns = ManifestColumns.from_config(cfg)
    assert read_all(cfg.uri, columns=columns) == [
        {"source": "s3://b/1.jpg", "id": "1", "label": "x"},
        {"source": "s3://b/2.jpg", "id": "2", "label": "y"},
    ]


def test_folder_of_manifest_files(tmp_path):
    root = tmp_path / "lists"
    (root / "part=1").mkdir(parents=True)
    (root / "_temporary").mkdir()
    write_manifest(root / "b.parquet", [{"uri": "s3://b/2.jpg"}])
    write_manifest(root / "part=1" / "a.csv.gz", [{"uri": "s3://b/1.jpg"}])
    write_manifest(root / "_temporary" / "c.parquet", [{"uri": "s3://b/partial.jpg"}])
    write_manifest(root / ".hidden.jsonl", [{"uri": "s3://b/hidden.jpg"}])
    (root / "_SUCCESS").write_bytes(b"")
    (root / "README.txt").write_text("not a manifest")
    files = manifest_files(str(root), LOCAL)
    assert [(f.uri, f.format) for f in files] == [
        (str(root / "b.parquet"), "parquet"),
        (str(root / "part=1" / "a.csv.gz"), "csv"),
    ]
    assert read_all(str(root), columns=ManifestColumns()) == [
        {"source": "s3://b/2.jpg"},
        {"source": "s3://b/1.jpg"},
    ]


@pytest.mark.parametrize(
    ("rows", "columns", "match"),
    [
        ([{"url": "s3://b/1.jpg"}], ManifestColumns(), r"column 'uri' not in manifest .* \(columns: url\)"),
        ([{"uri": "s3://b/1.jpg"}], ManifestColumns(id="key_id"), r"column 'key_id' not in"),
        ([{"uri": "s3://b/1.jpg"}, {"uri": ""}], ManifestColumns(), r"row 2 of manifest .* empty image URI"),
        ([{"uri": "s3://b/1.jpg"}, {"uri": None}], ManifestColumns(), r"row 2 of .* empty image URI"),
        ([{"uri": "https://site/1.jpg"}], ManifestColumns(), r"row 1 .* scheme 'https' is not s3"),
        ([{"uri": "s3://"}], ManifestColumns(), r"row 1 .* empty image URI"),
        (
            [{"uri": "s3://b/1.jpg", "i": "a"}, {"uri": "s3://b/2.jpg", "i": None}],
            ManifestColumns(id="i"),
            "row 2 .* empty id",
        ),
    ],
    ids=["no-uri-column", "no-id-column", "empty-uri", "null-uri", "http", "no-bucket", "null-id"],
)
@pytest.mark.parametrize("name", ["m.parquet", "m.jsonl"])
def test_errors_name_the_row_not_its_content(tmp_path, rows, columns, match, name):
    write_manifest(tmp_path / name, rows)
    with pytest.raises(InputError, match=match) as error:
        read_all(str(tmp_path / name), columns=columns)
    assert "1.jpg" not in str(error.value) and "site" not in str(error.value)


def test_unreadable_files(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match=r"cannot read manifest .*broken\.parquet \(ArrowInvalid\)"):
        read_all(str(tmp_path / "broken.parquet"))
    (tmp_path / "ragged.csv").write_text("uri,image_id,label\ns3://b/1.jpg,1,x\ns3://b/2.jpg,2\n")
    with pytest.raises(InputError, match=r"cannot read manifest .*ragged\.csv"):
        read_all(str(tmp_path / "ragged.csv"))
    (tmp_path / "bad.jsonl").write_text('{"uri": "s3://b/1.jpg"}\n{"uri": \n')
    with pytest.raises(InputError, match=r"line 2 of manifest .*bad\.jsonl is not JSON"):
        read_all(str(tmp_path / "bad.jsonl"), columns=ManifestColumns())
    with pytest.raises(InputError, match="manifest not found"):
        manifest_files(str(tmp_path / "absent.csv"), LOCAL)
    with pytest.raises(InputError, match="manifest file not found"):
        list(iter_manifest(str(tmp_path / "absent.csv"), LOCAL, ManifestColumns(), 10))
    (tmp_path / "list.txt").write_text("s3://b/1.jpg\n")
    with pytest.raises(InputError, match=r"not a manifest file: .*list\.txt"):
        manifest_files(str(tmp_path / "list.txt"), LOCAL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no manifest files in"):
        manifest_files(str(tmp_path / "empty"), LOCAL)


# -------------------------------------------------------------------------------------- memory bounds


BIG_PREFIX = "s3://a-bucket-with-a-long-name/datasets/web-crawl-2026/shard-0001/images/by-date/2026/01/01"


def big_csv(path: Path, rows: int) -> None:
    with gzip.open(path, "wt") as f:
        f.write("uri,image_id,label\n")
        f.writelines(f"{BIG_PREFIX}/{i:09d}/photo.jpg,{i},class-{i % 101}\n" for i in range(rows))


def test_csv_and_parquet_stream_in_bounded_tables(tmp_path):
    """Arrow memory while streaming stays far below the manifest's size (CSV: a few blocks; Parquet: a
    few pages); every table has at most batch_size rows."""
    n = 300_000
    big_csv(tmp_path / "big.csv.gz", n)
    table = pcsv.read_csv(
        tmp_path / "big.csv.gz", convert_options=pcsv.ConvertOptions(column_types={"image_id": pa.string()})
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=25_000)
    in_memory = table.nbytes
    del table
    for name in ("big.csv.gz", "big.parquet"):
        base = pa.total_allocated_bytes()
        count, peak, last = 0, 0, None
        for out in iter_manifest(str(tmp_path / name), LOCAL, COLUMNS, batch_size=4096):
            assert out.num_rows <= 4096
            count += out.num_rows
            peak = max(peak, pa.total_allocated_bytes() - base)
            last = out.slice(out.num_rows - 1).to_pylist()[0]
        print(f"{name}: {in_memory / 2**20:.1f} MiB as a table, Arrow peak streaming {peak / 2**20:.2f} MiB")
        assert count == n and last == {
            "source": f"{BIG_PREFIX}/{n - 1:09d}/photo.jpg",
            "id": str(n - 1),
            "label": f"class-{(n - 1) % 101}",
        }
        assert peak < in_memory / 5


def test_jsonl_streams_line_by_line(tmp_path):
    """Python memory (JSON Lines is parsed line by line in Python) stays far below the file's size."""
    path = tmp_path / "big.jsonl"
    row = '{"uri": "%s/%09d.jpg", "image_id": %d, "caption": "a photo"}\n'
    with path.open("w") as f:
        f.writelines(row % (BIG_PREFIX, i, i) for i in range(60_000))
    tracemalloc.start()
    try:
        count = sum(t.num_rows for t in iter_manifest(str(path), LOCAL, ManifestColumns(id="image_id"), 2048))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 60_000
    assert peak < path.stat().st_size / 5


# ------------------------------------------------------------------------------------------ S3 Inventory

INVENTORY_SCHEMA = (
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
)
#: (key as stored, is_latest, is_delete_marker): what a versioned bucket's inventory lists.
OBJECTS = [
    ("photos/jane doe/passport scan.jpg", True, False),
    ("photos/café/été+plage.JPG", True, False),
    ("photos/100%/a&b=c.png", True, False),
    ("photos/", True, False),  # a folder placeholder
    ("photos/notes.txt", True, False),
    ("photos/old.jpg", False, False),  # a non-current version
    ("photos/deleted.jpg", True, True),  # a delete marker
]
EXPECTED_KEYS = [key for key, latest, deleted in OBJECTS[:3]]
EXPECTED_SKIPS = Counter({"folder": 1, "extension": 1, "not_latest": 1, "delete_marker": 1})


def inventory_rows(source_bucket: str) -> list[list[str]]:
    """CSV rows as S3 Inventory writes them: URL-encoded keys (spaces as +), booleans as text."""
    return [
        [source_bucket, quote_plus(key, safe="/"), f"v{i}", str(latest).lower(), str(deleted).lower(), "1024",
         "2026-01-01T00:00:00.000Z", "etag", "STANDARD"]
        for i, (key, latest, deleted) in enumerate(OBJECTS)
    ]  # fmt: skip


def write_inventory(fs, root: str, source_bucket: str, destination: str) -> str:
    """A CSV S3 Inventory under ``root`` (``{prefix}/{source}/{config}/``): two gzipped data files and a
    dated manifest.json; returns the manifest's path on ``fs``."""
    config = f"{root}/inventory/{source_bucket}/daily"
    rows = inventory_rows(source_bucket)
    keys = []
    for name, part in (("f1.csv.gz", rows[:4]), ("f0.csv.gz", rows[4:])):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(part)
        fs.pipe(f"{config}/data/{name}", gzip.compress(buf.getvalue().encode()))
        keys.append(f"inventory/{source_bucket}/daily/data/{name}")
    manifest = {
        "sourceBucket": source_bucket,
        "destinationBucket": f"arn:aws:s3:::{destination}",
        "version": "2016-11-30",
        "creationTimestamp": "1767225600000",
        "fileFormat": "CSV",
        "fileSchema": INVENTORY_SCHEMA,
        "files": [{"key": key, "size": 100, "MD5checksum": "0" * 32} for key in keys],
    }
    path = f"{config}/2026-01-01T01-00Z/manifest.json"
    fs.pipe(path, json.dumps(manifest).encode())
    fs.pipe(f"{config}/2026-01-01T01-00Z/manifest.checksum", b"0" * 32)
    return path


def test_s3_inventory_csv(s3_endpoint, s3_bucket):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    source_bucket = f"{s3_bucket[5:]}-src"
    fs, _ = filesystem(s3_bucket, storage)
    fs.mkdir(source_bucket)
    for key in EXPECTED_KEYS:  # the images exist under their real (decoded) keys
        fs.pipe(f"{source_bucket}/{key}", b"image bytes of " + key.encode())
    manifest = write_inventory(fs, s3_bucket[5:], source_bucket, s3_bucket[5:])

    files = manifest_files(f"s3://{manifest}", storage)
    config = f"{s3_bucket}/inventory/{source_bucket}/daily"
    assert [f.uri for f in files] == [f"{config}/data/f0.csv.gz", f"{config}/data/f1.csv.gz"]
    assert all(f.format == "csv" and f.url_encoded_keys and f.names[:2] == ("Bucket", "Key") for f in files)
    assert manifest_files(f"s3://{manifest.rsplit('/', 1)[0]}", storage) == files  # the dated folder

    skipped = Counter()
    columns = ManifestColumns(extensions=(".jpg", ".png"))
    rows = read_all(f"s3://{manifest}", storage, columns, skipped=skipped)
    sources = sorted(row["source"] for row in rows)
    assert sources == sorted(f"s3://{source_bucket}/{key}" for key in EXPECTED_KEYS)
    assert skipped == EXPECTED_SKIPS
    for source in sources:  # every decoded key names a real object
        fs_, path = filesystem(source, storage)
        assert fs_.cat_file(path).startswith(b"image bytes of ")


def test_inventory_copied_to_local_disk(tmp_path):
    """The same layout on local disk (an inventory synced down): data files resolved next to the manifest."""
    import fsspec

    manifest = write_inventory(fsspec.filesystem("file", auto_mkdir=True), str(tmp_path), "src", "dest")
    rows = read_all(manifest, columns=ManifestColumns(extensions=(".jpg", ".png")))
    assert sorted(row["source"] for row in rows) == sorted(f"s3://src/{key}" for key in EXPECTED_KEYS)


def test_inventory_data_file_read_with_configured_columns(tmp_path):
    """A headerless inventory CSV pointed at directly, its columns named in the config: keys decoded."""
    write_csv(tmp_path / "data.csv.gz", inventory_rows("src"), gz=True)
    cfg = InputConfig(
        uri=str(tmp_path / "data.csv.gz"), format="manifest",
        manifest_columns=["bucket", "key", "v", "is_latest", "is_delete_marker", "size", "date", "tag", "x"],
    )  # fmt: skip
    skipped = Counter()
    rows = read_all(cfg.uri, columns=ManifestColumns.from_config(cfg), skipped=skipped)
    assert [row["source"] for row in rows] == [f"s3://src/{key}" for key in EXPECTED_KEYS]
    assert skipped == EXPECTED_SKIPS


@pytest.mark.parametrize("fmt", ["parquet", "orc"])
def test_s3_inventory_parquet_and_orc(s3_endpoint, s3_bucket, fmt):
    """Parquet/ORC inventories: snake_case columns, typed booleans, keys NOT URL-encoded."""
    storage = StorageConfig(endpoint_url=s3_endpoint)
    table = pa.table(
        {
            "bucket": ["src"] * len(OBJECTS),
            "key": [key for key, _, _ in OBJECTS],
            "version_id": [f"v{i}" for i in range(len(OBJECTS))],
            "is_latest": [latest for _, latest, _ in OBJECTS],
            "is_delete_marker": [deleted for _, _, deleted in OBJECTS],
            "size": pa.array([1024] * len(OBJECTS), pa.int64()),
        }
    )
    config = f"{s3_bucket}/inv/src/weekly"
    data = uri_join(config, f"data/part-0.{fmt}")
    buf = io.BytesIO()
    (pq.write_table if fmt == "parquet" else orc.write_table)(table, buf)
    fs, path = filesystem(data, storage)
    fs.pipe(path, buf.getvalue())
    manifest = {
        "sourceBucket": "src", "destinationBucket": f"arn:aws:s3:::{s3_bucket[5:]}",
        "fileFormat": fmt.upper() if fmt == "orc" else "Parquet",
        "fileSchema": "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); }",
        "files": [{"key": f"inv/src/weekly/data/part-0.{fmt}", "size": 1, "MD5checksum": "0"}],
    }  # fmt: skip
    fs.pipe(f"{config[5:]}/2026-01-04T01-00Z/manifest.json", json.dumps(manifest).encode())

    skipped = Counter()
    uri = f"{config}/2026-01-04T01-00Z/manifest.json"
    assert [(f.uri, f.format, f.url_encoded_keys) for f in manifest_files(uri, storage)] == [
        (data, fmt, False)
    ]
    rows = read_all(uri, storage, ManifestColumns(extensions=(".jpg", ".png")), skipped=skipped)
    assert [row["source"] for row in rows] == [f"s3://src/{key}" for key in EXPECTED_KEYS]
    assert skipped == EXPECTED_SKIPS


def test_s3_manifest_with_relative_uris(s3_endpoint, s3_bucket):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    fs, _ = filesystem(s3_bucket, storage)
    lines = [{"uri": "images/a.jpg", "image_id": "a"}, {"uri": "s3://other/b.jpg", "image_id": "b"}]
    fs.pipe(
        f"{s3_bucket[5:]}/lists/part-0.jsonl.gz", gzip.compress("\n".join(map(json.dumps, lines)).encode())
    )
    rows = read_all(uri_join(s3_bucket, "lists"), storage, ManifestColumns(id="image_id"))
    assert rows == [
        {"source": f"{s3_bucket}/lists/images/a.jpg", "id": "a"},
        {"source": "s3://other/b.jpg", "id": "b"},
    ]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"fileFormat": "CSV", "fileSchema": "Bucket, Key"}, "not an S3 Inventory manifest"),
        ({"fileFormat": "CSV", "files": []}, "without a CSV fileSchema"),
        ({"fileFormat": "JSON", "fileSchema": "x", "files": []}, "is not CSV, ORC or Parquet"),
        (
            {"fileFormat": "CSV", "fileSchema": "Bucket, Key", "files": [{"key": "x/f.csv.gz"}]},
            "outside a data/",
        ),
    ],
)
def test_bad_inventory_manifests(tmp_path, doc, match):
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=match):
        manifest_files(str(tmp_path / "manifest.json"), LOCAL)
    with pytest.raises(InputError, match=match):
        manifest_files(str(tmp_path), LOCAL)  # a folder holding a manifest.json is that inventory


def test_local_paths_are_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "m.csv", [{"uri": "x/1.jpg"}])
    rows = read_all("m.csv", columns=ManifestColumns())
    assert rows == [{"source": os.path.join(str(tmp_path), "x", "1.jpg")}]


def test_config_fields():
    from pydantic import ValidationError

    cfg = InputConfig(
        uri="s3://b/manifest.json", format="manifest", extensions=["JPG", ".Png"], label_column="y"
    )
    assert ManifestColumns.from_config(cfg) == ManifestColumns(
        uri="uri", id=None, label="y", names=None, extensions=(".jpg", ".png")
    )
    with pytest.raises(ValidationError, match="manifest_columns"):
        InputConfig(uri="s3://b/m.csv", format="manifest", manifest_columns=[])
