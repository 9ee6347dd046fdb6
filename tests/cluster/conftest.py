"""Tests that start their own Ray clusters (``ray start --head``, Ray's fake autoscaler).

They run in a pytest process of their own (``pytest -m cluster tests/cluster``; ``make test`` does it after
the main run), so they never overlap the session's in-process ``ray_cluster``. Their clusters use free
ports and their own temp dirs, and stopping one ends only its own processes (u2s.testing.ray_cluster).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from u2s.demo_data import write_sample_dataset


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what it deselects
def pytest_collection_modifyitems(config, items):
    cluster = [item for item in items if item.get_closest_marker("cluster")]
    if cluster and len(cluster) < len(items):
        raise pytest.UsageError(
            "cluster tests start their own Ray clusters: run them in a pytest process of their own "
            "(pytest -m cluster tests/cluster)"
        )


@pytest.fixture(scope="session")
def few_images(tmp_path_factory) -> Path:
    """A handful of the demo's sample images (five that decode, one broken file) in one folder tree."""
    samples = write_sample_dataset(tmp_path_factory.mktemp("samples"))
    chosen = [s for s in samples if s.expected == "image"][:5] + [
        s for s in samples if s.expected == "error"
    ][:1]
    root = tmp_path_factory.mktemp("few-images")
    for i, sample in enumerate(chosen):
        shutil.copy(sample.path, root / f"{i:02d}-{sample.path.name}")
    return root
