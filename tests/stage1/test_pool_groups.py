"""Placement groups follow the pool: when Ray Data stops a surplus actor of a pool that has a group per
actor, the actor's group is removed while the dataset still runs, and none is left at the end.

A real Ray Data run on the local cluster, with CPU bundles (as ``placement_group_config`` gives them).
"""

from __future__ import annotations

import sys
import time
from functools import partial

from u2s.map_pool import map_pool
from u2s.stage1.engines import vllm_pool

ROWS = 24


class _Echo:
    def __call__(self, batch):
        return batch


def _slowly(batch):
    time.sleep(0.3)  # a slow upstream stage: the pool is mostly idle, so it scales down
    return batch


def _our_groups(before: set[str]) -> dict[str, str]:
    from ray.util import placement_group_table

    return {gid: t["state"] for gid, t in placement_group_table().items() if gid not in before}


def test_a_pool_scaling_down_gives_back_its_stopped_actors_group(ray_cluster):
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
    ds = ray.data.range(ROWS, override_num_blocks=ROWS).map_batches(_slowly, batch_size=1, num_cpus=0.5)
    ds = map_pool(ds, _Echo, pool)
    rows, seen = 0, []
    for batch in ds.iter_batches(batch_size=1):
        rows += len(batch["id"])
        seen.append(sorted(_our_groups(before).values()))
    assert rows == ROWS
    # Two actors started, a group each, both in use while rows flowed. (When Ray Data stops the idle
    # one before the last row depends on its autoscaler's timing on a loaded machine.)
    assert ["CREATED", "CREATED"] in seen
    deadline = time.monotonic() + 60
    while set(_our_groups(before).values()) != {"REMOVED"}:  # the pool's shutdown: the last one too
        assert time.monotonic() < deadline, _our_groups(before)
        time.sleep(0.5)
    assert len(_our_groups(before)) == 2  # no group minted that no actor used
    assert vllm_pool.remove_placement_groups() == 0  # nothing left for the job-end backstop
