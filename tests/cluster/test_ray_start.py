"""A plain `ray start --head` cluster: `u2s submit --wait` to it succeeds, and `u2s run` attaches to it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from u2s.config import StorageConfig
from u2s.io.writers import read_columns
from u2s.testing.cluster_job import tiny_model_overrides
from u2s.testing.ray_cluster import RayHead

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]


def test_submit_wait_on_a_ray_start_head(tiny_models, few_images, tmp_path):
    from ray.job_submission import JobSubmissionClient

    out = tmp_path / "out"
    head = RayHead(num_cpus=2)
    with head:
        cmd = [sys.executable, "-m", "u2s.cli", "submit", "--address", head.dashboard_url, "--wait",
               "--working-dir", str(REPO), "--preset", "cpu-tiny", "--input", str(few_images),
               "--output", str(out / "safe"), "--sensitive-output", str(out / "sensitive")]  # fmt: skip
        for item in tiny_model_overrides(tiny_models):
            cmd += ["--set", item]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        job_id = result.stdout.split()[1]
        assert f"ray job logs --address {head.dashboard_url} {job_id} --follow" in result.stdout
        info = JobSubmissionClient(head.dashboard_url).get_job_info(job_id)
        assert str(info.status.value) == "SUCCEEDED"
        assert info.entrypoint == "python jobs/anonymize.py --config u2s-job.yaml"
    assert head.processes() == []  # stopped, and only its own processes were touched

    rows = pq.read_table(out / "sensitive").to_pylist()  # the safe table publishes no paths
    assert sorted(Path(r["source"]).name for r in rows) == sorted(p.name for p in few_images.iterdir())
    # The safe output also holds its dataset card (README.md): read its Parquet files only.
    assert read_columns(str(out / "safe"), StorageConfig(), ["id"]).num_rows == len(rows)
    record = json.loads((out / "sensitive" / "_run.json").read_text())  # the full record
    assert record["summary"]["rows"] == len(rows)
    assert record["config"]["ray"]["address"] is None  # the job attached to its own cluster


def test_run_attaches_to_the_head_ray_start_recorded(tiny_models, few_images, tmp_path):
    """With a `ray start --head` running, `u2s run` attaches to it (Ray's record of the head, as a user's
    default temp dir holds it) and says so in one line; its local-cluster sizes are ignored, not fatal."""
    from ray.util.state import list_jobs

    out = tmp_path / "out"
    with RayHead(num_cpus=2) as head:
        ray_tmp = tmp_path / "tmp"
        ray_tmp.mkdir()
        (ray_tmp / "ray").symlink_to(head.temp_dir)  # where Ray looks for `ray start`'s record
        env = {**head.env(), "RAY_TMPDIR": str(ray_tmp)}
        cmd = [sys.executable, "-m", "u2s.cli", "run", "--preset", "cpu-tiny", "--input", str(few_images),
               "--output", str(out / "safe"), "--sensitive-output", str(out / "sensitive"),
               "--set", "ray.num_cpus=1", "--set", f"ray.object_store_memory={200 * 2**20}"]  # fmt: skip
        for item in tiny_model_overrides(tiny_models):
            cmd += ["--set", item]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        said = [line for line in result.stderr.splitlines() if "attaching to the Ray cluster" in line]
        assert len(said) == 1 and f":{head.port} " in said[0], result.stderr[-3000:]
        assert "ray.num_cpus, ray.object_store_memory apply to a local cluster only" in said[0]
        drivers = list_jobs(address=head.dashboard_url)
        assert any("u2s.cli" in (job.entrypoint or "") for job in drivers)  # the run was this cluster's job
    rows = pq.read_table(out / "sensitive").to_pylist()
    assert len(rows) == len(list(few_images.iterdir()))
