"""Out of device memory in the edit stage: the chunk splits and runs again smaller; a row that does not
fit even alone becomes an error row "out of memory", the rest are edited.

The tiny InstructPix2Pix editor is built through the normal config path; the fault is a forward
pre-hook on its UNet (registered by the test only) that raises a real ``torch.OutOfMemoryError``, with
CUDA's message, when the denoiser's input is larger than a memory budget (batch × latent area), as a
GPU with that much memory would.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from u2s.config import ModelConfig, Resources, Stage2Config
from u2s.schema import new_row, rows_to_table
from u2s.stage2.runner import EditStage
from u2s.testing.images import noise_image

#: Image pixels × rows the fake device holds in one denoiser call: one 128×64 image, not two, and not
#: one 128×128 image.
BUDGET = 128 * 64


def _png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def _flagged(rid: str, width: int, height: int, seed: int) -> dict:
    row = new_row(rid, f"src/{rid}", "people", _png(width, height, seed))
    row.update(privacy_flag=True, categories=["people"], public_caption="a person", private_caption="PRIVATE",
               edit_instruction="change the face", width=width, height=height)  # fmt: skip
    return row


@pytest.fixture(scope="module")
def stage(tiny_models) -> EditStage:
    ip2p = dict(
        model=ModelConfig(model=str(tiny_models["instruct_pix2pix"]), dtype="float32", device="cpu"),
        num_inference_steps=2, resolution=128,
    )  # fmt: skip
    return EditStage(
        Stage2Config(instruct_pix2pix=ip2p, seed=42, resources=Resources(batch_size=4, torch_threads=1))
    )


def test_oom_splits_the_chunk_and_isolates_the_row_that_never_fits(stage):
    attempts: list[tuple[int, tuple[int, int]]] = []  # (rows, latent size) of each denoiser call that ran

    scale = stage.editor.pipe.vae_scale_factor**2  # image pixels per latent pixel

    def small_device(module, args, kwargs):
        latents = args[0] if args else kwargs["sample"]
        rows = latents.shape[0] // 3  # IP2P runs three guidance branches per row
        if rows * latents.shape[2] * latents.shape[3] * scale > BUDGET:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0)")
        attempts.append((rows, tuple(latents.shape[2:])))

    rows = [_flagged(f"wide-{i}", 77, 50, i) for i in range(3)] + [_flagged("square", 64, 64, 9)]
    handle = stage.editor.pipe.unet.register_forward_pre_hook(small_device, with_kwargs=True)
    try:
        out = {row["id"]: row for row in stage(rows_to_table(rows)).to_pylist()}
    finally:
        handle.remove()

    assert sorted(out) == sorted(row["id"] for row in rows)  # every row once
    for i in range(3):
        row = out[f"wide-{i}"]
        assert row["status"] == "edited" and row["error"] is None, row["error"]
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (77, 50)
        assert row["image"]["bytes"] != rows[i]["image"]["bytes"]
    square = out["square"]
    assert square["status"] == "error" and square["error"] == "edit: out of memory"
    assert square["image"]["bytes"] == rows[3]["image"]["bytes"] and square["editor"] is None
    # The wide chunk of 3 split to 2 + 1, then 1 + 1: only single rows ever ran (two steps each).
    assert {n for n, _ in attempts} == {1}
    assert len(attempts) == 3 * 2


def test_an_oom_free_run_is_not_split(stage):
    calls: list[int] = []
    handle = stage.editor.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0] if args else kwargs["sample"]).shape[0] // 3),
        with_kwargs=True,
    )
    try:
        out = stage(rows_to_table([_flagged(f"wide-{i}", 77, 50, i) for i in range(3)])).to_pylist()
    finally:
        handle.remove()
    assert [row["status"] for row in out] == ["edited"] * 3
    assert calls == [3, 3]  # one chunk, two denoising steps
