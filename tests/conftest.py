"""Session fixtures: tiny models built from configs, a real local Ray cluster, a real S3 server."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

# Fake credentials for the local S3 server; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on by default
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Pools keep their minimum size here: a test's few rows never need a second actor, and each one loads a
# model again. (Ray Data reads this when it is imported; `tests/io/test_readers.py` checks the block
# sizes that let pools grow, and `bench/pipeline.py` measures the growth.)
os.environ.setdefault("RAY_DATA_DEFAULT_ACTOR_POOL_UTIL_UPSCALING_THRESHOLD", "1000")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model family, saved with `save_pretrained` (name → folder)."""
    from u2s.testing.tiny_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (2 CPUs, like this machine and CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=768 * 2**20, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3 API server (moto) on 127.0.0.1; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the S3 server; returns `s3://name`."""
    import boto3

    name = f"u2s-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"
