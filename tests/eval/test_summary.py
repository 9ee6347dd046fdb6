"""Per-method statistics: means, bootstrap CIs, skips with reasons, error rows and missing rows apart."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from u2s.eval.job import metric_fields
from u2s.eval.summary import Accumulator, bootstrap_ci, format_summary


def _rows(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("method", pa.string()), ("status", pa.string()),
                        ("error", pa.string()), ("eval_status", pa.string()),
                        *metric_fields(["ssim", "face_sim"])])  # fmt: skip
    full = [{name: row.get(name) for name in schema.names} for row in rows]
    return pa.Table.from_pylist(full, schema=schema)


def test_bootstrap_ci_brackets_the_mean_and_handles_small_samples():
    values = np.array([0.1, 0.4, 0.35, 0.8, 0.55, 0.6, 0.2, 0.9])
    low, high = bootstrap_ci(values, resamples=2000, seed=0)
    assert low < values.mean() < high
    assert low >= 0.1 and high <= 0.9
    assert bootstrap_ci(np.array([0.5]), 2000, 0) is None
    assert bootstrap_ci(np.array([0.5, 0.5, 0.5]), 2000, 0) == (0.5, 0.5)


def test_accumulator_counts_errors_skips_and_missing_rows_apart():
    acc = Accumulator(["blur", "u2s"], ["ssim", "face_sim"])
    acc.add(_rows([
        {"id": "a", "method": "blur", "status": "edited", "eval_status": "scored", "ssim": 0.5,
         "face_sim": 0.9},
        {"id": "b", "method": "blur", "status": "kept", "eval_status": "scored", "ssim": 1.0,
         "face_sim__skipped": "no face in the original"},
        {"id": "c", "method": "blur", "status": "error", "error": "edit: unexpected OSError",
         "eval_status": "error"},
        {"id": "a", "method": "u2s", "status": "edited", "eval_status": "scored", "ssim": 0.25,
         "face_sim__skipped": "no face in the anonymized image"},
        {"id": "z", "method": "u2s", "status": "kept", "eval_status": "no_original"},
        {"id": "b", "method": None, "eval_status": "original_only"},
        {"id": "c", "method": None, "eval_status": "original_only"},
    ]))  # fmt: skip
    summary = acc.summary(resamples=500, seed=0)
    assert summary["originals"] == 3
    blur, u2s = summary["methods"]["blur"], summary["methods"]["u2s"]
    assert (blur["rows"], blur["scored"], blur["errors"], blur["missing"]) == (3, 2, 1, 0)
    assert blur["errors_by_stage"] == {"edit": 1}
    assert blur["by_status"] == {"edited": 1, "error": 1, "kept": 1}
    assert blur["metrics"]["ssim"]["mean"] == pytest.approx(0.75)
    assert blur["metrics"]["ssim"]["n"] == 2 and blur["metrics"]["ssim"]["edited"]["mean"] == 0.5
    assert blur["metrics"]["face_sim"] | {"ci95": None} == {
        "mean": 0.9, "ci95": None, "n": 1, "skipped": 1,
        "skipped_reasons": {"no face in the original": 1}, "edited": {"mean": 0.9, "ci95": None, "n": 1},
    }  # fmt: skip
    assert u2s["missing"] == 2  # b and c exist as originals but not in u2s's table
    assert u2s["not_scored"] == {"no original with this id": 1}
    assert u2s["metrics"]["face_sim"]["mean"] is None
    assert u2s["metrics"]["face_sim"]["skipped_reasons"] == {"no face in the anonymized image": 1}
    text = format_summary(summary)
    assert "SSIM" in text and "↓" in text and "error rows (not scored): 1 (edit=1)" in text
    assert "skipped: no face in the anonymized image (1)" in text


def test_unavailable_metric_reads_n_a_once_with_how_to_enable_it():
    acc = Accumulator(["blur", "u2s"], ["ssim", "face_sim"])
    unavailable = "unavailable: ModuleNotFoundError (torchvision)"
    rows = []
    for method, ssim in (("blur", 0.5), ("u2s", 0.25)):
        rows += [
            {"id": "a", "method": method, "status": "edited", "eval_status": "scored", "ssim": ssim,
             "face_sim__skipped": unavailable},
            {"id": "b", "method": method, "status": "edited", "eval_status": "scored", "ssim": ssim + 0.1,
             "face_sim__skipped": unavailable},
            {"id": "c", "method": method, "status": "kept", "eval_status": "scored", "ssim": 1.0,
             "face_sim__skipped": unavailable},
        ]  # fmt: skip
    acc.add(_rows(rows))
    summary = acc.summary(resamples=500, seed=0)
    (note,) = summary["unavailable"]
    assert (note["reason"], note["metrics"], note["methods"]) == (unavailable, ["face_sim"], ["blur", "u2s"])
    assert "pip install torchvision" in note["hint"]
    edited = summary["methods"]["u2s"]["metrics"]["ssim"]["edited"]
    assert edited["n"] == 2 and edited["mean"] == pytest.approx(0.3)
    low, high = edited["ci95"]
    assert 0.25 <= low < 0.3 < high <= 0.35
    text = format_summary(summary)
    assert text.count("n/a*") == 4 and "unavailable" not in text.replace(
        f"* n/a: FaceSim: {unavailable}.", ""
    )
    assert text.count("pip install torchvision") == 1
    ssim_line = next(line for line in text.splitlines() if "SSIM" in line and "0.300" in line)
    assert ssim_line.split()[2:5] == ["0.300", f"[{low:.3f},", f"{high:.3f}]"]  # edited mean and CI first
