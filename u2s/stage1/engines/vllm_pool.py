"""The Ray Data actor pool of a stage-1 call on vLLM: one :class:`~u2s.stage1.engines.vllm.VLLMEngine`
per actor, several batches in flight per actor, placement as ray.data.llm's engine stage does it.

* One worker per engine (tensor × pipeline parallelism = 1): the actor reserves the call's
  ``num_gpus`` (1 on GPU pools, 0 on CPU) and vLLM runs the model in its own engine process ("uni").
* Several workers: each actor gets a placement group of one bundle per worker (default
  ``{GPU: 1, CPU: 1}``, the first bundle holding the actor's CPUs too), created when Ray Data starts the
  actor, and is scheduled into it with ``placement_group_capture_child_tasks``; vLLM's "ray" executor
  then starts its workers inside that group. The actor itself reserves no GPU (its workers hold them).
  The group is ``STRICT_PACK``: every worker of one engine on one node, so tensor parallelism runs over
  the node's GPU links, never across nodes over the network (with ``PACK``, Ray would split the bundles
  over 1-GPU nodes when no node holds them all). ``u2s plan --cluster`` says when no node of a group the
  pool can use has that many GPUs.
  (With ``engine_kwargs: {distributed_executor_backend: mp}`` the actor instead reserves every worker's
  GPUs on one node, and vLLM starts the workers as its own processes.)
* A configured ``placement_group_config`` is used as it is, also for one worker (e.g. CPU bundles that
  reserve a whole core for the engine next to lighter pools); the actor's own CPUs and GPUs must fit
  in one of its bundles.

Two known Ray 2.60 flaws of per-actor groups made by ``ray_remote_args_fn`` (which ray.data.llm shares)
are worked around here: the groups belong to the driver and outlive their actors (ray-project/ray#64035),
so a reaper thread of the driver (:class:`GroupReaper`) removes each group once the actor in it is dead
(a pool that scales down gives its stopped actors' resources back at once; an actor Ray restarts stays
in its group), and :func:`remove_placement_groups` removes the rest once the dataset has run
(``u2s.pipeline.run`` calls it); and Ray Data's high-memory issue detector calls every operator's
``ray_remote_args_fn`` at the start of execution and on each detection interval, minting groups
nothing uses (ray-project/ray#64012), so :func:`u2s.map_pool.map_pool` turns that advisory detector off
for a dataset with such a pool. Ray's planned per-actor placement-group parameters of `map_batches`
(ray-project/ray#64090) will replace both.

Batches overlap inside an actor through ``ActorPoolStrategy(max_concurrent_calls_per_actor=k,
enable_true_multi_threading=True)``: k threads run the stage's ``__call__`` and share the actor's engine.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from u2s.map_pool import REMOTE_ARGS_FN
from u2s.stage1.engines.vllm import executor_backend, world_size

if TYPE_CHECKING:
    from u2s.config import Resources, VLLMEngineConfig

logger = logging.getLogger(__name__)

#: Placement groups created in this process for engine actors (see :func:`remove_placement_groups`).
_groups: list[Any] = []
_groups_lock = threading.Lock()


class GroupReaper:
    """A driver thread that removes each engine actor's placement group once its actor is dead.

    Ray Data stops a pool's surplus actors by dropping their handles; the groups made for them by
    ``ray_remote_args_fn`` belong to the driver and would stay reserved. Every ``interval`` seconds the
    reaper reads this job's actor table from the GCS and removes the groups (of :data:`_groups`) whose
    actors are all ``DEAD`` (a restarting actor keeps its group). A group no actor has entered yet is
    left alone; the thread ends when no group is left and starts again with the next one.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.removed = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self) -> None:
        """Make sure the thread runs (called for each new group)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="u2s-group-reaper", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        import ray

        while True:
            with self._lock, _groups_lock:  # a group added after this check starts a new thread
                if not _groups or not ray.is_initialized():
                    self._thread = None
                    return
            try:
                self.reap()
            except Exception as e:  # the GCS busy or gone: try again next time; the job-end backstop stays
                logger.debug("placement group reaper: %s", type(e).__name__)
            time.sleep(self.interval)

    def reap(self) -> int:
        """Remove the groups whose actors are all dead; returns how many."""
        from ray.util import remove_placement_group

        states = _actor_states_by_group()
        with _groups_lock:
            dead = [g for g in _groups if states.get(g.id.hex()) == {"DEAD"}]
            for group in dead:
                _groups.remove(group)
        for group in dead:
            remove_placement_group(group)
        self.removed += len(dead)
        return len(dead)


def _actor_states_by_group() -> dict[str, set[str]]:
    """Placement group id (hex) → the states of this job's actors scheduled in it, from the GCS."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    names = gcs_pb2.ActorTableData.ActorState.Name
    job_id = ray.get_runtime_context().get_job_id()
    table = state._connect_and_get_accessor().get_actor_table(ray.JobID.from_hex(job_id), None)
    by_group: dict[str, set[str]] = {}
    for entry in table:
        actor = gcs_pb2.ActorTableData.FromString(entry)
        if actor.placement_group_id:
            by_group.setdefault(actor.placement_group_id.hex(), set()).add(names(actor.state))
    return by_group


#: The driver's reaper of engine actors' placement groups.
reaper = GroupReaper()


def actor_gpus(resources: Resources, vllm: VLLMEngineConfig) -> float:
    """GPUs the engine actor itself reserves: none for vLLM's "ray" executor (its workers hold them, in
    the actor's placement group); else every worker's ("uni": one; "mp": all, in the actor's process tree).
    """
    return 0.0 if executor_backend(vllm) == "ray" else resources.num_gpus * world_size(vllm)


def placement_bundles(
    resources: Resources, vllm: VLLMEngineConfig
) -> tuple[list[dict[str, float]], str] | None:
    """(bundles, strategy) of each actor's placement group, or None when the actor needs none."""
    if vllm.placement_group_config is not None:
        bundles = [dict(b) for b in vllm.placement_group_config.bundles]
        strategy = vllm.placement_group_config.strategy
    elif executor_backend(vllm) == "ray":
        device = {"GPU": 1.0} if resources.num_gpus > 0 else {}
        bundles = [{**device, "CPU": 1.0} for _ in range(world_size(vllm))]
        bundles[0]["CPU"] = max(1.0, resources.num_cpus)  # the actor runs there too
        strategy = "STRICT_PACK"  # one node: tensor-parallel workers never talk over the network
    else:
        return None
    if resources.accelerator_type:  # as ray.data.llm: a sliver of the accelerator label pins the node type
        for bundle in bundles:
            bundle[f"accelerator_type:{resources.accelerator_type}"] = 0.001
    gpus = actor_gpus(resources, vllm)
    if not any(b.get("CPU", 0.0) >= resources.num_cpus and b.get("GPU", 0.0) >= gpus for b in bundles):
        raise ValueError(
            f"no placement group bundle holds the engine actor's {resources.num_cpus} CPUs and {gpus} GPUs: "
            "the actor would never start (enlarge a bundle or lower the call's num_cpus/num_gpus)"
        )
    return bundles, strategy


def placement_group_strategy(bundles: list[dict[str, float]], strategy: str) -> dict[str, Any]:
    """Remote args of one new engine actor: a new placement group, the actor and its children inside.

    Ray Data calls this each time it starts an actor of the pool (``ray_remote_args_fn``).
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group([dict(b) for b in bundles], strategy=strategy)
    with _groups_lock:
        _groups.append(group)
    reaper.watch()  # removes the group once its actor is gone
    inside = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    return {"scheduling_strategy": inside}


def remove_placement_groups() -> int:
    """Remove every engine actor's placement group created in this process (their actors die with
    them: call it once the dataset has run). Returns how many were removed."""
    with _groups_lock:
        groups = list(_groups)
        _groups.clear()
    if groups:
        from ray.util import remove_placement_group

        for group in groups:
            remove_placement_group(group)
    return len(groups)


def pool_kwargs(resources: Resources, vllm: VLLMEngineConfig) -> dict[str, Any]:
    """`map_batches` keyword arguments of one vLLM call's actor pool (see the module docstring).

    Pass them with :func:`u2s.map_pool.map_pool` (a per-actor placement group needs ``ray_remote_args_fn``).
    """
    import ray.data

    k = vllm.max_concurrent_batches
    compute = ray.data.ActorPoolStrategy(
        **resources.actor_pool_kwargs(),
        max_concurrent_calls_per_actor=k,
        max_tasks_in_flight_per_actor=2 * k,  # the next batches wait at the actor, not at the scheduler
        enable_true_multi_threading=True,
    )
    kwargs: dict[str, Any] = {"batch_size": resources.batch_size, "compute": compute,
                              "num_cpus": resources.num_cpus}  # fmt: skip
    gpus = actor_gpus(resources, vllm)
    if gpus:
        kwargs["num_gpus"] = gpus
    placement = placement_bundles(resources, vllm)
    if placement is not None:
        kwargs[REMOTE_ARGS_FN] = partial(placement_group_strategy, *placement)
    if resources.accelerator_type:
        kwargs["accelerator_type"] = resources.accelerator_type
    # No runtime_env for `vllm.env_vars`: Ray's runtime-env agent logs its values (HF_TOKEN...); the
    # engine sets them in its own process instead (`u2s.stage1.engines.vllm.set_engine_env`).
    return kwargs
