"""Actor pools of the pipeline: how every model stage (the stage-1 call pools, the edit and verify pools)
becomes a Ray Data ``map_batches`` over an actor pool.

:func:`actor_stage` builds one stage's pool from its :class:`~u2s.config.Resources` (or from ready
`map_batches` arguments, e.g. a vLLM pool's :func:`~u2s.stage1.engines.vllm_pool.pool_kwargs`), adds
the bounded restarts every pool shares (:mod:`u2s.healing`) and maps it with :func:`map_pool`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data

    from u2s.config_base import Resources

#: The key of the per-actor scheduling function in a pool's `map_batches` arguments (a placement group
#: per actor, see :mod:`u2s.stage1.engines.vllm_pool`).
REMOTE_ARGS_FN = "ray_remote_args_fn"


def pool_args(resources: Resources) -> dict[str, Any]:
    """`map_batches` arguments of a plain actor pool: batch size, pool bounds, per-actor resources."""
    import ray.data

    return {
        "batch_size": resources.batch_size,
        "compute": ray.data.ActorPoolStrategy(**resources.actor_pool_kwargs()),
        **resources.ray_remote_args(),
    }


def actor_stage(
    ds: ray.data.Dataset, stage_cls: type, resources: Resources, args: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ray.data.Dataset:  # fmt: skip
    """``stage_cls`` as an actor pool over Arrow batches, each actor built with ``kwargs``; ``args``: its
    `map_batches` arguments (default: :func:`pool_args` of ``resources``). Every pool gets the bounded
    restarts and batch retries of ``resources``."""
    args = {**(pool_args(resources) if args is None else args), **resources.actor_fault_args()}
    return map_pool(ds, stage_cls, args, fn_constructor_kwargs=kwargs, batch_format="pyarrow")


def map_pool(ds: ray.data.Dataset, fn: Any, pool: dict[str, Any], **kwargs: Any) -> ray.data.Dataset:
    """``ds.map_batches(fn, **pool, **kwargs)``, through the DeveloperAPI ``map_batches_internal`` when
    the pool starts a placement group per actor (``pool`` holds :data:`REMOTE_ARGS_FN`).

    Ray 2.60 deprecates ``ray_remote_args_fn`` on the public `map_batches` (removal in 2.64) and has no
    named replacement for per-actor scheduling; ray.data.llm's own engine stage goes through
    ``map_batches_internal`` for the same reason. Every other pool uses the public API.
    """
    if REMOTE_ARGS_FN in pool:
        _without_high_memory_detector(ds.context)
        return ds.map_batches_internal(fn, **pool, **kwargs)
    with warnings.catch_warnings():
        # The pools' bounded restarts (`max_restarts`, `max_task_retries`) have no named parameter in Ray
        # 2.60; Ray Data's actor pool reads them from the remote args, which it flags as deprecated.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **pool, **kwargs)


def _without_high_memory_detector(context: Any) -> None:
    """Drop Ray Data's high-memory issue detector (advice in the logs) from ``context``: it calls every
    operator's ``ray_remote_args_fn``, and each call makes a placement group (ray-project/ray#64012)."""
    try:
        from ray.data._internal.issue_detection.detectors.high_memory_detector import HighMemoryIssueDetector
    except ImportError:  # moved or gone in a later Ray
        return
    config = context.issue_detectors_config
    config.detectors = [d for d in config.detectors if d is not HighMemoryIssueDetector]
