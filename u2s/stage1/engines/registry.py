"""The stage-1 engine registry: engine name → how to build it (see :mod:`u2s.stage1.engines`).

Kept apart from the engines themselves (and from :mod:`u2s.config`), so the config can check an engine
name against it without importing any engine. Importing this module runs the package's ``__init__``
first, which registers the built-in engines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: ``factory(stage1, model, vision, storage)`` → an :class:`~u2s.stage1.engines.base.Engine`
#: (``stage1``: the job's ``Stage1Config``; ``model``: the call's ``ModelConfig``; ``vision``: a VLM;
#: ``storage``: how to reach an s3:// model, or None).
EngineFactory = Callable[..., Any]


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine: its factory, and whether its pools run like vLLM's.

    ``vllm_pool``: the pool is built by :func:`u2s.stage1.engines.vllm_pool.pool_kwargs` from
    ``stage1.vllm`` (``max_concurrent_batches`` batches in flight per actor, placement groups), for an
    engine that batches requests continuously; otherwise one batch at a time per actor.
    """

    factory: EngineFactory
    vllm_pool: bool = False


#: Engine name → spec; the names are the values of ``stage1.engine`` and ``stage1.calls.<call>.engine``.
ENGINES: dict[str, EngineSpec] = {}


def register_engine(name: str, factory: EngineFactory, *, vllm_pool: bool = False) -> None:
    """Make ``name`` a valid stage-1 engine, built by ``factory`` (a name registered again is replaced).

    Register in every process that validates a config or builds an engine: the driver, and the pools'
    workers (e.g. from Ray's ``runtime_env={"worker_process_setup_hook": ...}``)."""
    ENGINES[name] = EngineSpec(factory, vllm_pool)


def check_engine(name: str) -> str:
    """``name`` if registered; otherwise ValueError listing the known names."""
    if name not in ENGINES:
        raise ValueError(f"unknown stage-1 engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    return name
