"""`u2s eval` end to end on a real local Ray cluster and a real S3 server: originals, two methods' safe
tables and a sensitive table → metrics.parquet, summary.json and a report that renders in Chromium."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from u2s.demo_data import write_sample_dataset
from u2s.eval.job import ROW_SCHEMA, prepare
from u2s.schema import SAFE_SCHEMA, SENSITIVE_SCHEMA
from u2s.stage2.baselines import blur_regions
from u2s.stage2.detectors import RegionDetector
from u2s.stage2.editors.baselines import BlurConfig
from u2s.testing.browser import check_page, is_blank
from u2s.testing.tiny_models import build_tiny_clip

EDIT = "give the person a plain grey suit"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, s3_endpoint):
    """Originals (Parquet with ids), a `blur` safe table (local), a `noop` safe table (S3), the blur run's
    sensitive table."""
    import s3fs

    root = tmp_path_factory.mktemp("eval-data")
    samples = {s.kind: s.path.read_bytes() for s in write_sample_dataset(root / "samples")}
    originals = {"face": samples["face"], "badge": samples["name-badge"], "scene": samples["scene"],
                 "empty": samples["empty"]}  # fmt: skip
    images = [{"bytes": b, "path": None} for b in originals.values()]
    pq.write_table(pa.table({"id": list(originals), "image": images}), root / "originals.parquet")
    detector = RegionDetector(BlurConfig())

    def safe_row(row_id, status, image=None, caption=None, flag=None, error=None):
        cell = None if image is None else {"bytes": image, "path": None}
        return {"id": row_id, "image": cell, "status": status, "error": error, "privacy_flag": flag,
                "public_caption": caption, "editor": "blur", "seed": 0}  # fmt: skip

    def blurred(data: bytes) -> bytes:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return _png(blur_regions(img, detector(img), BlurConfig().blur_radius))

    blur_rows = [
        safe_row("face", "edited", blurred(originals["face"]), "a person in a space suit", True),
        safe_row("badge", "edited", blurred(originals["badge"]), "a conference badge", True),
        safe_row("scene", "kept", originals["scene"], None, False),
        safe_row("empty", "error", error="decode: empty file"),
    ]
    noop_rows = [safe_row(k, "kept", v, None, False) for k, v in originals.items() if k != "empty"]
    noop_rows += [
        safe_row("empty", "error", error="decode: empty file"),
        safe_row("ghost", "kept", originals["scene"]),
    ]
    (root / "blur").mkdir()
    pq.write_table(pa.Table.from_pylist(blur_rows, schema=SAFE_SCHEMA), root / "blur" / "part-0.parquet")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    bucket = "u2s-eval-data"
    fs.mkdir(bucket)
    with fs.open(f"{bucket}/noop/part-0.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(noop_rows, schema=SAFE_SCHEMA), f)
    private = (("face", "an astronaut named on his suit"), ("badge", "a badge reading Jane Doe"))
    empty = dict.fromkeys(SENSITIVE_SCHEMA.names)
    sensitive = [empty | {"id": i, "private_caption": c, "edit_instruction": EDIT, "status": "edited"}
                 for i, c in private]  # fmt: skip
    (root / "sensitive").mkdir()
    pq.write_table(
        pa.Table.from_pylist(sensitive, schema=SENSITIVE_SCHEMA), root / "sensitive" / "part-0.parquet"
    )
    return {"root": root, "noop": f"s3://{bucket}/noop", "bucket": bucket, "fs": fs,
            "clip": build_tiny_clip(root / "clip")}  # fmt: skip


def _base(dataset) -> dict:
    root = dataset["root"]
    return {
        "original": {"uri": str(root / "originals.parquet"), "format": "parquet", "id_column": "id"},
        "methods": {"blur": str(root / "blur"), "noop": dataset["noop"]},
        "sensitive_uri": str(root / "sensitive"),
        "models": {"clip": {"model": str(dataset["clip"]), "device": "cpu"}},
        "report": {"rows": 2, "thumb_size": 96},
        "bootstrap_resamples": 200,
    }


def test_prepare_sets_eval_status_for_every_case():
    ok = _png(Image.new("RGB", (8, 8), (1, 2, 3)))
    rows = [
        {"id": "a", "method": "m", "status": "edited", "has_original": True, "orig": ok, "anon": ok},
        {"id": "b", "method": "m", "status": "error", "has_original": True, "orig": ok, "anon": None},
        {"id": "c", "method": "m", "status": "kept", "has_original": None, "orig": None, "anon": ok},
        {"id": "d", "method": "m", "status": "kept", "has_original": True, "orig": b"junk", "anon": ok},
        {"id": "e", "method": "m", "status": "kept", "has_original": True, "orig": ok, "anon": b""},
        {"id": "f", "method": None, "status": None, "has_original": True, "orig": ok, "anon": None},
        {"id": "g", "method": "other", "status": "edited", "has_original": True, "orig": ok, "anon": ok,
         "edit_instruction": EDIT},
    ]  # fmt: skip
    out = prepare(pa.Table.from_pylist(rows), sensitive_method="m", sampled=False)
    assert out.schema == ROW_SCHEMA
    assert out.column("eval_status").to_pylist() == [
        "scored",
        "error",
        "no_original",
        "original_error",
        "anonymized_error",
        "original_only",
        "scored",
    ]
    assert out.column("width").to_pylist()[0] == 8
    assert (
        out.column("edit_instruction").to_pylist()[-1] is None
    )  # another run's instruction is not this one's
    sampled = prepare(pa.Table.from_pylist(rows), sensitive_method="m", sampled=True)
    assert "c" not in sampled.column("id").to_pylist()  # outside the sample: not counted as missing


@pytest.mark.slow
def test_eval_job_on_ray_and_s3(ray_cluster, dataset, s3_endpoint, tmp_path):
    from u2s.eval.config import EvalConfig
    from u2s.eval.evaluate import run_eval

    out = f"s3://{dataset['bucket']}/eval"
    cfg = EvalConfig.model_validate({**_base(dataset), "out": out, "storage": {"endpoint_url": s3_endpoint}})
    result = run_eval(cfg)
    fs = dataset["fs"]
    table = pq.read_table(f"{dataset['bucket']}/eval/metrics.parquet", filesystem=fs)
    rows = {(r["method"], r["id"]): r for r in table.to_pylist()}
    assert len(rows) == 9  # 4 + 5 rows; originals only in one method are not rows
    assert rows["noop", "ghost"]["eval_status"] == "no_original"
    assert rows["blur", "empty"]["eval_status"] == "error"
    assert not {"image", "orig", "anon", "public_caption", "private_caption"} & set(table.column_names)
    summary = json.loads(fs.cat(f"{dataset['bucket']}/eval/summary.json"))
    assert summary == json.loads(json.dumps(result.summary))
    noop, blur = summary["methods"]["noop"]["metrics"], summary["methods"]["blur"]["metrics"]
    assert summary["methods"]["blur"]["errors_by_stage"] == {"decode": 1}
    assert summary["methods"]["noop"]["not_scored"] == {"no original with this id": 1}
    # identical images (noop) against the blur baseline
    assert noop["face_sim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert noop["ssim"]["mean"] == pytest.approx(1.0) and noop["phash"]["mean"] == 0.0
    assert noop["text_sim"]["mean"] == pytest.approx(1.0)
    # dlib still finds the blurred 256 px astronaut; its identity similarity drops (different people: ~0.88)
    assert blur["face_sim"]["mean"] < noop["face_sim"]["mean"] - 0.05
    assert blur["text_sim"]["mean"] < noop["text_sim"]["mean"] - 0.3
    assert blur["ssim"]["mean"] < 1.0
    assert blur["clip_direction"]["n"] == 2  # edited rows with a private caption from --sensitive
    assert noop["clip_text"]["skipped_reasons"] == {"no public caption": 3}
    if blur["lpips"]["n"] == 0:  # no torchvision here: reported, never a silent 0
        assert all(r.startswith("unavailable: ") for r in blur["lpips"]["skipped_reasons"])
    # the report (on S3): images embedded and loaded in Chromium; off the sensitive side, so no private text
    report = tmp_path / "report.html"
    report.write_bytes(fs.cat(f"{dataset['bucket']}/eval/report.html"))
    page = report.read_text()
    assert EDIT not in page and "Jane Doe" not in page
    seen = check_page(report, tmp_path / "shot.png")
    assert seen.images >= 8 and seen.broken == 0  # 2 rows × 2 images × 2 methods + plots
    assert not is_blank(seen.screenshot)


@pytest.mark.slow
def test_eval_cli_on_the_sensitive_side_shows_texts(ray_cluster, dataset, s3_endpoint, tmp_path, tiny_models):
    from u2s.cli import app

    root = dataset["root"]
    out = root / "sensitive" / "eval"
    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({k: v for k, v in _base(dataset).items() if k in ("original", "report")}))
    result = CliRunner().invoke(app, [
        "eval", "--original", str(root / "originals.parquet"), "--config", str(config),
        "--anonymized", f"blur={root / 'blur'}", "--method", f"noop={dataset['noop']}",
        "--sensitive", str(root / "sensitive"), "--out", str(out), "--metrics", "ssim,phash,race_entropy",
        "--vlm-model", str(tiny_models["vlm"]), "--set", "models.vlm.max_new_tokens=96",
        "--set", "models.vlm.image_size=56", "--endpoint-url", s3_endpoint,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "SSIM" in result.output and "pHash distance" in result.output and "↓" in result.output
    assert f"report:  {out / 'report.html'}" in result.output
    page = (out / "report.html").read_text()
    assert EDIT in page  # the report lives on the sensitive side: the run's edit instructions are shown
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"blur", "noop"}
    assert list(summary["metrics"]) == ["race_entropy", "ssim", "phash"]
    race = summary["methods"]["noop"]["metrics"]["race_entropy"]  # the tiny VLM's answers are noise:
    assert race["n"] + race["skipped"] == 3  # every scored row has a value or a reason
    assert set(race["skipped_reasons"]) <= {"no person", "invalid answer"}


def test_method_name_defaults_to_the_runs_editor(tmp_path):
    from u2s.eval.evaluate import run_editor

    (tmp_path / "_run.json").write_text(json.dumps({"config": {"stage2": {"editor": "pixelate"}}}))
    assert run_editor(str(tmp_path)) == run_editor(str(tmp_path / "_run.json")) == "pixelate"
    assert run_editor(str(tmp_path / "nothing")) is None


def test_eval_cli_rejects_a_bad_config(tmp_path):
    from u2s.cli import app

    args = ["eval", "--original", str(tmp_path), "--anonymized", str(tmp_path), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--metrics", "face_sim,nonsense"])
    assert result.exit_code == 2
    assert "metrics" in result.output
