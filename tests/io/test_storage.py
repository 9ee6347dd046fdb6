"""storage: URI → fsspec / pyarrow filesystems, on local paths and a real S3 server (moto)."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec.implementations.local import LocalFileSystem

from u2s.config import StorageConfig
from u2s.io.storage import arrow_filesystem, filesystem, is_local, split_uri, to_uri, uri_join


def test_local_paths_and_file_uris(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = filesystem("data/images")
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "data" / "images")
    fs2, path2 = filesystem(f"file://{tmp_path}/x/")
    assert fs2 is fs and path2 == str(tmp_path / "x")
    assert to_uri(fs, path) == str(tmp_path / "data" / "images")  # local sources are plain absolute paths
    afs, apath = arrow_filesystem("data", StorageConfig())
    assert isinstance(afs, pafs.LocalFileSystem) and apath == str(tmp_path / "data")
    assert is_local("rel/path") and is_local("file:///x") and not is_local("s3://b/k")


def test_s3_options_come_from_storage_config() -> None:
    fs, path = filesystem(
        "s3://bucket/some/prefix/", StorageConfig(endpoint_url="http://127.0.0.1:1", region="eu-west-3")
    )
    assert isinstance(fs, s3fs.S3FileSystem) and path == "bucket/some/prefix"
    assert fs.endpoint_url == "http://127.0.0.1:1"
    assert fs.client_kwargs == {"region_name": "eu-west-3"}
    assert not fs.anon
    again, _ = filesystem("s3://other", StorageConfig(endpoint_url="http://127.0.0.1:1", region="eu-west-3"))
    assert again is fs  # one instance per set of options (connection pools are reused)
    anon, _ = filesystem("s3://bucket/k", StorageConfig(anon=True))
    assert anon.anon and anon.endpoint_url is None and anon.client_kwargs == {}
    assert to_uri(fs, "bucket/some/key.jpg") == "s3://bucket/some/key.jpg"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://host/x.jpg", "hdfs://nn/x"])
def test_unknown_scheme_is_a_clear_error(uri: str) -> None:
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        filesystem(uri, StorageConfig())


def test_s3_without_bucket() -> None:
    with pytest.raises(ValueError, match="without a bucket"):
        filesystem("s3://", StorageConfig())


def test_uri_join_and_split() -> None:
    assert uri_join("s3://b/root/", "x", "/y.jpg") == "s3://b/root/x/y.jpg"
    assert uri_join("s3://b", "_run.json") == "s3://b/_run.json"
    assert uri_join("/data/out", "a/b.parquet") == "/data/out/a/b.parquet"
    assert uri_join("file:///data/out/", "a") == "file:///data/out/a"
    assert split_uri("S3://b/k") == ("s3", "b/k")
    assert split_uri("/a/b") == ("", "/a/b")


def test_s3_round_trip_through_fsspec_and_arrow(s3_endpoint, s3_bucket) -> None:
    storage = StorageConfig(endpoint_url=s3_endpoint)
    fs, path = filesystem(uri_join(s3_bucket, "dir", "hello.bin"), storage)
    fs.pipe(path, b"\x00\x01payload")
    assert fs.cat(path) == b"\x00\x01payload"

    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    afs, root = arrow_filesystem(uri_join(s3_bucket, "tables"), storage)
    assert isinstance(afs, pafs.PyFileSystem)
    pq.write_table(table, f"{root}/part-0.parquet", filesystem=afs)
    assert pq.read_table(f"{root}/part-0.parquet", filesystem=afs).equals(table)
    # the same object through fsspec: both layers point at the same endpoint
    assert sorted(fs.ls(root)) == [f"{root}/part-0.parquet"]
    assert to_uri(fs, f"{root}/part-0.parquet") == f"{s3_bucket}/tables/part-0.parquet"


def test_s3_endpoint_from_environment(s3_endpoint, s3_bucket, monkeypatch) -> None:
    """No endpoint in the config: botocore's $AWS_ENDPOINT_URL (the standard chain) is honoured."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached per options, not per environment
    try:
        fs, path = filesystem(uri_join(s3_bucket, "env.txt"), StorageConfig())
        fs.pipe(path, b"via env")
        assert fs.cat(path) == b"via env"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_credentials_never_logged(s3_endpoint, s3_bucket, monkeypatch, caplog) -> None:
    secret = "u2s-secret-value-7f3a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with caplog.at_level(logging.DEBUG):
            fs, path = filesystem(uri_join(s3_bucket, "k.txt"), StorageConfig(endpoint_url=s3_endpoint))
            fs.pipe(path, b"x")
            assert fs.cat(path) == b"x"
        assert caplog.records  # s3fs/botocore did log at debug level
        assert secret not in caplog.text
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
