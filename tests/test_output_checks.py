"""Outputs never create buckets: both output locations are checked before Ray starts, on a real S3 server.

A misspelt bucket fails `u2s run` at once (exit 2, one line naming the bucket, no traceback) and the
server's bucket list is unchanged; a bucket the credentials can read but not write fails the probe write;
`output.overwrite` empties a bare-bucket output without deleting the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from u2s.config import OutputConfig, StorageConfig
from u2s.io.storage import OutputUnavailable, check_output_location, filesystem, write_json
from u2s.io.writers import prepare_outputs
from u2s.testing.images import noise_image


def _buckets(endpoint: str, **credentials: str) -> set[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **credentials)
    return {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}


def _objects(endpoint: str, bucket: str) -> list[str]:
    import boto3

    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


def _misspelt() -> str:
    return f"u2s-typo-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def images(tmp_path, tiny_models, monkeypatch) -> Path:
    """Two images, and the tiny models a cpu-tiny run needs (they are checked before the outputs)."""
    monkeypatch.setenv("U2S_TINY_MODELS", str(Path(tiny_models["vlm"]).parent))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        noise_image(16, 16, seed=i).save(folder / f"{i}.png")
    return folder


def _u2s_run(images: Path, output: str, sensitive: str, endpoint: str, env: dict | None = None):
    """`u2s run` as a user runs it. The Ray address is a closed port: had Ray been started, the run
    would fail there instead, with another message."""
    command = [
        sys.executable, "-m", "u2s.cli", "run", "--preset", "cpu-tiny", "--input", str(images),
        "--output", output, "--sensitive-output", sensitive, "--ray-address", "127.0.0.1:9",
        "--set", f"storage.endpoint_url={endpoint}", "--set", "storage.max_attempts=1",
    ]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def _errors(result: subprocess.CompletedProcess) -> list[str]:
    """The CLI's error lines (botocore's INFO log lines aside)."""
    return [line for line in result.stderr.splitlines() if line.startswith("u2s run:")]


@pytest.mark.parametrize("misspelt_output", ["uri", "sensitive_uri"])
def test_a_misspelt_bucket_fails_the_cli_before_ray_and_creates_nothing(
    misspelt_output, images, s3_endpoint, s3_bucket
):
    typo = _misspelt()
    outputs = {"uri": f"{s3_bucket}/u2s/safe", "sensitive_uri": f"{s3_bucket}/u2s/sensitive"}
    outputs[misspelt_output] = f"s3://{typo}/u2s/{misspelt_output}"
    before = _buckets(s3_endpoint)
    result = _u2s_run(images, outputs["uri"], outputs["sensitive_uri"], s3_endpoint)
    assert result.returncode == 2, result.stderr
    (error,) = _errors(result)
    assert typo in error and "does not exist" in error, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert _buckets(s3_endpoint) == before and typo not in before
    assert _objects(s3_endpoint, s3_bucket.removeprefix("s3://")) == []  # no key, no record, no probe left


def test_prepare_outputs_checks_both_locations_before_touching_either(s3_endpoint, s3_bucket, tmp_path):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    before = _buckets(s3_endpoint)
    local = tmp_path / "safe"
    output = OutputConfig(uri=str(local), sensitive_uri=f"s3://{_misspelt()}/sensitive")
    with pytest.raises(OutputUnavailable, match="does not exist; u2s never creates buckets"):
        prepare_outputs(output, storage)
    assert _buckets(s3_endpoint) == before
    # The local one was probed: its folder exists (local folders are made) and holds nothing.
    assert local.is_dir() and list(local.iterdir()) == []


def test_write_json_to_a_missing_bucket_fails_instead_of_creating_it(s3_endpoint):
    storage = StorageConfig(endpoint_url=s3_endpoint, max_attempts=1)
    before = _buckets(s3_endpoint)
    with pytest.raises(FileNotFoundError):
        write_json(f"s3://{_misspelt()}/deep/prefix/_run.json", storage, {"a": 1})
    assert _buckets(s3_endpoint) == before


def test_an_existing_bucket_passes_and_keeps_no_probe(s3_endpoint, s3_bucket):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    before = _buckets(s3_endpoint)
    check_output_location(f"{s3_bucket}/runs/safe", storage)
    check_output_location(s3_bucket, storage)  # a bare bucket is an output too
    assert _buckets(s3_endpoint) == before and _objects(s3_endpoint, s3_bucket.removeprefix("s3://")) == []


def test_a_bucket_the_credentials_cannot_write_fails_the_probe(images, s3_endpoint, s3_bucket):
    """A real read-only principal: an IAM user allowed to list and read, enforced by the S3 server."""
    import boto3
    import requests

    bucket = s3_bucket.removeprefix("s3://")
    iam = boto3.client("iam", endpoint_url=s3_endpoint)
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*",
              "Action": ["s3:ListBucket", "s3:GetObject", "s3:ListAllMyBuckets"]}]}  # fmt: skip
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    reader = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    sensitive = f"s3://{_misspelt()}/never-reached"  # the safe output is checked first
    before = _buckets(s3_endpoint)
    previous = requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0").json()  # enforce IAM now
    try:
        result = _u2s_run(images, f"{s3_bucket}/safe", sensitive, s3_endpoint, env=reader)
    finally:
        count = str(previous["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]).encode()
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=count)
    assert result.returncode == 2, result.stderr
    assert _errors(result) == [f"u2s run: cannot write to {s3_bucket}/safe (PermissionError)"]
    assert _buckets(s3_endpoint) == before and _objects(s3_endpoint, bucket) == []


def test_overwrite_of_a_bare_bucket_output_empties_it_and_keeps_the_bucket(s3_endpoint, s3_bucket, tmp_path):
    storage = StorageConfig(endpoint_url=s3_endpoint)
    bucket = s3_bucket.removeprefix("s3://")
    fs, _ = filesystem(s3_bucket, storage)
    fs.pipe_file(f"{bucket}/old/part-0.parquet", b"old rows")
    output = OutputConfig(uri=s3_bucket, sensitive_uri=str(tmp_path / "sensitive"), overwrite=True)
    assert prepare_outputs(output, storage) is False
    assert bucket in _buckets(s3_endpoint) and _objects(s3_endpoint, bucket) == []
