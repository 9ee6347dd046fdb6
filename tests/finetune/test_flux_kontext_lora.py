"""FLUX Kontext LoRA fine-tuning on the tiny FLUX Kontext: the loss falls on a fixed batch, and the
saved adapter loads into the ``flux_kontext`` editor through ``stage2.flux_kontext.weights``."""

from __future__ import annotations

import io

import pytest

from u2s.finetune.config import FinetuneConfig
from u2s.testing.images import noise_image


def _png(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def _config(model, **fields) -> FinetuneConfig:
    return FinetuneConfig.model_validate({
        "runs": [{"safe": "/unused", "sensitive": "/unused"}], "editor": "flux_kontext", "method": "lora",
        "model": {"model": str(model), "device": "cpu", "dtype": "float32"}, "resolution": 64,
        "lora": {"rank": 4, "alpha": 4}, "storage_path": "/unused", **fields,
    })  # fmt: skip


@pytest.mark.slow
def test_lora_learns_a_fixed_batch_and_loads_into_the_editor(tiny_models, tmp_path):
    import torch
    from peft.utils import get_peft_model_state_dict

    from u2s.config import Stage2Config
    from u2s.finetune.models.flux_kontext import FluxKontextModel
    from u2s.finetune.train_loop import collate
    from u2s.stage2.editors import load_editor
    from u2s.stage2.editors.base import EditPrompt

    torch.set_num_threads(1)
    cfg = _config(tiny_models["flux_kontext"])
    rows = [
        {"id": f"r{i}", "original": _png(noise_image(72, 64, seed=i)),
         "edited": _png(noise_image(72, 64, seed=9 + i)), "edit_instruction": "replace the face",
         "public_caption": "a person"}
        for i in range(2)
    ]  # fmt: skip
    model = FluxKontextModel(cfg)
    assert model.trainable_parameters() and all(
        "lora_" in n for n, p in model.unet.named_parameters() if p.requires_grad
    )
    batch = collate(rows, cfg, generator=None)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(model.loss(model.unet, batch, torch.Generator().manual_seed(0), dropout=False))

    before = fixed_loss()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for step in range(12):
        model.loss(model.unet, batch, torch.Generator().manual_seed(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert fixed_loss() < before

    folder = model.save_weights(tmp_path / "checkpoint")
    base = {"model": cfg.model.model_dump(mode="json"), "num_inference_steps": 2, "resolution": 64}
    tuned_section = {**base, **model.editor_settings(folder)}
    plain = load_editor(Stage2Config.model_validate({"editor": "flux_kontext", "flux_kontext": base}))
    tuned = load_editor(
        Stage2Config.model_validate({"editor": "flux_kontext", "flux_kontext": tuned_section})
    )
    trained = get_peft_model_state_dict(model.transformer)
    (adapter,) = tuned.pipe.get_active_adapters()
    loaded = get_peft_model_state_dict(tuned.pipe.transformer, adapter_name=adapter)
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k].cpu(), trained[k].cpu()) for k in trained)

    image, prompt = noise_image(64, 64, seed=3), EditPrompt("replace the face")
    out_plain = plain.edit([image], [prompt], [7])[0]
    out_tuned = tuned.edit([image], [prompt], [7])[0]
    assert out_tuned.size == image.size
    assert out_tuned.tobytes() != out_plain.tobytes()
    assert tuned.edit([image], [prompt], [7])[0].tobytes() == out_tuned.tobytes()  # the adapter, not noise


def test_flux_kontext_trains_only_a_lora(tiny_models):
    from u2s.finetune.models.flux_kontext import FluxKontextModel
    from u2s.finetune.trainer import FinetuneError, finetune

    cfg = _config(tiny_models["flux_kontext"], method="full")
    with pytest.raises(FinetuneError, match="LoRA"):
        finetune(cfg)
    with pytest.raises(ValueError, match="LoRA"):
        FluxKontextModel(cfg)
