"""Flag evaluation: metrics by hand, manifest parsing, matching, and `u2s eval-flags` end to end."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from u2s.cli import app
from u2s.eval.flags import (
    Confusion,
    Label,
    LabelError,
    confusion,
    evaluate,
    flag_metrics,
    parse_manifest,
)
from u2s.schema import SAFE_SCHEMA, SENSITIVE_SCHEMA, new_row


def test_confusion_counts_each_cell():
    predicted = [True, True, False, False, True, False, True]
    actual = [True, False, True, False, True, False, False]
    assert confusion(predicted, actual) == Confusion(tp=2, fp=2, fn=1, tn=2)
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        confusion([True, False], [True])


def test_metrics_by_hand():
    m = flag_metrics(Confusion(tp=8, fp=2, fn=1, tn=9))
    assert m["accuracy"] == pytest.approx(17 / 20)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(8 / 9)
    assert m["f1"] == pytest.approx(2 * 0.8 * (8 / 9) / (0.8 + 8 / 9))  # = 16/19
    assert m["f1"] == pytest.approx(16 / 19)


def test_metrics_with_empty_denominators():
    assert flag_metrics(Confusion()) == {"accuracy": None, "precision": None, "recall": None, "f1": None}
    never_flagged = flag_metrics(Confusion(fn=3, tn=1))  # nothing predicted private
    assert never_flagged == {"accuracy": 0.25, "precision": None, "recall": 0.0, "f1": None}
    all_wrong = flag_metrics(Confusion(fp=2, fn=2))
    assert all_wrong == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    perfect = flag_metrics(Confusion(tp=3, tn=2))
    assert perfect == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_manifest_formats_and_label_rules():
    csv_text = "file,private\nA/1.jpg,true\nB/2.jpg,No\nc.jpg,1\n"
    assert parse_manifest(csv_text, "labels.csv") == [
        Label(True, path="A/1.jpg"), Label(False, path="B/2.jpg"), Label(True, path="c.jpg")
    ]  # fmt: skip
    vispr = "\n".join([
        json.dumps({"id": "2017_1", "image_path": "images/2017_1.jpg", "labels": ["a0_safe"]}),
        "",
        json.dumps({"id": "2017_2", "labels": ["a4_gender", "a17_color"]}),
        json.dumps({"source": "s3://b/x.png", "labels": []}),
    ])  # fmt: skip
    assert parse_manifest(vispr, "vispr.jsonl") == [
        Label(False, id="2017_1", path="images/2017_1.jpg"), Label(True, id="2017_2"),
        Label(True, path="s3://b/x.png"),
    ]  # fmt: skip
    csv_lists = 'id,labels\nx,"[""a0_safe""]"\ny,a4_gender;a9_face\nz,a0_safe a5_eye_color\n'
    assert [label.private for label in parse_manifest(csv_lists, "m.csv")] == [False, True, False]
    array = json.dumps([{"id": "a", "private": False}])
    assert parse_manifest(array, "m.json") == [Label(False, id="a")]


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("file,private\na.jpg,maybe\n", "m.csv", "line 2: not a boolean"),
        ("file,score\na.jpg,1\n", "m.csv", "line 2: needs a boolean `private` or a `labels` list"),
        ('{"private": true}\n', "m.jsonl", "line 1: needs an `id` or one of source, file, image_path"),
        ('{"id": "a", "private": true}\n{"id": \n', "m.jsonl", "line 2: invalid JSON"),
    ],
)
def test_manifest_errors_name_the_line(text, name, message):
    with pytest.raises(LabelError, match=message):
        parse_manifest(text, name)


def _row(id: str, source: str, flag: bool | None, status: str | None = None, error: str | None = None):
    return {"id": id, "source": source, "privacy_flag": flag, "status": status or
            ("edited" if flag else "kept"), "error": error}  # fmt: skip


def test_matching_by_id_exact_source_and_path_tail():
    rows = [
        _row("h1", "s3://bucket/vispr/test2017/a.jpg", True),
        _row("h2", "s3://bucket/vispr/val2017/a.jpg", False),
        _row("h3", "/data/other/b.jpg", True),
        _row("h4", "/data/c.jpg", False),
    ]
    labels = [
        Label(True, path="test2017/a.jpg"),  # tail picks h1 over h2
        Label(False, path="images/val2017/a.jpg"),  # longest common tail: h2
        Label(False, id="h3"),  # by id
        Label(True, path="/data/c.jpg"),  # exact source
        Label(True, path="a.jpg"),  # two rows share the best tail: ambiguous
        Label(True, path="missing.jpg"),
        Label(False, id="h1"),  # a second label for h1: ignored
    ]
    report = evaluate(rows, labels)
    assert report.confusion == Confusion(tp=1, fp=1, fn=1, tn=1)
    assert (report.ambiguous_labels, report.unmatched_labels, report.duplicate_labels) == (1, 1, 1)
    assert report.unlabelled_rows == 0


def test_error_rows_are_reported_apart_not_as_negatives():
    rows = [
        _row("a", "/d/a.jpg", True), _row("b", "/d/b.jpg", False),
        _row("c", "/d/c.jpg", None, "error", "inspect: invalid output after retry: x"),
        _row("d", "/d/d.jpg", None, "error", "decode: image: truncated"),
        _row("e", "/d/e.jpg", True, "error", "edit: unexpected RuntimeError"),
        _row("f", "/d/f.jpg", False),
    ]  # fmt: skip
    labels = [Label(p, id=i) for i, p in zip("abcde", [True, False, True, False, True], strict=True)]
    report = evaluate(rows, labels)
    assert report.confusion == Confusion(tp=1, tn=1)
    assert report.scored == 2 and report.metrics["recall"] == 1.0
    assert report.errors == 3
    assert report.errors_by_stage == {"inspect": 1, "decode": 1, "edit": 1}
    assert report.error_labels == {"private": 2, "public": 1}
    assert report.unlabelled_rows == 1


def _write_table(path, rows: list[dict], schema=SENSITIVE_SCHEMA) -> None:
    """A run's table (the sensitive one by default) and its full run record."""
    full = []
    for row in rows:
        base = new_row(row["id"], row["source"], None, b"not an image, never read")
        base.update(row)
        full.append({name: base[name] for name in schema.names})
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path / "part-00000.parquet")
    (path / "_run.json").write_text(json.dumps({"summary": {"sensitive_uri": str(path)}}))


def test_cli_end_to_end_on_a_parquet_table_and_a_vispr_manifest(tmp_path):
    root = "/data/vispr/test2017"
    rows = [
        _row("r1", f"{root}/1.jpg", True), _row("r2", f"{root}/2.jpg", True),
        _row("r3", f"{root}/3.jpg", False), _row("r4", f"{root}/4.jpg", True),
        _row("r5", f"{root}/5.jpg", False),
        _row("r6", f"{root}/6.jpg", None, "error", "inspect: invalid output after retry: x"),
    ]  # fmt: skip
    _write_table(tmp_path / "sensitive", rows)
    truth = {
        1: ["a9_face"],
        2: ["a0_safe"],
        3: ["a4_gender"],
        4: ["a12_name"],
        5: ["a0_safe"],
        6: ["a9_face"],
    }
    manifest = tmp_path / "vispr.jsonl"
    lines = [json.dumps({"image_path": f"test2017/{i}.jpg", "labels": labels}) for i, labels in truth.items()]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "reports" / "flags.json"
    runner = CliRunner()
    for target in (tmp_path / "sensitive", tmp_path / "sensitive" / "_run.json"):
        result = runner.invoke(app, ["eval-flags", str(target), "--labels", str(manifest), "--out", str(out)])
        assert result.exit_code == 0, result.output
        # tp: 1, 4; fp: 2; fn: 3; tn: 5 → accuracy 3/5, precision 2/3, recall 2/3, f1 2/3
        assert "5 rows scored" in result.output
        assert "recall    0.6667" in result.output and "accuracy  0.6000" in result.output
        assert "error rows (not scored): 1  by stage: inspect=1  labels: private=1" in result.output
        report = json.loads(out.read_text())
        assert report["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
        assert report["metrics"]["precision"] == pytest.approx(2 / 3)
        assert report["metrics"]["f1"] == pytest.approx(2 / 3)
        assert report["errors"] == 1 and report["positive"] == "private"


def test_cli_reads_from_s3_and_fails_cleanly(tmp_path, s3_bucket, s3_endpoint):
    import fsspec

    # The safe table publishes no paths: labels match its rows by id.
    _write_table(
        tmp_path / "safe", [_row("r1", "/x/1.jpg", True), _row("r2", "/x/2.jpg", False)], SAFE_SCHEMA
    )
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    fs.put(str(tmp_path / "safe" / "part-00000.parquet"), f"{s3_bucket}/run/safe/part-00000.parquet")
    fs.pipe(f"{s3_bucket}/labels.csv", b"id,private\nr1,true\nr2,true\n")
    runner = CliRunner()
    args = ["eval-flags", f"{s3_bucket}/run/safe", "--labels", f"{s3_bucket}/labels.csv",
            "--endpoint-url", s3_endpoint, "--out", f"{s3_bucket}/run/flags.json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(fs.cat(f"{s3_bucket}/run/flags.json"))["confusion"] == {
        "tp": 1,
        "fp": 0,
        "fn": 1,
        "tn": 0,
    }

    bad = runner.invoke(app, ["eval-flags", str(tmp_path / "safe"), "--labels", str(tmp_path / "none.csv")])
    assert bad.exit_code == 2
    (tmp_path / "nomatch.csv").write_text("id,private\nzzz,true\n")
    empty = runner.invoke(
        app, ["eval-flags", str(tmp_path / "safe"), "--labels", str(tmp_path / "nomatch.csv")]
    )
    assert empty.exit_code == 1 and "labels without a row: 1" in empty.output
