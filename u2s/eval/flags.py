"""Flag evaluation (PAPER.md §4, last row): ``privacy_flag`` of a run against ground-truth labels.

Read from the run's sensitive table (one row per input, with its ``source``); the safe table also
works when labels name images by ``id`` (it publishes no paths).

Positive = private. Labels come from a manifest (CSV, JSON lines or a JSON array) whose rows name an
image by ``id`` or by ``source`` / ``file`` / ``image_path``, and label it with a boolean ``private``
column or a VISPR-style ``labels`` list (private = no ``a0_safe`` label). Rows that failed in the run
(status ``error``) are reported apart, never counted as negatives. Only ids, paths and counts are read
or printed: the table's images and text columns are never loaded.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from u2s.config import StorageConfig

#: VISPR's "nothing private" attribute.
SAFE_LABEL = "a0_safe"
#: Manifest fields that name an image by path, in order of preference.
PATH_KEYS = ("source", "file", "image_path")
TABLE_COLUMNS = ("id", "status", "error", "privacy_flag")
#: Optional: only the sensitive table has it (the safe table publishes no paths by default).
SOURCE_COLUMN = "source"

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class LabelError(ValueError):
    """A manifest that cannot be read; the message names the line and the problem."""


@dataclass(frozen=True)
class Confusion:
    """Binary confusion matrix, positive = private."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def confusion(predicted: Sequence[bool], actual: Sequence[bool]) -> Confusion:
    """Confusion matrix of ``predicted`` flags against ``actual`` labels (same length, True = private)."""
    if len(predicted) != len(actual):
        raise ValueError(f"{len(predicted)} predictions for {len(actual)} labels")
    counts = Counter(zip(predicted, actual, strict=True))
    return Confusion(tp=counts[True, True], fp=counts[True, False], fn=counts[False, True],
                     tn=counts[False, False])  # fmt: skip


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def flag_metrics(c: Confusion) -> dict[str, float | None]:
    """Accuracy, precision, recall and F1; None where undefined (a zero denominator)."""
    precision = _ratio(c.tp, c.tp + c.fp)
    recall = _ratio(c.tp, c.tp + c.fn)
    f1 = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": _ratio(c.tp + c.tn, c.total), "precision": precision, "recall": recall, "f1": f1}


@dataclass(frozen=True)
class Label:
    """One manifest row: an image key (``id`` or a path) and whether the image is private."""

    private: bool
    id: str | None = None
    path: str | None = None


def parse_bool(value: Any) -> bool:
    """A boolean from JSON or CSV text (true/false, yes/no, 1/0, t/f, y/n; any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_labels(value: Any) -> list[str]:
    """A label list from JSON (a list) or CSV text (a JSON list, or names split on , ; | or spaces)."""
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    text = str(value).strip()
    if text.startswith("["):
        return [str(v).strip() for v in json.loads(text)]
    return [part for part in re.split(r"[,;|\s]+", text) if part]


def _present(record: dict, key: str) -> bool:
    value = record.get(key)
    return value is not None and value != ""


def label_from_record(record: dict, where: str) -> Label:
    """A :class:`Label` from one manifest record; ``where`` (e.g. "line 3") prefixes errors."""
    key_id = str(record["id"]).strip() if _present(record, "id") else None
    path = next((str(record[k]).strip() for k in PATH_KEYS if _present(record, k)), None)
    if key_id is None and path is None:
        raise LabelError(f"{where}: needs an `id` or one of {', '.join(PATH_KEYS)}")
    try:
        if _present(record, "private"):
            private = parse_bool(record["private"])
        elif "labels" in record and record["labels"] is not None:
            private = SAFE_LABEL not in parse_labels(record["labels"])
        else:
            raise LabelError(f"{where}: needs a boolean `private` or a `labels` list")
    except (ValueError, json.JSONDecodeError) as e:
        raise LabelError(f"{where}: {e}") from None
    return Label(private=private, id=key_id, path=path)


def parse_manifest(text: str, name: str = "") -> list[Label]:
    """Labels from manifest text: CSV (``name`` ends in .csv, or the text is not JSON), JSON lines or
    a JSON array of objects."""
    stripped = text.lstrip()
    if name.lower().endswith((".csv", ".tsv")) or not stripped.startswith(("{", "[")):
        dialect = "excel-tab" if name.lower().endswith(".tsv") else "excel"
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        return [label_from_record(rec, f"line {reader.line_num}") for rec in reader]
    if stripped.startswith("["):
        records = json.loads(stripped)
        return [label_from_record(rec, f"item {i}") for i, rec in enumerate(records)]
    labels = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelError(f"line {number}: invalid JSON ({e.msg})") from None
            labels.append(label_from_record(record, f"line {number}"))
    return labels


def read_manifest(uri: str, storage: StorageConfig | None = None) -> list[Label]:
    """Labels from a manifest at a local path or ``s3://`` URI."""
    from u2s.io.storage import filesystem

    fs, path = filesystem(uri, storage)
    with fs.open(path, "r", encoding="utf-8") as f:
        return parse_manifest(f.read(), path)


def resolve_table_uri(uri: str, storage: StorageConfig | None = None) -> str:
    """The table behind ``uri``: a run's ``_run.json`` sits in its table's folder (the public record in
    the safe table's, the full one in the sensitive table's); anything else is the table itself."""
    stripped = uri.rstrip("/")
    return stripped.rsplit("/", 1)[0] if stripped.endswith("_run.json") else uri


def read_predictions(uri: str, storage: StorageConfig | None = None) -> list[dict]:
    """The flag columns (id, status, error, privacy_flag, and source when present) of a u2s table."""
    import pyarrow.dataset as pads

    from u2s.io.storage import arrow_filesystem

    fs, path = arrow_filesystem(resolve_table_uri(uri, storage), storage)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    missing = [c for c in TABLE_COLUMNS if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{uri}: not a u2s table (missing columns: {', '.join(missing)})")
    columns = [*TABLE_COLUMNS, *([SOURCE_COLUMN] if SOURCE_COLUMN in dataset.schema.names else [])]
    return dataset.to_table(columns=columns).to_pylist()


def _components(path: str) -> list[str]:
    return [p for p in path.replace("\\", "/").split("/") if p]


def _common_tail(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


class RowIndex:
    """Finds a table row by id, by exact source, or by the longest matching path tail of its source."""

    def __init__(self, rows: Iterable[dict]) -> None:
        self.by_id: dict[str, dict] = {}
        self.by_source: dict[str, dict] = {}
        self.by_name: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            self.by_id[row["id"]] = row
            source = row.get(SOURCE_COLUMN) or ""
            if not source:
                continue
            self.by_source[source] = row
            self.by_name[posixpath.basename(source.replace("\\", "/"))].append(row)

    def find(self, label: Label) -> tuple[dict | None, bool]:
        """(row or None, ambiguous): several rows sharing the best path tail are ambiguous."""
        if label.id is not None and label.id in self.by_id:
            return self.by_id[label.id], False
        if label.path is None:
            return None, False
        if label.path in self.by_source:
            return self.by_source[label.path], False
        want = _components(label.path)
        candidates = self.by_name.get(want[-1], []) if want else []
        if not candidates:
            return None, False
        scored = [(_common_tail(want, _components(row["source"])), row) for row in candidates]
        best = max(score for score, _ in scored)
        winners = [row for score, row in scored if score == best]
        return (winners[0], False) if len(winners) == 1 else (None, True)


@dataclass
class FlagReport:
    """What ``u2s eval-flags`` prints and writes."""

    table: str
    labels: str
    scored: int
    confusion: Confusion
    metrics: dict[str, float | None]
    errors: int = 0
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    error_labels: dict[str, int] = field(default_factory=dict)
    no_prediction: int = 0
    unmatched_labels: int = 0
    ambiguous_labels: int = 0
    duplicate_labels: int = 0
    unlabelled_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["positive"] = "private"
        return out


def evaluate(rows: list[dict], labels: list[Label], table: str = "", labels_uri: str = "") -> FlagReport:
    """Match labels to rows and score ``privacy_flag``; error rows and unmatched labels are counted apart."""
    index = RowIndex(rows)
    matched: dict[str, tuple[dict, bool]] = {}
    unmatched = ambiguous = duplicates = 0
    for label in labels:
        row, is_ambiguous = index.find(label)
        if row is None:
            ambiguous += is_ambiguous
            unmatched += not is_ambiguous
        elif row["id"] in matched:
            duplicates += 1
        else:
            matched[row["id"]] = (row, label.private)
    predicted, actual = [], []
    errors_by_stage: Counter[str] = Counter()
    error_labels: Counter[str] = Counter()
    no_prediction = 0
    for row, private in matched.values():
        if row["status"] == "error":
            errors_by_stage[(row["error"] or "unknown").split(":", 1)[0]] += 1
            error_labels["private" if private else "public"] += 1
        elif row["privacy_flag"] is None:
            no_prediction += 1
        else:
            predicted.append(bool(row["privacy_flag"]))
            actual.append(private)
    c = confusion(predicted, actual)
    return FlagReport(
        table=table, labels=labels_uri, scored=c.total, confusion=c, metrics=flag_metrics(c),
        errors=sum(errors_by_stage.values()), errors_by_stage=dict(errors_by_stage),
        error_labels=dict(error_labels), no_prediction=no_prediction, unmatched_labels=unmatched,
        ambiguous_labels=ambiguous, duplicate_labels=duplicates, unlabelled_rows=len(rows) - len(matched),
    )  # fmt: skip


def evaluate_flags(table_uri: str, labels_uri: str, storage: StorageConfig | None = None) -> FlagReport:
    """Read a table (local or ``s3://``) and a label manifest, and score the flags."""
    return evaluate(read_predictions(table_uri, storage), read_manifest(labels_uri, storage), table_uri,
                    labels_uri)  # fmt: skip


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_report(report: FlagReport) -> str:
    """A human-readable table: confusion matrix, metrics, and everything left out of them."""
    c = report.confusion
    width = max(len(str(v)) for v in (c.tp, c.fp, c.fn, c.tn, "private"))
    lines = [
        f"flag evaluation: {report.scored} rows scored (positive = private)",
        f"  {'':<15}{'flagged':>{width + 10}}{'not flagged':>{width + 12}}",
        f"  {'label private':<15}{c.tp:>{width + 10}}{c.fn:>{width + 12}}",
        f"  {'label public':<15}{c.fp:>{width + 10}}{c.tn:>{width + 12}}",
    ]
    lines += [
        f"  {name:<10}{_fmt(report.metrics[name])}" for name in ("accuracy", "precision", "recall", "f1")
    ]
    if report.errors:
        stages = ", ".join(f"{k}={v}" for k, v in sorted(report.errors_by_stage.items()))
        labels = ", ".join(f"{k}={v}" for k, v in sorted(report.error_labels.items()))
        lines.append(f"error rows (not scored): {report.errors}  by stage: {stages}  labels: {labels}")
    extra = {
        "rows without a flag": report.no_prediction,
        "labels without a row": report.unmatched_labels,
        "labels matching several rows": report.ambiguous_labels,
        "labels repeating a row": report.duplicate_labels,
        "rows without a label": report.unlabelled_rows,
    }
    lines += [f"{name}: {count}" for name, count in extra.items() if count]
    return "\n".join(lines)


def write_report(report: FlagReport, uri: str, storage: StorageConfig | None = None) -> None:
    """Write the report as JSON to a local path or ``s3://`` URI."""
    from u2s.io.storage import write_json

    write_json(uri, storage, report.to_dict())
