"""Per-method statistics of the metric rows: mean, 95% bootstrap CI, n, skipped (with reasons), counts.

:class:`Accumulator` is fed the metric rows batch by batch (it keeps only floats, reasons and counts);
:meth:`Accumulator.summary` returns the dict written as ``summary.json``. Each metric has an ``all``
scope (every published row of the method: kept rows are the original bytes, so they count as they
would leak) and an ``edited`` scope (only the rows the method rewrote).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from u2s.eval.job import SKIP_SUFFIX
from u2s.eval.metrics import METRICS

#: Skip reasons of a metric family that could not load (:func:`u2s.eval.metrics.unavailable_reason`).
UNAVAILABLE = "unavailable: "

#: How to enable a metric whose family misses a module (module → hint); others: ``pip install <module>``.
INSTALL_HINTS = {
    "torchvision": "pip install torchvision (the build matching the installed torch); LPIPS then "
    "downloads its VGG weights once",
}

#: eval_status values that are not scored, with the words the summary uses for them.
NOT_SCORED = {
    "no_original": "no original with this id",
    "original_error": "original unreadable",
    "anonymized_error": "anonymized image unreadable",
}


def bootstrap_ci(
    values: np.ndarray, resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean (``scipy.stats.bootstrap``); None under two values."""
    if len(values) < 2:
        return None
    if np.all(values == values[0]):  # every resample has the same mean
        return float(values[0]), float(values[0])
    from scipy.stats import bootstrap

    result = bootstrap(
        (values,), np.mean, n_resamples=resamples, confidence_level=confidence, method="percentile",
        random_state=np.random.default_rng(seed), vectorized=True, batch=max(1, 2**22 // len(values)),
    )  # fmt: skip
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)


def describe(values: list[float], resamples: int, seed: int) -> dict[str, Any]:
    """``{mean, ci95, n}`` of ``values`` (mean and CI None when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    if not len(arr):
        return {"mean": None, "ci95": None, "n": 0}
    ci = bootstrap_ci(arr, resamples, seed)
    return {"mean": float(arr.mean()), "ci95": list(ci) if ci else None, "n": len(arr)}


class _Method:
    def __init__(self) -> None:
        self.rows = 0
        self.by_status: Counter[str] = Counter()
        self.eval_status: Counter[str] = Counter()
        self.errors_by_stage: Counter[str] = Counter()
        self.values: dict[str, list[float]] = defaultdict(list)
        self.edited: dict[str, list[float]] = defaultdict(list)
        self.skipped: dict[str, Counter[str]] = defaultdict(Counter)
        self.ids: set[str] = set()


class Accumulator:
    """Collects metric rows (one per image × method) into per-method statistics."""

    def __init__(self, methods: list[str], metrics: list[str]) -> None:
        self.metrics = metrics
        self.methods = {name: _Method() for name in methods}
        self.originals: set[str] = set()

    def add(self, table: pa.Table) -> None:
        """Add a batch of rows (the job's output columns; image bytes not needed)."""
        columns = {name: table.column(name).to_pylist() for name in ("id", "method", "status", "error",
                   "eval_status")}  # fmt: skip
        for i, (row_id, method, eval_status) in enumerate(
            zip(columns["id"], columns["method"], columns["eval_status"], strict=True)
        ):
            if eval_status != "no_original":
                self.originals.add(row_id)
            if eval_status == "original_only" or method not in self.methods:
                continue
            m = self.methods[method]
            m.rows += 1
            m.ids.add(row_id)
            m.by_status[columns["status"][i] or "unknown"] += 1
            m.eval_status[eval_status] += 1
            if eval_status == "error":
                m.errors_by_stage[(columns["error"][i] or "unknown").split(":", 1)[0]] += 1
        edited = [s == "edited" for s in columns["status"]]
        scored = [s == "scored" for s in columns["eval_status"]]
        for name in self.metrics:
            values = table.column(name).to_pylist()
            reasons = table.column(name + SKIP_SUFFIX).to_pylist()
            for i, method in enumerate(columns["method"]):
                if not scored[i] or method not in self.methods:
                    continue
                m = self.methods[method]
                if values[i] is not None:
                    m.values[name].append(values[i])
                    if edited[i]:
                        m.edited[name].append(values[i])
                else:
                    m.skipped[name][reasons[i] or "no value"] += 1

    def summary(self, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
        """The ``summary.json`` dict: metric definitions and, per method, counts and statistics."""
        out: dict[str, Any] = {
            "metrics": {name: _definition(name) for name in self.metrics},
            "originals": len(self.originals),
            "methods": {},
        }
        for name, m in self.methods.items():
            stats = {}
            for metric in self.metrics:
                skipped = m.skipped[metric]
                stats[metric] = {
                    **describe(m.values[metric], resamples, seed),
                    "skipped": sum(skipped.values()),
                    "skipped_reasons": dict(sorted(skipped.items())),
                    "edited": describe(m.edited[metric], resamples, seed),
                }
            out["methods"][name] = {
                "rows": m.rows,
                "scored": m.eval_status["scored"],
                "by_status": dict(sorted(m.by_status.items())),
                "errors": m.eval_status["error"],
                "errors_by_stage": dict(sorted(m.errors_by_stage.items())),
                "not_scored": {NOT_SCORED[k]: v for k, v in sorted(m.eval_status.items()) if k in NOT_SCORED},
                "missing": len(self.originals - m.ids),
                "metrics": stats,
            }
        out["unavailable"] = unavailable_metrics(out)
        return out


def enable_hint(reason: str) -> str:
    """How to make a metric that is ``unavailable: <type> (<module>)`` available (content-free)."""
    if "ModuleNotFoundError (" in reason:
        module = reason.rsplit("(", 1)[1].rstrip(")")
        return INSTALL_HINTS.get(module, f"pip install {module}")
    return "check the metric's model setting (models.* in the eval config) and that it loads offline"


def unavailable_metrics(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per reason a metric family could not load: ``{reason, metrics, methods, hint}``, over
    the metrics :func:`is_unavailable` for some method."""
    notes: dict[str, dict[str, Any]] = {}
    for method, m in summary["methods"].items():
        for metric, stat in m["metrics"].items():
            if not is_unavailable(stat):
                continue
            reason = next(iter(stat["skipped_reasons"]))
            note = notes.setdefault(reason, {"reason": reason, "metrics": [], "methods": [],
                                             "hint": enable_hint(reason)})  # fmt: skip
            note["metrics"] += [] if metric in note["metrics"] else [metric]
            note["methods"] += [] if method in note["methods"] else [method]
    return list(notes.values())


def is_unavailable(stat: dict[str, Any]) -> bool:
    """Whether a method's metric statistics are all ``unavailable`` skips (no value at all)."""
    reasons = list(stat["skipped_reasons"])
    return not stat["n"] and len(reasons) == 1 and reasons[0].startswith(UNAVAILABLE)


def _definition(name: str) -> dict[str, str]:
    metric = METRICS[name]
    return {"label": metric.label, "group": metric.group, "direction": metric.direction,
            "description": metric.description}  # fmt: skip


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean(stat: dict[str, Any]) -> str:
    return _fmt(stat["mean"]) if stat["n"] else "–"


def _ci(stat: dict[str, Any]) -> str:
    ci = stat["ci95"]
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "n/a"


def format_summary(summary: dict[str, Any]) -> str:
    """A fixed-width table per method: metric, direction, then mean [95% CI] n over edited rows and over
    all rows, skipped; then row counts. Unavailable metrics read ``n/a*``, explained once at the end."""
    lines = []
    unavailable = summary.get("unavailable") or unavailable_metrics(summary)
    for method, m in summary["methods"].items():
        counts = ", ".join(f"{k}={v}" for k, v in m["by_status"].items())
        lines.append(f"{method}: {m['rows']} rows ({counts}), {m['scored']} scored")
        lines.append(f"  {'metric':<20}{'':<2}{'edited mean':>12}  {'95% CI':<17}{'n':>5}"
                     f"{'all mean':>10}  {'95% CI':<17}{'n':>5}{'skipped':>9}")  # fmt: skip
        for name, s in m["metrics"].items():
            info = summary["metrics"][name]
            arrow = "↑" if info["direction"] == "up" else "↓"
            if is_unavailable(s):
                lines.append(f"  {info['label']:<20}{arrow:<2}{'n/a*':>12}  {'':<17}{'':>5}{'n/a*':>10}")
                continue
            e = s["edited"]
            lines.append(
                f"  {info['label']:<20}{arrow:<2}{_mean(e):>12}  {_ci(e):<17}{e['n']:>5}"
                f"{_mean(s):>10}  {_ci(s):<17}{s['n']:>5}{s['skipped']:>9}"
            )
            if not s["n"] and s["skipped_reasons"]:
                lines.append(
                    f"    skipped: {'; '.join(f'{k} ({v})' for k, v in s['skipped_reasons'].items())}"
                )
        extra = []
        if m["errors"]:
            stages = ", ".join(f"{k}={v}" for k, v in m["errors_by_stage"].items())
            extra.append(f"error rows (not scored): {m['errors']} ({stages})")
        extra += [f"{reason}: {count}" for reason, count in m["not_scored"].items()]
        if m["missing"]:
            extra.append(f"originals missing from this method: {m['missing']}")
        lines += [f"  {text}" for text in extra]
    for note in unavailable:
        labels = ", ".join(summary["metrics"][name]["label"] for name in note["metrics"])
        lines.append(f"* n/a: {labels}: {note['reason']}. To enable: {note['hint']}.")
    return "\n".join(lines)
