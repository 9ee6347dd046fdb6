"""Validation during fine-tuning: a tiny Ray Train run edits its val rows through the editor at every
validation step, scores them with the eval suite's metrics and writes the report beside the checkpoints."""

from __future__ import annotations

import io

import pytest

from u2s.finetune.config import FinetuneConfig
from u2s.testing.images import noise_image

#: Texts of the pairs: private, so they must not reach the report.
CAPTION, INSTRUCTION = "zq private caption", "zq secret instruction"


def _png(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def pair_rows(n: int) -> list[dict]:
    """``n`` pair rows as :func:`u2s.finetune.data.build_pairs` yields them (noise originals and edits)."""
    return [
        {"id": f"img{i:04d}", "original": _png(noise_image(72, 64, seed=i)),
         "edited": _png(noise_image(72, 64, seed=100 + i)), "edit_instruction": INSTRUCTION,
         "public_caption": CAPTION}
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.slow
def test_a_tiny_run_reports_eval_metrics_per_validation_step(
    ray_cluster, tiny_models, s3_endpoint, s3_bucket, tmp_path
):
    import ray.data
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from u2s.finetune.train_loop import train_loop_per_worker
    from u2s.io.storage import filesystem, read_json
    from u2s.testing.browser import check_page, is_blank

    cfg = FinetuneConfig.model_validate({
        "runs": [{"safe": "/unused", "sensitive": "/unused"}], "editor": "safe_attention", "method": "full",
        "train_unet": False,
        "model": {"model": str(tiny_models["instruct_pix2pix"]), "device": "cpu", "dtype": "float32"},
        "resolution": 64, "batch_size": 2, "gradient_accumulation": 1, "max_steps": 2, "learning_rate": 1e-3,
        "checkpoint_every": 2, "validate_every": 1, "clip_ratio_threshold": None, "torch_threads": 1,
        "storage_path": f"{s3_bucket}/ft", "name": "val", "storage": {"endpoint_url": s3_endpoint},
        "validation": {"num_inference_steps": 2,
                       "models": {"clip": {"model": str(tiny_models["clip"]), "device": "cpu"},
                                  "face": {"size": 64, "upsample": 0}}},
    })  # fmt: skip
    rows = pair_rows(4)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"finetune": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=cfg.name, storage_path=str(tmp_path / "ray-train")),
        datasets={"train": ray.data.from_items(rows[:2]), "val": ray.data.from_items(rows[2:])},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )  # fmt: skip
    result = trainer.fit()

    assert result.metrics["step"] == 2
    for name in ("val_loss", "val_ssim", "val_clip_text", "val_ssim_target"):
        assert isinstance(result.metrics[name], float), name
    report = read_json(f"{cfg.experiment_uri}/validation/report.json", cfg.storage)
    assert [e["step"] for e in report["steps"]] == [1, 2]
    for entry in report["steps"]:
        assert entry["rows"] == 2
        assert {"val_loss", "val_ssim", "val_clip_text", "val_ssim_target"} <= set(entry["figures"])
        assert -1 <= entry["figures"]["val_ssim"] <= 1
        # Noise images have no face and no text: those metrics are skipped with the eval suite's reasons.
        assert entry["skipped"]["face_sim"] == {"no face in the original": 2}
        assert "val_face_sim" not in entry["figures"]
    assert result.metrics["val_ssim"] == report["steps"][-1]["figures"]["val_ssim"]

    fs, path = filesystem(f"{cfg.experiment_uri}/validation/report.html", cfg.storage)
    page = tmp_path / "report.html"
    page.write_bytes(fs.cat_file(path))
    text = page.read_text(encoding="utf-8")
    for private in (CAPTION, INSTRUCTION, str(tmp_path)):
        assert private not in text and private not in str(report)
    assert text.count("<tr>") == 1 + 2  # the header and one row per validation step
    check = check_page(page, tmp_path / "report.png", height=600)
    assert check.broken == 0 and not is_blank(check.screenshot)
