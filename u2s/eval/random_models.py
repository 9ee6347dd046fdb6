"""Which models behind an evaluation have random weights: the tiny models of ``u2s tiny-models``.

Every tiny-model builder writes :data:`u2s.testing.tiny_models.TINY_MARKER` into its folder. The
evaluation looks for that file in the folders of its own models (CLIP, VLM, face) and of the models each
run used, read from the run's record (``_run.json``): the sensitive table's full record for the run given
with ``--sensitive``, the safe table's record otherwise (where paths are redacted, so only unredacted
entries can be checked). A model that cannot be checked (a hub id, an unreadable folder) counts as not
random. The result names config keys and method names only, never paths.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from u2s.eval.metrics import METRICS

if TYPE_CHECKING:
    from u2s.config import StorageConfig
    from u2s.eval.config import EvalConfig


def is_random(model: str | None, storage: StorageConfig | None = None) -> bool:
    """Whether the folder ``model`` (local path or URI) carries the tiny-model marker."""
    from u2s.io.storage import filesystem
    from u2s.testing.tiny_models import TINY_MARKER

    if not model or model.startswith("<"):  # unset, or "<redacted>" in a safe run record
        return False
    try:
        fs, path = filesystem(os.path.expanduser(model), storage)
        return bool(fs.exists(f"{path.rstrip('/')}/{TINY_MARKER}"))
    except Exception:  # a hub id, no access, an unsupported scheme: nothing to say
        return False


def _model_refs(tree: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """``(config key, value)`` for every string ``model`` / ``model_dir`` / ``judge`` under ``tree``."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            where = f"{prefix}.{key}" if prefix else key
            if isinstance(value, str) and key in ("model", "model_dir", "judge"):
                yield prefix or key, value
            else:
                yield from _model_refs(value, where)


def run_models(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The models a run used, from its record: stage 1's and its editor's (``stage2.<editor>``)."""
    config = record.get("config") or {}
    refs = list(_model_refs(config.get("stage1") or {}, "stage1"))
    stage2 = config.get("stage2") or {}
    editor = stage2.get("editor")
    if isinstance(editor, str):
        refs += _model_refs(stage2.get(editor) or {}, f"stage2.{editor}")
    return refs


def _read_record(uri: str, storage: StorageConfig | None) -> dict[str, Any] | None:
    from u2s.io.storage import filesystem, uri_join

    record = uri if uri.rstrip("/").endswith("_run.json") else uri_join(uri, "_run.json")
    try:
        fs, path = filesystem(record, storage)
        with fs.open(path, "r") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def eval_models(cfg: EvalConfig) -> list[tuple[str, str]]:
    """The evaluation's own models that its metrics load: ``(config key, model)``."""
    families = {METRICS[name].family for name in cfg.metrics}
    refs = []
    if "clip" in families:
        refs.append(("models.clip", cfg.models.clip.model))
    if "vlm" in families and cfg.models.vlm is not None:
        refs.append(("models.vlm.model", cfg.models.vlm.model.model))
        if cfg.models.vlm.judge is not None:
            refs.append(("models.vlm.judge", cfg.models.vlm.judge.model))
    if "face" in families and cfg.models.face.model_dir:
        refs.append(("models.face", cfg.models.face.model_dir))
    return refs


def random_models(cfg: EvalConfig) -> dict[str, list[str]]:
    """Who used random-weight models: ``{"eval": [config keys], <method>: [config keys]}`` (only those
    with at least one)."""
    found: dict[str, list[str]] = {}
    checks = {"eval": eval_models(cfg)}
    sensitive_method = next(iter(cfg.methods)) if cfg.sensitive_uri else None
    for method, uri in cfg.methods.items():
        record = _read_record(cfg.sensitive_uri, cfg.storage) if method == sensitive_method else None
        record = record or _read_record(uri, cfg.storage)
        checks[method] = run_models(record) if record else []
    for who, refs in checks.items():
        keys = [key for key, model in refs if is_random(model, cfg.storage)]
        if keys:
            found[who] = list(dict.fromkeys(keys))
    return found
