"""Placement groups follow the pool: when Ray Data stops a surplus actor of a pool that has a group per
actor (2 -> 1), the actor's group is removed while the dataset still runs, and none is left at the end.

A real Ray Data run on the local cluster, with CPU bundles (as ``placement_group_config`` gives them).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from functools import partial

from u2s.map_pool import map_pool
from u2s.stage1.engines import vllm_pool

ROWS = 12
GATE = 4  # rows after this one wait upstream until the test has seen the pool shrink


class _Echo:
    def __call__(self, batch):
        return batch


def _gated(batch, marker: str):
    """A stalled upstream stage: after the first rows nothing reaches the pool until ``marker`` exists,
    so the pool is idle and Ray Data scales it down while the dataset still runs."""
    if batch["id"][0] >= GATE:
        deadline = time.monotonic() + 180
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    return batch


def _our_groups(before: set[str]) -> dict[str, str]:
    from ray.util import placement_group_table

    return {gid: t["state"] for gid, t in placement_group_table().items() if gid not in before}


def test_a_pool_scaling_down_gives_back_its_stopped_actors_group(ray_cluster, tmp_path):
    import ray
    import ray.data
    from ray.util import placement_group_table

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    before = set(placement_group_table())
    pool = {
        "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=2, initial_size=2),
        "batch_size": 1,
        "num_cpus": 0.25,
        vllm_pool.REMOTE_ARGS_FN: partial(vllm_pool.placement_group_strategy, [{"CPU": 0.25}], "PACK"),
    }
    marker = tmp_path / "shrunk"
    ds = ray.data.range(ROWS, override_num_blocks=ROWS)
    ds = ds.map_batches(_gated, batch_size=1, num_cpus=0.25, fn_kwargs={"marker": str(marker)})
    ds = map_pool(ds, _Echo, pool)

    rows, mid_run = 0, {}

    def watch() -> None:  # while the consumer waits for rows: one actor stopped, its group gone
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            states = sorted(_our_groups(before).values())
            if states == ["CREATED", "REMOVED"]:
                mid_run.update(states=states, rows=rows)
                break
            time.sleep(0.2)
        marker.touch()  # let the rest of the rows through (also when the pool never shrank: the test fails)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for batch in ds.iter_batches(batch_size=1):
        rows += len(batch["id"])
    watcher.join()
    assert rows == ROWS
    # The pool went 2 -> 1 while the dataset ran: the stopped actor's group was removed, the other's kept.
    assert mid_run.get("states") == ["CREATED", "REMOVED"], _our_groups(before)
    assert mid_run["rows"] < ROWS
    deadline = time.monotonic() + 60
    while set(_our_groups(before).values()) != {"REMOVED"}:  # the pool's shutdown: the last one too
        assert time.monotonic() < deadline, _our_groups(before)
        time.sleep(0.5)
    assert len(_our_groups(before)) == 2  # no group minted that no actor used
    assert vllm_pool.remove_placement_groups() == 0  # nothing left for the job-end backstop
