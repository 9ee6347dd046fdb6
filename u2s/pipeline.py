"""The one place that knows the order of stages: composes a lazy, streaming Ray Data plan and runs it.

    list (Ray tasks) → [drop finished ids] → fetch → decode → stage-1 pools → edit → [verify → re-edit
    → verify ...] → safe + sensitive sinks

Stage 1 runs in one actor pool per model (by default calls A+B on the VLM, C(+D) on the LLM; see
:meth:`u2s.config.Stage1Config.pools`), on any engine, vLLM included; the edit pool follows. Each pool has
its own size, CPUs, GPUs, accelerator type and batch size, so the autoscaler can grow whichever stage is
the bottleneck. Rows that a stage has no work for pass through its actors as Arrow, untouched: Ray Data
cannot split a stream and join it again without running the upstream twice. Building the plan runs
nothing; :func:`run` lists the input, checks a resumed run, executes the plan and writes the records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from u2s.config import JobConfig, Resources

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pyarrow as pa
    import ray.data

    from u2s.config import CallPool
    from u2s.io.listing import Listing
    from u2s.stage import Stage

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What `run` returns; the records keep it too. Counts cover the whole run (every attempt)."""

    rows: int
    by_status: dict[str, int]
    errors_by_stage: dict[str, int]
    stage_rows: dict[str, int]
    stage_seconds: dict[str, float]
    wall_seconds: float
    flagged: int
    triplets: int
    metadata_removed: int
    multi_frame: int  # inputs with several frames (animations, multi-page TIFF, MPO)
    resumed: int  # rows an earlier attempt had finished (not processed again)
    written: int  # rows this attempt wrote
    safe_uri: str
    sensitive_uri: str
    listing: dict[str, Any] = field(default_factory=dict)
    retried: int = 0  # error rows of earlier attempts processed again (--retry-errors)


class JobFailed(RuntimeError):
    """The run stopped before every row was written; the message says how to finish it."""


class JobInterrupted(JobFailed):
    """SIGINT or SIGTERM ended the run; its records say ``interrupted`` and ``--resume`` finishes it."""


def _stateless(batch: pa.Table, stage: Stage) -> pa.Table:
    return stage(batch)


def thumbnail_side(cfg: JobConfig) -> int:
    """The VLM thumbnail's side: what the largest image input of stage 1 needs."""
    s1 = cfg.stage1
    return max(s1.image_size, s1.vllm.max_image_side or 0)


def stage_pools(cfg: JobConfig) -> dict[str, Resources]:
    """Every pool this config runs, in plan order, with the Ray resources of one of its actors or tasks.

    Model stages are actor pools (the stage-1 pools, named by their calls, e.g. ``inspect+describe``, and
    ``edit``); ``decode`` and ``write`` are tasks. The values are the config's own `Resources` objects
    where the config has one (``write`` has only a CPU count). The one place that maps a config to its
    pools: ``u2s plan`` and the cluster-config consistency tests read it.
    """
    pools = {"decode": cfg.ray.decode}
    pools.update({pool.name: pool.resources for pool in stage1_pools(cfg)})
    pools["edit"] = cfg.stage2.resources
    pools.update(verify_pools(cfg))
    pools["write"] = Resources(num_cpus=cfg.ray.write_num_cpus, pool_size=1)
    return pools


def stage1_pools(cfg: JobConfig) -> list[CallPool]:
    """The stage-1 pools this config runs: none when ``input.stage1_from`` takes stage 1's results from an
    earlier run (no VLM or LLM is loaded)."""
    return [] if cfg.input.stage1_from else cfg.stage1.pools()


def verify_pools(cfg: JobConfig) -> dict[str, Resources]:
    """``stage2.verify``'s pools after the first edit pool, in plan order: ``verify`` (attempt 1's
    checks), then ``edit.2``, ``verify.2``... (each re-edit and its checks). Empty when verify is off."""
    verify = cfg.stage2.verify
    if not verify.enabled:
        return {}
    from u2s.stage2.verify import verify_resources

    pools = {}
    for attempt in range(1, verify.max_attempts + 1):
        if attempt > 1:
            pools[f"edit.{attempt}"] = cfg.stage2.attempt(attempt).resources
        pools["verify" if attempt == 1 else f"verify.{attempt}"] = verify_resources(cfg.stage2, cfg.stage1)
    return pools


def build_dataset(cfg: JobConfig, listing: Listing, done: Any = None) -> ray.data.Dataset:
    """The whole anonymization plan over a listed input, as a lazy Dataset in the working schema.

    ``done``: ids (an Arrow array or its object ref) to drop before fetching, on ``--resume``.
    Nothing executes here.
    """
    from u2s.io.decode_stage import DecodeStage
    from u2s.io.readers import read_listing
    from u2s.map_pool import actor_stage
    from u2s.stage1.engines import ENGINES
    from u2s.stage1.pool import pool_class
    from u2s.stage2.runner import EditStage

    if listing.stage1_from is not None:  # stage 1's results come with the rows
        from u2s.io.stage1_from import read_stage1_from

        ds = read_stage1_from(listing, cfg.storage, cfg.ray.decode, done)
    else:
        ds = read_listing(listing, cfg.input, cfg.storage, cfg.ray.decode, done)
    decode = DecodeStage(cfg.decode, thumbnail_side(cfg), cfg.output.metadata)
    ds = ds.map_batches(
        _stateless,
        fn_kwargs={"stage": decode},
        batch_size=cfg.ray.decode.batch_size,
        batch_format="pyarrow",
        **cfg.ray.decode.ray_remote_args(),
    )
    if listing.stage1_from is not None:
        from u2s.io.stage1_from import apply_stage1_results

        ds = ds.map_batches(apply_stage1_results, batch_size=cfg.ray.decode.batch_size,
                            batch_format="pyarrow", **cfg.ray.decode.ray_remote_args())  # fmt: skip
    for pool in stage1_pools(cfg):
        pool_args = None
        if ENGINES[pool.engine].vllm_pool:  # several batches in flight per actor; a group for TP > 1
            from u2s.stage1.engines.vllm_pool import pool_kwargs

            pool_args = pool_kwargs(pool.resources, cfg.stage1.vllm_for(pool.vision))
        ds = actor_stage(ds, pool_class(pool), pool.resources, pool_args, stage1=cfg.stage1, pool=pool,
                         storage=cfg.storage)  # fmt: skip
    ds = actor_stage(ds, EditStage, cfg.stage2.resources, stage2=cfg.stage2, storage=cfg.storage)
    return _verified(cfg, ds)


def _verified(cfg: JobConfig, ds: ray.data.Dataset) -> ray.data.Dataset:
    """``stage2.verify``: after each edit attempt, its checks; before each later attempt, its editor.

    Unrolled, so the plan stays one stream: rows that passed (or were never edited) flow through the
    later pools as Arrow, untouched, like unflagged rows through the editor.
    """
    from u2s.map_pool import actor_stage
    from u2s.stage2.runner import EditStage
    from u2s.stage2.verify import VerifyStage

    verify, pools, side = cfg.stage2.verify, verify_pools(cfg), thumbnail_side(cfg)
    if not verify.enabled:
        return ds
    pool_args = None
    if "reinspect" in verify.checks and cfg.stage1.engine_for("inspect") == "vllm":
        from u2s.stage1.engines.vllm_pool import pool_kwargs

        pool_args = pool_kwargs(pools["verify"], cfg.stage1.vllm_for(True))
    for attempt in range(1, verify.max_attempts + 1):
        if attempt > 1:
            ds = actor_stage(ds, EditStage, pools[f"edit.{attempt}"], stage2=cfg.stage2, storage=cfg.storage,
                             attempt=attempt)  # fmt: skip
        ds = actor_stage(ds, VerifyStage, pools["verify"], pool_args, stage2=cfg.stage2, stage1=cfg.stage1,
                         attempt=attempt, thumbnail_side=side, storage=cfg.storage)  # fmt: skip
    return ds


def init_ray(
    address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None
) -> None:
    """Attach to a running cluster or start a private local one (every u2s command starts Ray this way).

    ``address`` (``ray.address``), else ``$RAY_ADDRESS`` (set by `ray job submit`), else the head that a
    local `ray start --head` recorded: u2s attaches there and says so in one line, leaving the cluster's
    own sizes as they are (``num_cpus`` and ``object_store_memory`` size only a cluster u2s starts).
    ``address="local"``, or nothing running, starts a private cluster of those sizes.
    """
    import ray

    from u2s.quiet import drop_native_notices

    if ray.is_initialized():
        return
    drop_native_notices()  # before the driver's core worker starts writing to stderr
    target = running_cluster(address)
    if target is not None:
        sizes = {"ray.num_cpus": num_cpus, "ray.object_store_memory": object_store_memory}
        ignored = [name for name, value in sizes.items() if value]
        logger.info("attaching to the Ray cluster at %s%s", target,
                    f" ({', '.join(ignored)} apply to a local cluster only)" if ignored else "")  # fmt: skip
        ray.init(address=target, runtime_env=_worker_env())
        return
    # A private, throwaway local cluster: Ray 2.60's default token auth only gets in the way here.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=False, runtime_env=_worker_env())  # fmt: skip


def _worker_env() -> dict[str, Any]:
    """The job's workers silence known-harmless library messages (:mod:`u2s.quiet`) unless the driver
    runs verbose (DEBUG logging)."""
    from u2s.quiet import WORKER_SETUP_HOOK

    verbose = logging.getLogger("u2s").isEnabledFor(logging.DEBUG)
    return {} if verbose else {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def running_cluster(address: str | None = None) -> str | None:
    """The cluster to attach to: ``address``, else ``$RAY_ADDRESS``, else the head that `ray start
    --head` recorded on this machine (Ray's own lookup); None: start a private one (``"local"`` forces it)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        return None
    if address and address != "auto":
        return address
    # Ray's own lookup of what `ray start` recorded; a record left by a head that no longer runs (no GCS
    # process on this machine) is stale: start a private cluster instead of failing to connect.
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    recorded = find_bootstrap_address(None)
    return recorded if recorded and find_gcs_addresses() else None


def warn_person_name_labels(cfg: JobConfig) -> int:
    """With ``class_folders`` labels published, warn (one line, counts only: the names are private) when
    class folders look like people's names (``George_W_Bush``); returns how many do."""
    if cfg.input.format != "class_folders" or "label" not in cfg.output.publish or cfg.input.stage1_from:
        return 0
    from u2s.io.listing import top_folders
    from u2s.schema import looks_like_person_name

    folders = top_folders(cfg.input, cfg.storage) or []  # None: too many entries to read on the driver
    named = sum(looks_like_person_name(name) for name in folders)
    if named:
        logger.warning(
            "%d of %d class folders look like people's names (First_Last); the safe table publishes them as "
            "`label`: set output.publish without label to withhold them", named, len(folders),
        )  # fmt: skip
    return named


class _Records:
    """The run's two ``_run.json`` records, kept in step attempt by attempt."""

    def __init__(self, cfg: JobConfig, previous: dict[str, Any] | None, listing: Listing) -> None:
        from u2s.run_record import config_fingerprint, now, package_versions, weights_fingerprints

        self.cfg = cfg
        self.full: dict[str, Any] = {
            "config_fingerprint": config_fingerprint(cfg),
            "input_fingerprint": listing.fingerprint,
            "weights": weights_fingerprints(cfg),
            "input": listing.stats(),
            **({"stage1_from": _source_record(listing)} if listing.stage1_from is not None else {}),
            "attempts": list((previous or {}).get("attempts", [])),
            "versions": package_versions(),
            "config": cfg.model_dump(mode="json"),
        }
        self.attempt: dict[str, Any] = {"attempt": len(self.full["attempts"]) + 1, "started": now(),
                                        "status": "running"}  # fmt: skip
        self.full["attempts"].append(self.attempt)

    def save(self, summary: RunSummary | None = None, public: bool = False) -> None:
        """Write the full record; with a ``summary`` (the run finished) or ``public`` (it ended early), the
        public one too (its dataset card only with a summary)."""
        from u2s.io.dataset_card import write_dataset_card
        from u2s.io.storage import uri_join, write_json
        from u2s.run_record import public_config
        from u2s.schema import safe_schema

        storage = self.cfg.storage
        if summary is not None:
            self.full["summary"] = asdict(summary)
        write_json(uri_join(self.cfg.output.sensitive_uri, "_run.json"), storage, self.full)
        if summary is None and not public:
            return
        counts = (
            None if summary is None
            else {k: v for k, v in asdict(summary).items() if k not in ("safe_uri", "sensitive_uri")}
        )  # fmt: skip
        record = {
            "summary": counts,
            "attempts": [
                {k: a.get(k) for k in ("attempt", "started", "finished", "status", "written")}
                for a in self.full["attempts"]
            ],
            "versions": self.full["versions"],
            "config": public_config(self.cfg),
        }
        write_json(uri_join(self.cfg.output.uri, "_run.json"), storage, record)
        if summary is not None:
            write_dataset_card(self.cfg.output.uri, storage, record, safe_schema(self.cfg.output.publish))

    def finish(self, status: str, **fields: Any) -> None:
        from u2s.run_record import now

        self.attempt.update(status=status, finished=now(), **fields)


def verify_outputs(cfg: JobConfig, expected: int, fingerprint: str | None = None) -> dict[str, Any]:
    """Every listed row exactly once in each table, else raise :class:`JobFailed`; returns the run's counts.

    Both tables are counted in Ray tasks (:func:`~u2s.io.writers.count_outputs`): the driver gets row
    counts and order-independent digests, never rows. Each table must hold ``expected`` rows, the two the
    same ids, and the sensitive table's ``(id, source)`` digest must equal the listing's ``fingerprint``
    (so a doubled row next to a missing one fails too).
    """
    from u2s.io.writers import count_outputs

    safe, sensitive = count_outputs(cfg.output, cfg.storage)
    problems = [f"{name} table: {c.rows} rows, {expected} expected"
                for name, c in (("safe", safe), ("sensitive", sensitive)) if c.rows != expected]  # fmt: skip
    if not problems and safe.ids != sensitive.ids:
        problems.append("the two tables hold different ids")
    if not problems and fingerprint is not None and f"{sensitive.rows}:{sensitive.pairs:016x}" != fingerprint:
        problems.append("the tables' ids are not the listed ones (a row doubled, another missing)")
    if problems:
        raise JobFailed("exactly-once check failed: " + "; ".join(problems))
    counts = asdict(sensitive.summary)
    counts["multi_frame"] = sensitive.multi_frame
    return counts


def run(
    cfg: JobConfig, resume: bool = False, force: bool = False, retry_errors: bool = False,
    progress: bool = False,
) -> RunSummary:  # fmt: skip
    """Run one anonymization job end to end: both tables and both ``_run.json`` records.

    ``resume``: continue an interrupted run in the same outputs (finished rows are not processed again);
    refused when the config or the input changed since, unless ``force``. ``retry_errors`` (with
    ``resume``): its error rows are processed again and replace the old ones. ``cfg.run`` stops a run whose
    rows mostly fail (:mod:`u2s.error_budget`). ``progress``: print u2s's progress line (:mod:`u2s.progress`)
    in place of Ray Data's progress output. KeyboardInterrupt (SIGINT, or SIGTERM where the caller maps it)
    ends the attempt as ``interrupted`` in both records and raises :class:`JobInterrupted`.
    """
    if retry_errors and not resume:
        raise ValueError("retry_errors needs resume: it reprocesses the error rows of an earlier run")
    import ray

    from u2s.error_budget import ErrorBudget, committed_rows, stop_message
    from u2s.io.ids import output_id_key
    from u2s.io.listing import list_input
    from u2s.io.storage import read_json, retry_transient_errors, uri_join
    from u2s.io.writers import SafeAndSensitiveDatasink, parquet_files, prepare_outputs
    from u2s.resume import reconcile
    from u2s.run_record import check_resumable
    from u2s.stage1.engines.vllm_pool import remove_placement_groups

    start = time.perf_counter()
    resuming = prepare_outputs(cfg.output, cfg.storage, resume=resume)  # both checked: no bucket made
    stage1_from = cfg.input.stage1_from  # ids, sources and stage 1's results from an earlier run
    id_key = None if stage1_from else output_id_key(cfg.input, cfg.output, cfg.storage, resume=resuming)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.object_store_memory)
    retry_transient_errors(cfg.storage)  # before the listing's Dataset exists: it keeps the context it saw
    if stage1_from:
        from u2s.io.stage1_from import adopt_id_key, list_stage1_from

        listing = list_stage1_from(cfg.input, cfg.storage, cfg.ray.decode)
        adopt_id_key(listing.stage1_from, cfg.output.sensitive_uri, cfg.storage)  # its ids are this run's
    else:
        listing = list_input(cfg.input, cfg.storage, cfg.ray.decode, id_key)
    warn_person_name_labels(cfg)
    previous = read_json(uri_join(cfg.output.sensitive_uri, "_run.json"), cfg.storage) if resuming else None
    done, retried = None, 0
    if resuming:
        # Rows were written: they must come from this config and input. None yet (an attempt that failed
        # before its first file, e.g. a model that did not load): nothing to mix, a fixed config may resume.
        if not force and parquet_files(cfg.output.uri, cfg.storage):
            check_resumable(previous, cfg, listing.fingerprint, _source_record(listing))
        state = reconcile(cfg.output, cfg.storage, retry_errors=retry_errors)
        done, retried = (state.done if len(state.done) else None), state.retried
        logger.info("resuming: %d of %d rows already written%s", len(state.done), listing.rows,
                    f", {retried} error row(s) to process again" if retry_errors else "")  # fmt: skip
    records = _Records(cfg, previous, listing)
    records.save()
    sink = SafeAndSensitiveDatasink(cfg.output, cfg.storage)
    sink.error_budget = budget = ErrorBudget.start(cfg.run)
    resumed = 0 if done is None else len(done)
    line = _progress_line(budget, listing.rows, resumed) if progress else None
    try:
        with _sigterm_as_interrupt():  # a stopped job (Ctrl-C, `kill`, a pod's end) ends as "interrupted"
            dataset = build_dataset(cfg, listing, ray.put(done) if done is not None else None)
            dataset.write_datasink(sink, ray_remote_args={"num_cpus": cfg.ray.write_num_cpus})
    except KeyboardInterrupt:
        written = committed_rows(cfg.output, cfg.storage) - resumed
        records.finish("interrupted", written=written)
        records.save(public=True)
        raise JobInterrupted(
            f"interrupted after writing {written} more row(s); rerun the same command with --resume to finish"
        ) from None
    except Exception as e:
        errors = budget.state()
        if errors.stopped:
            written = committed_rows(cfg.output, cfg.storage) - resumed
            records.finish("stopped", written=written, reasons=dict(errors.top()))
            records.save()
            raise JobFailed(stop_message(errors, cfg.run, written)) from None
        written = committed_rows(cfg.output, cfg.storage) - resumed
        records.finish("failed", written=written, error=type(e).__name__)
        records.save(public=True)
        if written == 0 and resumed == 0:
            raise JobFailed(
                f"the run stopped ({type(e).__name__}) before writing any row: if a model or setting is "
                "wrong (u2s -v run shows the traceback), fix it, then rerun the same command with --resume "
                "(with nothing written, a changed config is accepted)"
            ) from e
        raise JobFailed(
            f"the run stopped ({type(e).__name__}) after writing {written} more row(s); rerun the same "
            "command with --resume to finish it"
        ) from e
    finally:
        if line is not None:
            line.stop()
        remove_placement_groups()  # vLLM engine actors' groups (Ray Data leaves them reserved)
        budget.close()
    try:
        counts = verify_outputs(cfg, listing.rows, listing.fingerprint)
    except JobFailed:
        records.finish("failed", written=sink.summary.rows, error="exactly-once check")
        records.save(public=True)
        raise
    summary = RunSummary(
        **counts, wall_seconds=time.perf_counter() - start, resumed=resumed,
        written=sink.summary.rows, safe_uri=cfg.output.uri, sensitive_uri=cfg.output.sensitive_uri,
        listing=listing.stats(), retried=retried,
    )  # fmt: skip
    records.finish("succeeded", written=sink.summary.rows, retried=retried)
    records.save(summary)
    return summary


def _source_record(listing: Listing) -> dict[str, Any] | None:
    """What the run record keeps of the run ``input.stage1_from`` reads (None: this run runs stage 1)."""
    return None if listing.stage1_from is None else listing.stage1_from.record()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as SIGINT does (``ray.init`` makes it exit the process at once);
    the previous handler is restored after. Only the main thread can set signal handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress_line(budget: Any, total: int, resumed: int) -> Any:
    """u2s's progress line over ``budget``'s tally, with Ray Data's own progress output off (``--verbose``,
    i.e. DEBUG logging of ``u2s``, keeps Ray Data's)."""
    from u2s.progress import ProgressLine
    from u2s.quiet import quiet_ray_data

    quiet_ray_data()
    return ProgressLine(budget.progress, total, resumed).start()


def format_summary(summary: RunSummary) -> str:
    """A human-readable summary: rows by status, seconds per stage, output locations."""
    resumed = f", {summary.resumed} from an earlier attempt" if summary.resumed else ""
    lines = [f"rows: {summary.rows}  (wall {summary.wall_seconds:.1f} s{resumed})"]
    for status in ("kept", "edited", "error"):
        lines.append(f"  {status:<8}{summary.by_status.get(status, 0):>8}")
    if summary.errors_by_stage:
        lines.append(
            "errors by stage: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.errors_by_stage.items()))
        )
    if summary.metadata_removed:
        lines.append(f"metadata removed from {summary.metadata_removed} image(s)")
    if summary.multi_frame:
        lines.append(f"multi-frame inputs: {summary.multi_frame}")
    skipped = summary.listing.get("skipped_extensions") or {}
    if skipped:
        lines.append(f"files skipped by extension: {sum(skipped.values())}")
    lines.append("stage       rows   busy s   s/row")
    for stage, rows in summary.stage_rows.items():
        seconds = summary.stage_seconds.get(stage, 0.0)
        lines.append(f"  {stage:<9}{rows:>5}{seconds:>9.2f}{seconds / max(rows, 1):>8.3f}")
    lines += [f"safe dataset:       {summary.safe_uri}", f"sensitive table:    {summary.sensitive_uri}",
              f"run records:        {summary.safe_uri}/_run.json (public), "
              f"{summary.sensitive_uri}/_run.json (full)"]  # fmt: skip
    return "\n".join(lines)
