"""The IP2P-family training step on the tiny pipeline: it learns; the editors load what it saves."""

from __future__ import annotations

import pytest
from finetune_helpers import finetune_config, tiny_editor

CASES = [("safe_attention", "lora"), ("instruct_pix2pix", "full")]  # with test_trainer's safe_attention full


def pair_rows(run: dict, n: int = 4) -> list[dict]:
    return [
        {"id": id, "original": run["originals"][id], "edited": run["edited"][id],
         "edit_instruction": run["prompts"][id].edit_instruction,
         "public_caption": run["prompts"][id].public_caption}
        for id in run["ids"][:n]
    ]  # fmt: skip


def train(cfg, rows: list[dict], steps: int, lr: float):
    """``steps`` AdamW steps on one fixed batch; returns (model, fixed-draw loss before, after)."""
    import torch

    from u2s.finetune.models.ip2p import IP2PModel
    from u2s.finetune.train_loop import collate

    torch.manual_seed(cfg.seed)
    model = IP2PModel(cfg)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=0)
    batch = collate(rows, cfg, None)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(model.loss(model.unet, batch, torch.Generator().manual_seed(0), dropout=False))

    before = fixed_loss()
    for _ in range(steps):
        # the fixed batch at a fixed draw: overfitting it must drive its loss down
        loss = model.loss(model.unet, batch, torch.Generator().manual_seed(0), dropout=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, before, fixed_loss()


def test_the_loss_on_a_fixed_batch_falls_when_overfitting_it(tiny_run, tiny_ip2p, tmp_path):
    """The paper's setup (SafeAttention, full UNet) at a high lr: the loss of the batch it sees halves.
    (LoRA on the tiny UNet's attention has too few weights to overfit noise; its round trip is below.)"""
    cfg = finetune_config(tiny_run, tiny_ip2p, str(tmp_path), editor="safe_attention", method="full")
    _, before, after = train(cfg, pair_rows(tiny_run), steps=10, lr=3e-3)
    assert after < 0.5 * before, (before, after)


def _state(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.mark.parametrize(("editor", "method"), CASES)
def test_saved_weights_load_into_the_editor_through_its_weights_field(
    tiny_run, tiny_ip2p, tmp_path, editor, method
):
    """save → load through ``stage2.<editor>.weights`` → the trained weights, exactly."""
    import torch

    cfg = finetune_config(tiny_run, tiny_ip2p, str(tmp_path), editor=editor, method=method)
    model, _, _ = train(cfg, pair_rows(tiny_run, 2), steps=2, lr=1e-2)
    folder = model.save_weights(tmp_path / "checkpoint")
    trained = _state(model.unet)

    state = _state(tiny_editor(tiny_ip2p, editor, weights=str(folder)).pipe.unet)
    # peft names adapters per adapter: "default" in training, "default_0" when diffusers loads them.
    state = {k.replace(".default_0.", ".default."): v for k, v in state.items()}
    assert trained.keys() == state.keys()
    for key, value in trained.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    # ... and they are trained: changed from the untrained editor's (LoRA B matrices start at zero).
    base = _state(tiny_editor(tiny_ip2p, editor).pipe.unet)
    changed = [
        k
        for k, v in trained.items()
        if ("lora_B" in k and v.abs().sum() > 0) or (k in base and not torch.equal(base[k], v))
    ]
    assert changed
