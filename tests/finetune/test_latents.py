"""Precomputed latents and text embeddings: a Ray Data pass caches them in object storage once, a second
job on the same pairs reuses the cache, and the training loss on cached rows equals the loss on images."""

from __future__ import annotations

import io

import pytest

from u2s.finetune.config import FinetuneConfig
from u2s.testing.images import noise_image


def _png(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def _rows(n: int) -> list[dict]:
    # Square images at the training side: the crop is the whole image, so no draw changes it.
    return [
        {"id": f"p{i}", "original": _png(noise_image(64, 64, seed=i)),
         "edited": _png(noise_image(64, 64, seed=50 + i)), "edit_instruction": f"edit number {i}",
         "public_caption": f"caption {i}"}
        for i in range(n)
    ]  # fmt: skip


def _config(model, editor: str, **fields) -> FinetuneConfig:
    return FinetuneConfig.model_validate({
        "runs": [{"safe": "/unused", "sensitive": "/unused"}], "editor": editor,
        "method": "lora" if editor == "flux_kontext" else "full",
        "model": {"model": str(model), "device": "cpu", "dtype": "float32"}, "resolution": 64,
        "batch_size": 2, "random_flip": 0.0, "precompute": True, "torch_threads": 1, **fields,
    })  # fmt: skip


def _same_loss(model, rows, cached_rows, cfg) -> tuple[float, float]:
    """First-step losses from images and from the cache, under the same seeded stream."""
    import torch

    from u2s.finetune.latents import cached_loss
    from u2s.finetune.train_loop import collate

    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        on_images = model.loss(model.unet, collate(rows, cfg, generator), generator)
        on_cache = cached_loss(model, model.unet, cached_rows, torch.Generator().manual_seed(5))
    return float(on_images), float(on_cache)


@pytest.mark.slow
def test_cache_is_written_once_reused_and_trains_like_the_images(
    ray_cluster, tiny_models, s3_endpoint, s3_bucket
):
    import ray.data

    from u2s.finetune.latents import fingerprint, load_model, precompute
    from u2s.finetune.train_loop import collate
    from u2s.io.storage import filesystem

    cfg = _config(tiny_models["instruct_pix2pix"], "safe_attention", storage_path=f"{s3_bucket}/ft",
                  storage={"endpoint_url": s3_endpoint})  # fmt: skip
    rows = _rows(4)
    pairs = ray.data.from_items(rows)
    _, first = precompute(cfg, pairs, collate)
    assert not first.reused and first.rows == 4 and first.uri.startswith(f"{s3_bucket}/ft/cache/")
    fs, path = filesystem(first.uri, cfg.storage)
    written = {p: fs.info(p)["ETag"] for p in fs.find(path)}
    assert any(p.endswith(".parquet") for p in written)

    again, second = precompute(cfg, ray.data.from_items(list(reversed(rows))), collate)
    assert second.reused and second.fingerprint == first.fingerprint
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find(path)} == written  # nothing encoded or written again
    assert fingerprint(cfg.model_copy(update={"resolution": 32}), pairs) != first.fingerprint

    cached_rows = {r["id"]: r for r in again.take_all()}
    assert set(cached_rows) == {r["id"] for r in rows}
    model = load_model(cfg)
    on_images, on_cache = _same_loss(model, rows[:2], [cached_rows["p0"], cached_rows["p1"]], cfg)
    assert on_cache == pytest.approx(on_images, rel=1e-4)


@pytest.mark.slow
def test_flux_kontext_cached_condition_gives_the_image_loss(tiny_models):
    import numpy as np

    from u2s.finetune.latents import Encoder
    from u2s.finetune.train_loop import collate

    cfg = _config(tiny_models["flux_kontext"], "flux_kontext", storage_path="/unused")
    rows = _rows(2)
    encoder = Encoder(cfg, collate)
    columns = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    encoded = encoder(columns)
    assert encoded["text_0"].ndim == 3 and encoded["text_1"].ndim == 2  # T5 embeddings, pooled CLIP
    cached_rows = [{key: value[i] for key, value in encoded.items()} for i in range(len(rows))]
    on_images, on_cache = _same_loss(encoder.model, rows, cached_rows, cfg)
    assert on_cache == pytest.approx(on_images, rel=1e-4)
