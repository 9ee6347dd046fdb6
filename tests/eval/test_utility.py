"""Utility evaluation: transforms, model loading, split checks, and `u2s eval-utility` end to end on
Ray Train (a tiny ViT built from a config, class-folder and safe-table splits, local and on S3)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from u2s.cli import app
from u2s.config import ConfigError, StorageConfig
from u2s.eval import augment
from u2s.eval.classifier_data import SplitError, SplitSource, SplitStats, resolve_source
from u2s.eval.utility import (
    ClassifierConfig,
    SplitResult,
    UtilityConfig,
    UtilityReport,
    evaluate_utility,
    format_report,
    load_utility_config,
)
from u2s.io.storage import filesystem
from u2s.schema import SAFE_SCHEMA, new_row
from u2s.testing.images import noise_image
from u2s.testing.tiny_classifiers import TINY_IMAGE_SIZE, build_tiny_vit_classifier, build_tiny_vit_mae

#: Classes learnable by construction: a dominant colour each (plus pixel noise, so no two images match).
COLOURS = {"blue": (40, 40, 210), "green": (40, 210, 40), "red": (210, 40, 40)}
#: An anonymizer that swapped the class content: every class carries another class's colour. Its
#: classifier learns the wrong colour for each class, so its test top-1 is near 0 whatever the seed
#: (images with no class signal at all would leave the outcome to the random head).
SWAPPED = {"blue": COLOURS["green"], "green": COLOURS["red"], "red": COLOURS["blue"]}


def png(colour: tuple[int, int, int], rng: np.random.Generator, size: int = 40) -> bytes:
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-30, 31, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


LOCAL = StorageConfig()


def class_folders(root: str, per_class: int, colours: dict, storage: StorageConfig = LOCAL) -> str:
    """``root/<class>/<i>.png`` on a local path or S3; returns ``root``."""
    fs, path = filesystem(root, storage)
    rng = np.random.default_rng(0)
    for label, colour in colours.items():
        for i in range(per_class):
            fs.makedirs(f"{path}/{label}", exist_ok=True)  # a no-op on S3
            fs.pipe(f"{path}/{label}/{i}.png", png(colour, rng))
    return root


def safe_table(
    uri: str, rows: list[tuple[str | None, str, bytes | None]], storage: StorageConfig = LOCAL
) -> str:
    """A u2s safe table at ``uri`` (local or S3) from (label, status, image bytes) triples."""
    records = []
    for i, (label, status, data) in enumerate(rows):
        row = new_row(f"id{i}", f"src/{i}.png", label, data)
        row["status"] = status
        if status == "error":
            row["error"] = "edit: RuntimeError"
            row["image"] = None
        records.append({name: row.get(name) for name in SAFE_SCHEMA.names})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=SAFE_SCHEMA), buf)
    fs, path = filesystem(uri, storage)
    fs.makedirs(path, exist_ok=True)
    fs.pipe(f"{path}/part-0.parquet", buf.getvalue())
    return uri


def table_rows(colours: dict, per_class: int, seed: int = 1) -> list[tuple[str, str, bytes]]:
    rng = np.random.default_rng(seed)
    statuses = ("kept", "edited")
    return [(label, statuses[i % 2], png(colour, rng)) for label, colour in colours.items()
            for i in range(per_class)]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    return build_tiny_vit_classifier(tmp_path_factory.mktemp("tiny-vit"))


# ------------------------------------------------------------------------------------------ transforms


def test_random_resized_crop_size_and_full_crop():
    rng = np.random.default_rng()
    img = noise_image(60, 45)
    assert augment.random_resized_crop(img, 24, rng).size == (24, 24)
    # Scale 1 with the image's own aspect ratio can only pick the whole image: a plain resize.
    whole = augment.random_resized_crop(img, 24, rng, scale=(1.0, 1.0), ratio=(60 / 45, 60 / 45))
    assert np.array_equal(np.asarray(whole), np.asarray(img.resize((24, 24), Image.Resampling.BICUBIC)))
    # No crop can satisfy an impossible ratio: the fallback is a centre crop clamped to the ratio.
    tall = Image.new("RGB", (10, 100), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 45, 10, 55))  # white band in the middle
    crop = np.asarray(augment.random_resized_crop(tall, 8, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    assert crop.mean() > 200  # the 10×10 centre square is the white band


def test_eval_transform_keeps_the_centre_875_percent():
    """Resize the short side to 256 for a 224 crop, then centre-crop: on the short side a border narrower
    than 16 px is cut away and a wider one stays; the long side (320) loses 48 px at each end."""
    thin, wide = Image.new("RGB", (256, 320), (255, 0, 0)), Image.new("RGB", (256, 320), (255, 0, 0))
    thin.paste((0, 255, 0), (12, 12, 244, 308))  # 12 px red frame < 16 px cut per side
    wide.paste((0, 255, 0), (24, 24, 232, 296))  # 24 px red frame > 16 px
    out_thin, out_wide = augment.eval_transform(thin, 224), augment.eval_transform(wide, 224)
    assert out_thin.shape == out_wide.shape == (224, 224, 3)
    assert out_thin[..., 0].max() < 60  # no red left
    assert out_wide[:, :4, 0].min() > 200 and out_wide[:, -4:, 0].min() > 200  # red left and right
    assert out_wide[:4, 8:-8, 0].max() < 60  # the 24 px frame at the top was in the 48 px cut
    small = augment.eval_transform(noise_image(50, 30), 32)  # upscaled short side, still 32×32
    assert small.shape == (32, 32, 3)


def test_flip_and_output_format():
    half = Image.new("RGB", (40, 40), (255, 0, 0))
    half.paste((0, 0, 255), (20, 0, 40, 40))  # red left, blue right
    out = augment.train_transform(half, 16, np.random.default_rng(), scale=(1.0, 1.0), hflip=1.0, num_ops=0)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert out[:, :6, 2].min() > 200 and out[:, -6:, 0].min() > 200  # blue now left, red right


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_geometric_ops_are_identity_at_magnitude_zero_and_move_pixels_at_ten(name):
    img = noise_image(32, 32, seed=3)
    op, rng = augment.RAND_OPS[name], np.random.default_rng()
    assert np.array_equal(np.asarray(op(img, 0.0, rng)), np.asarray(img))
    moved = np.asarray(op(img, 10.0, rng)).astype(int)
    assert np.abs(moved - np.asarray(img)).mean() > 20
    assert (moved == augment.FILL).all(axis=-1).any()  # uncovered pixels get timm's fill colour


@pytest.mark.parametrize("name", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops_are_identity_at_magnitude_five(name):
    """timm maps magnitude m to the factor 0.1 + 1.8·m/10: 5 → 1.0 (unchanged), 10 → 1.9."""
    img = noise_image(24, 24, seed=4)
    op, rng = augment.RAND_OPS[name], np.random.default_rng()
    assert np.array_equal(np.asarray(op(img, 5.0, rng)), np.asarray(img))
    assert not np.array_equal(np.asarray(op(img, 10.0, rng)), np.asarray(img))


def test_colour_ops_follow_timm_levels():
    img, rng = noise_image(24, 24, seed=5), np.random.default_rng()
    pixels = np.asarray(img)
    assert np.array_equal(np.asarray(augment.RAND_OPS["Solarize"](img, 10.0, rng)), pixels)  # threshold 256
    assert np.array_equal(np.asarray(augment.RAND_OPS["Solarize"](img, 0.0, rng)), 255 - pixels)
    assert np.array_equal(np.asarray(augment.RAND_OPS["Invert"](img, 3.0, rng)), 255 - pixels)
    posterized = np.asarray(augment.RAND_OPS["Posterize"](img, 10.0, rng))  # keep 4 bits
    assert (posterized % 16 == 0).all() and np.abs(posterized.astype(int) - pixels).max() < 16
    added = np.asarray(augment.RAND_OPS["SolarizeAdd"](img, 10.0, rng)).astype(int)  # +110 below 128
    low = pixels < 128
    assert np.array_equal(added[low], np.minimum(255, pixels[low].astype(int) + 110))
    assert np.array_equal(added[~low], pixels[~low])


def test_rand_augment_draws_and_probability():
    img = noise_image(24, 24, seed=6)
    assert augment.rand_augment(img, np.random.default_rng(), num_ops=0) is img
    assert augment.rand_augment(img, np.random.default_rng(), num_ops=4, prob=0.0) is img
    a = augment.rand_augment(img, np.random.default_rng(7), num_ops=2, prob=1.0)
    b = augment.rand_augment(img, np.random.default_rng(7), num_ops=2, prob=1.0)
    assert np.array_equal(np.asarray(a), np.asarray(b))  # reproducible from the generator
    changed = [
        not np.array_equal(np.asarray(augment.rand_augment(img, np.random.default_rng(), 2, prob=1.0)),
                           np.asarray(img))
        for _ in range(20)
    ]  # fmt: skip
    assert sum(changed) >= 15  # two ops at magnitude ~9 nearly always change a noise image


# ------------------------------------------------------------------------------------------ model


@pytest.mark.slow
def test_mae_checkpoint_loads_into_vit_classifier(tmp_path):
    """MAE's checkpoint type has no classification class: its encoder loads into ViTForImageClassification
    with a new, seeded head over the dataset's classes."""
    from transformers import ViTForImageClassification, ViTMAEForPreTraining

    from u2s.eval.classifier_train import load_classifier, model_inputs, param_groups

    mae_dir = build_tiny_vit_mae(tmp_path / "mae")
    cfg = ClassifierConfig(model=str(mae_dir))
    model = load_classifier(cfg, ["a", "b", "c"])
    assert isinstance(model, ViTForImageClassification)
    assert model.classifier.out_features == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    mae = ViTMAEForPreTraining.from_pretrained(mae_dir)
    ours, theirs = model.state_dict(), mae.state_dict()
    encoder = [k for k in theirs if k.startswith("vit.")]  # MAE's encoder; its decoder is dropped
    assert len(encoder) > 30 and all(ours[k].equal(theirs[k]) for k in encoder)
    assert set(ours) - set(encoder) == {"classifier.weight", "classifier.bias"}
    again = load_classifier(cfg, ["a", "b", "c"])
    other_seed = load_classifier(cfg.model_copy(update={"seed": 1}), ["a", "b", "c"])
    assert again.classifier.weight.equal(model.classifier.weight)  # the same head for every split
    assert not other_seed.classifier.weight.equal(model.classifier.weight)

    probe = load_classifier(cfg.model_copy(update={"mode": "linear_probe"}), ["a", "b"])
    trainable = {name for name, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    decay, no_decay = param_groups(probe, 0.05)
    assert [p.ndim for p in decay["params"]] == [2] and [p.ndim for p in no_decay["params"]] == [1]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0

    inputs = model_inputs(cfg)
    assert (inputs.size, inputs.mean, inputs.std) == (TINY_IMAGE_SIZE, (0.5,) * 3, (0.5,) * 3)
    custom = model_inputs(cfg.model_copy(update={"image_size": 48, "image_mean": (0.1, 0.2, 0.3)}))
    assert (custom.size, custom.mean, custom.std) == (48, (0.1, 0.2, 0.3), (0.5,) * 3)
    with pytest.raises(ValueError, match="no head module 'fc'"):
        load_classifier(cfg.model_copy(update={"head": "fc"}), ["a", "b"])


# ------------------------------------------------------------------------------------------ config + report


def test_config_from_yaml_options_and_overrides(tmp_path):
    yaml_file = tmp_path / "utility.yaml"
    yaml_file.write_text("original: {uri: data/train}\ntest: {uri: s3://b/test, format: class_folders}\n"
                         "classifier: {epochs: 50, base_lr: 1.0e-3}\n")  # fmt: skip
    cfg = load_utility_config(
        yaml_file,
        {"methods": {"u2s": {"uri": "s3://b/safe"}}},
        ["classifier.mode=linear_probe", "num_workers=4"],
    )
    assert cfg.original.uri == str(Path("data/train").absolute()) and cfg.test.format == "class_folders"
    assert (cfg.classifier.epochs, cfg.classifier.base_lr, cfg.classifier.mode) == (50, 1e-3, "linear_probe")
    assert cfg.classifier.batch_size * cfg.classifier.accum_steps == 256  # the paper's effective batch
    assert cfg.num_workers == 4 and cfg.methods["u2s"].uri == "s3://b/safe"
    base = {"original": {"uri": "a"}, "test": {"uri": "b"}}
    with pytest.raises(ConfigError, match="methods: Value error, give at least one"):
        load_utility_config(None, {**base, "methods": {}})
    with pytest.raises(ConfigError, match="'original' names the reference split"):
        load_utility_config(None, {**base, "methods": {"original": {"uri": "c"}}})
    with pytest.raises(ConfigError, match=r"classifier\.crop_scale"):
        load_utility_config(
            None, {**base, "methods": {"x": {"uri": "c"}}}, ["classifier.crop_scale=[0.5, 0.2]"]
        )
    with pytest.raises(ConfigError, match=r"classifier\.epoch"):
        load_utility_config(None, {**base, "methods": {"x": {"uri": "c"}}}, ["classifier.epoch=3"])


def test_report_table_and_json():
    stats = SplitStats(uri="u", format="table", rows=10, used=8, excluded={"error row": 2}, labels={"a": 8})
    report = UtilityReport(
        model="m", mode="finetune", epochs=3, num_workers=2, use_gpu=False, classes=["a", "b"],
        test=SplitStats(uri="t", format="class_folders", rows=4, used=4, labels={"a": 2, "b": 2}),
        results=[
            SplitResult("original", stats, top1=0.75, mean_class_accuracy=0.75, n_scored=4, delta_top1=0.0),
            SplitResult("u2s", stats, top1=0.5, mean_class_accuracy=0.5, n_scored=4, delta_top1=-0.25,
                        missing_classes=["b"]),
        ],
    )  # fmt: skip
    text = format_report(report)
    assert "m (finetune, 3 epochs, 2 CPU worker(s)); test: 4 images, 2 classes" in text
    original_line = next(line for line in text.splitlines() if line.startswith("original "))
    u2s_line = next(line for line in text.splitlines() if line.startswith("u2s "))
    assert original_line.split() == ["original", "8", "2", "4", "75.00%", "—", "75.00%"]
    assert u2s_line.split() == ["u2s", "8", "2", "4", "50.00%", "-25.00", "pp", "50.00%"]
    assert "u2s: excluded from training: error row: 2" in text
    assert "u2s: no training image for 1 class(es)" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["results"][1]["delta_top1"] == -0.25 and data["results"][1]["train"]["excluded"] == {
        "error row": 2
    }


def test_split_formats_are_detected(tmp_path):
    folders = class_folders(str(tmp_path / "folders"), 1, {"a": (0, 0, 0)})
    table = safe_table(str(tmp_path / "safe"), [("a", "kept", png((0, 0, 0), np.random.default_rng()))])
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"image": [b"x"], "label": ["a"]}), plain / "data.parquet")
    run_json = Path(table) / "_run.json"  # a run's public record sits in its safe table's folder
    run_json.write_text(json.dumps({"summary": {"rows": 1}}))
    storage = StorageConfig()
    assert resolve_source(SplitSource(uri=folders), storage).format == "class_folders"
    assert resolve_source(SplitSource(uri=table), storage).format == "table"
    assert resolve_source(SplitSource(uri=str(plain)), storage).format == "parquet"
    resolved = resolve_source(SplitSource(uri=str(run_json)), storage)
    assert (resolved.uri, resolved.format) == (table, "table")
    assert (
        resolve_source(SplitSource(uri=table, format="parquet"), storage).format == "parquet"
    )  # explicit wins
    with pytest.raises(SplitError, match="split not found"):
        resolve_source(SplitSource(uri=str(tmp_path / "nope")), storage)


# ------------------------------------------------------------------------------------------ Ray


def _config(tiny_vit: Path, tmp_path: Path, **splits) -> UtilityConfig:
    return UtilityConfig(**splits, classifier=ClassifierConfig(model=str(tiny_vit), epochs=1, batch_size=8),
                         storage_path=str(tmp_path / "ray-results"))  # fmt: skip


@pytest.mark.slow
def test_load_split_reads_every_format_and_counts_exclusions(tmp_path, ray_cluster):
    from u2s.eval.classifier_data import load_split

    rng = np.random.default_rng(3)
    folders = class_folders(str(tmp_path / "folders"), 2, {"a": (0, 0, 0), "b": (255, 255, 255)})
    (tmp_path / "folders" / "b" / "broken.png").write_bytes(b"not a png")
    plain = tmp_path / "plain"
    plain.mkdir()
    images = [{"bytes": png((0, 0, 0), rng), "path": None}, {"bytes": b"junk", "path": None}, None]
    pq.write_table(pa.table({"image": images, "label": ["x", "y", "y"]}), plain / "data.parquet")
    rows = [("a", "kept", png((0, 0, 0), rng)), ("b", "edited", png((9, 9, 9), rng)), ("a", "error", None)]
    table = safe_table(str(tmp_path / "safe"), rows)

    ds, stats = load_split("folders", SplitSource(uri=folders), LOCAL)
    assert (stats.format, stats.rows, stats.used, stats.excluded) == (
        "class_folders",
        5,
        4,
        {"undecodable": 1},
    )
    assert stats.labels == {"a": 2, "b": 2}
    assert sorted(r["label"] for r in ds.take_all()) == ["a", "a", "b", "b"]  # only usable rows remain
    _, stats = load_split("plain", SplitSource(uri=str(plain)), LOCAL)
    assert (stats.format, stats.used, stats.labels) == ("parquet", 1, {"x": 1})
    assert stats.excluded == {"undecodable": 1, "unreadable": 1}  # junk bytes; a row without an image
    ds, stats = load_split("safe", SplitSource(uri=table), LOCAL)
    assert (stats.format, stats.used, stats.excluded, stats.labels) == ("table", 2, {"error row": 1},
                                                                        {"a": 1, "b": 1})  # fmt: skip
    assert {r["image"] for r in ds.take_all()} == {rows[0][2], rows[1][2]}  # the bytes, untouched


@pytest.mark.slow
def test_bad_splits_fail_before_training(tmp_path, tiny_vit, ray_cluster):
    rng = np.random.default_rng(2)
    good = class_folders(str(tmp_path / "train"), 2, COLOURS)
    test = class_folders(str(tmp_path / "test"), 1, COLOURS)
    unlabelled = safe_table(str(tmp_path / "unlabelled"), [(None, "kept", png((0, 0, 0), rng))] * 2)
    all_errors = safe_table(str(tmp_path / "errors"), [("red", "error", None)] * 3)
    zebra = class_folders(str(tmp_path / "zebra-test"), 1, {**COLOURS, "zebra": (9, 9, 9)})
    no_label_column = tmp_path / "no-label"
    no_label_column.mkdir()
    pq.write_table(pa.table({"image": [png((0, 0, 0), rng)]}), no_label_column / "x.parquet")

    def run(original: str, method: str, test_uri: str = test, workers: int = 1) -> None:
        splits = {"original": SplitSource(uri=original), "methods": {"u2s": SplitSource(uri=method)},
                  "test": SplitSource(uri=test_uri)}  # fmt: skip
        evaluate_utility(_config(tiny_vit, tmp_path, **splits).model_copy(update={"num_workers": workers}))

    with pytest.raises(SplitError, match=r"split 'u2s' .* 2 of 2 rows have no label"):
        run(good, unlabelled)
    with pytest.raises(SplitError, match=r"column 'label' not in"):
        run(str(no_label_column), good)
    with pytest.raises(SplitError, match=r"split 'u2s' .* has no usable rows \(3 rows; error row: 3\)"):
        run(good, all_errors)
    with pytest.raises(SplitError, match=r"label set mismatch: split 'test' has 1 label\(s\) .* \(zebra\)"):
        run(good, good, zebra)
    with pytest.raises(SplitError, match=r"label set mismatch: split 'u2s'"):
        run(test, zebra)
    with pytest.raises(SplitError, match=r"split 'u2s': 1 training images cannot be split over 2 workers"):
        run(good, safe_table(str(tmp_path / "one"), [("red", "kept", png((0, 0, 0), rng))]), workers=2)
    args = ["eval-utility", "--original", good, "--anonymized", good, "--test", test, "--use-gpu"]
    no_gpu = CliRunner().invoke(app, args)
    assert no_gpu.exit_code == 2 and "the Ray cluster has no GPU" in no_gpu.output
    result = CliRunner().invoke(app, ["eval-utility", "--original", good, "--anonymized", all_errors,
                                      "--test", test, "--model", str(tiny_vit)])  # fmt: skip
    assert result.exit_code == 2
    assert "eval-utility: split 'anonymized'" in result.output and "no usable rows" in result.output


@pytest.mark.slow
def test_eval_utility_end_to_end(tmp_path, tiny_vit, ray_cluster, s3_endpoint, s3_bucket):
    """Original class folders (local), an anonymized safe table and the test split on S3, two Ray Train
    workers: the original-trained classifier learns the classes, the swapped-content one loses them."""
    s3 = StorageConfig(endpoint_url=s3_endpoint)
    original = class_folders(str(tmp_path / "train"), 16, COLOURS)
    errors = [("red", "error", None), ("blue", "error", None), ("green", "error", None)]
    anonymized = safe_table(f"{s3_bucket}/run/safe", table_rows(SWAPPED, 16) + errors, s3)
    test = class_folders(f"{s3_bucket}/test", 7, COLOURS, s3)  # 21 images: an equal split would drop one
    out = f"{s3_bucket}/reports/utility.json"
    args = [
        "eval-utility",
        "--original",
        original,
        "--anonymized",
        anonymized,
        "--test",
        test,
        "--out",
        out,
        "--model",
        str(tiny_vit),
        "--epochs",
        "4",
        "--num-workers",
        "2",
        "--no-use-gpu",
        "--endpoint-url",
        s3_endpoint,
        "--set",
        f"storage_path={tmp_path / 'ray-results'}",
        "--set",
        "cpus_per_worker=0.5",
        "--set",
        "preprocess_cpus=0.5",
        "--set",
        "classifier.batch_size=8",
        "--set",
        "classifier.accum_steps=1",
        "--set",
        "classifier.base_lr=0.05",
        "--set",
        "classifier.warmup_epochs=0",
        "--set",
        "classifier.randaugment_ops=0",
    ]  # fmt: skip  (RandAugment is tested above; here learnability is the point)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    fs, path = filesystem(out, s3)
    report = json.loads(fs.cat(path))
    by_name = {r["name"]: r for r in report["results"]}
    assert report["classes"] == ["blue", "green", "red"] and report["num_workers"] == 2
    assert report["test"]["used"] == 21 and report["test"]["format"] == "class_folders"
    assert (
        by_name["original"]["train"]["used"] == 48
        and by_name["original"]["train"]["format"] == "class_folders"
    )
    assert by_name["anonymized"]["train"] == {
        "uri": anonymized, "format": "table", "rows": 51, "used": 48, "excluded": {"error row": 3},
        "labels": {"blue": 16, "green": 16, "red": 16},
    }  # fmt: skip
    assert all(r["n_scored"] == 21 for r in report["results"])  # every test image scored exactly once
    assert by_name["original"]["top1"] >= 0.9  # chance is 1/3
    assert by_name["anonymized"]["top1"] <= 0.2
    assert by_name["original"]["delta_top1"] == 0.0
    assert by_name["anonymized"]["delta_top1"] <= -0.7
    assert by_name["original"]["train_top1"] >= 0.9
    lines = result.output.splitlines()
    assert any(line.split()[:2] == ["anonymized", "48"] and "pp" in line for line in lines)
    assert "anonymized: excluded from training: error row: 3" in result.output
    assert f"report: {out}" in result.output
