"""A worker node lost mid-run on Ray's autoscaler: the job finishes in place, every id once in both tables.

The cpu-tiny job runs on the fake autoscaling cluster of ``test_autoscaling.py`` (node types from
``cluster/aws.yaml``, stage pools on their GPU groups, ``u2s submit --wait``). Once the first rows are
written, the node holding the edit pool's actor is taken away the way a spot interruption takes one:
every process of that node (raylet, agents, workers) is SIGKILLed at once, nothing is drained.

What Ray does next is what this checks: the GCS marks the node dead; the edit actor, which Ray Data
creates with ``max_restarts=-1`` and ``max_task_retries=-1``, waits to restart and its in-flight batches
to be retried; the autoscaler sees its resource demand and launches a replacement node of the same type
(the fake provider reports the lost node as terminated, as a cloud does); blocks that lived only in the
lost node's object store are rebuilt from lineage (re-running their tasks, on restarted stage-1 actors if
need be). The same attempt then finishes: no ``--resume`` needed, every input id exactly once in each
table, every row with a final status.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from u2s.cluster import ACCELERATOR_PREFIX, load_node_groups
from u2s.config import StorageConfig, load_config
from u2s.io.writers import parquet_files, read_columns
from u2s.pipeline import stage_pools
from u2s.testing.cluster_job import fake_node_types, gpu_pool_overrides, tiny_model_overrides
from u2s.testing.images import noise_image
from u2s.testing.ray_cluster import RayHead

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "cluster" / "aws.yaml"
#: Enough rows that the run is still busy well after its first write (stage 1 takes a few tenths of a
#: second a row here) while the node is found and killed.
IMAGES = 96
EDIT_ACTOR = "MapWorker(MapBatches(EditStage))"
STATUSES = {"kept", "edited", "error"}


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory) -> Path:
    """Noise images of ~200 kB, so a 1 MiB write budget splits the output into many write tasks."""
    folder = tmp_path_factory.mktemp("node-loss-images")
    for i in range(IMAGES):
        noise_image(256, 256, seed=i).save(folder / f"{i:03d}.png")
    return folder


def edit_actor_node(head: RayHead) -> str | None:
    """The node id of a live actor of the edit pool, if one is up."""
    from ray.util.state import list_actors

    alive = list_actors(
        address=head.dashboard_url, filters=[("class_name", "=", EDIT_ACTOR), ("state", "=", "ALIVE")]
    )
    return alive[0].node_id if alive else None


def test_a_node_lost_mid_run_is_replaced_and_the_job_finishes_in_place(tiny_models, noise_images, tmp_path):
    from ray.util.state import list_actors, list_nodes

    groups = load_node_groups(LAUNCHER)
    head_group = next(g for g in groups if g.head)
    edit_accelerator = next(g.accelerator_type for g in groups if g.name == "gpu-stage2")
    pools = list(stage_pools(load_config(preset="cpu-tiny")))
    out = tmp_path / "out"
    overrides = [
        *tiny_model_overrides(tiny_models),
        *gpu_pool_overrides(groups, pools),
        f"output.max_file_bytes={2**20}",  # files land all through the run, not only at its end
        "output.rows_per_file=4",
        "stage1.calls.inspect.generation.max_new_tokens=128",  # short calls: flagged rows may end as
        "stage1.calls.describe.generation.max_new_tokens=8",  # error rows, which is fine here
    ]
    cmd = [sys.executable, "-m", "u2s.cli", "submit", "--wait", "--working-dir", str(REPO),
           "--preset", "cpu-tiny", "--input", str(noise_images), "--output", str(out / "safe"),
           "--sensitive-output", str(out / "sensitive")]  # fmt: skip
    for item in overrides:
        cmd += ["--set", item]
    storage = StorageConfig()
    log_path = tmp_path / "submit.log"

    with (
        RayHead(num_cpus=int(head_group.resources["CPU"]), worker_node_types=fake_node_types(groups)) as head,
        log_path.open("w") as log,
    ):
        job = subprocess.Popen([*cmd, "--address", head.dashboard_url], stdout=log, stderr=subprocess.STDOUT)

        def job_output() -> str:
            log.flush()
            return log_path.read_text(errors="replace")[-6000:]

        # Wait for the first committed rows with the edit actor up, then take its node away.
        victim, killed, written_before = None, [], set()
        deadline = time.monotonic() + 480
        while victim is None:
            assert job.poll() is None, "the job ended before a node was lost:\n" + job_output()
            assert time.monotonic() < deadline, "no rows written with the edit actor up:\n" + job_output()
            if parquet_files(str(out / "sensitive"), storage):
                victim = edit_actor_node(head)
            if victim is not None:
                killed = head.kill_node(victim)
                written_before = set(read_columns(str(out / "sensitive"), storage, ["id"])["id"].to_pylist())
            time.sleep(0.5)
        try:
            returncode = job.wait(timeout=600)
        finally:
            if job.poll() is None:
                job.kill()
        output = job_output()
        nodes = {n.node_id: n for n in list_nodes(address=head.dashboard_url, detail=True)}
        edit_actors = list_actors(
            address=head.dashboard_url, filters=[("class_name", "=", EDIT_ACTOR)], detail=True
        )
        launches = head.autoscaler_log()

    assert killed, "the edit actor's node had no process to kill"
    assert 0 < len(written_before) < IMAGES, "the node was lost mid-run, after the first rows were written"
    # The same attempt succeeded, on a new node of the edit pool's type.
    assert returncode == 0 and re.search(r"job raysubmit_\w+: SUCCEEDED", output), output
    assert nodes[victim].state == "DEAD"
    assert len(re.findall(r"Launching 1 nodes, type gpu-stage2\.", launches)) >= 2
    survivors = [a for a in edit_actors if a.node_id and a.node_id != victim]
    assert survivors, "no edit actor ran after the node was lost"
    accelerator = f"{ACCELERATOR_PREFIX}{edit_accelerator}"
    assert all(accelerator in nodes[a.node_id].resources_total for a in survivors)
    record = json.loads((out / "sensitive" / "_run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["succeeded"]  # no --resume was needed
    assert record["summary"]["rows"] == IMAGES

    # Every input id exactly once in each table (the rows written before the loss too), each with a final
    # status; the two tables in matching file pairs.
    safe = read_columns(str(out / "safe"), storage, ["id", "status"])
    sensitive = read_columns(str(out / "sensitive"), storage, ["id", "status", "source"])
    for table in (safe, sensitive):
        ids = table["id"].to_pylist()
        assert len(ids) == len(set(ids)) == IMAGES
        assert table["status"].null_count == 0 and set(table["status"].to_pylist()) <= STATUSES
    assert set(safe["id"].to_pylist()) == set(sensitive["id"].to_pylist()) >= written_before
    assert sorted(Path(s).name for s in sensitive["source"].to_pylist()) == sorted(
        p.name for p in noise_images.iterdir()
    )
    assert parquet_files(str(out / "safe"), storage) == parquet_files(str(out / "sensitive"), storage)
