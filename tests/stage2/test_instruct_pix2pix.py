"""The InstructPix2Pix editor, loaded from a tiny saved pipeline through the registry."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from u2s.config import ModelConfig, Resources, Stage2Config
from u2s.stage2.editors import EDITORS, Editor, load_editor
from u2s.stage2.editors.base import EditPrompt
from u2s.testing.images import noise_image, pixels


def _config(tiny_models, **overrides) -> Stage2Config:
    ip2p = dict(
        model=ModelConfig(model=str(tiny_models["instruct_pix2pix"]), dtype="float32", device="cpu"),
        num_inference_steps=2, resolution=128,
    )  # fmt: skip
    return Stage2Config(**{"instruct_pix2pix": ip2p, "resources": Resources(batch_size=2, torch_threads=1),
                           **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def editor(tiny_models) -> Editor:
    return load_editor(_config(tiny_models))


def test_loads_saved_pipeline_through_registry(editor):
    from u2s.stage2.editors.instruct_pix2pix import InstructPix2PixEditor

    assert isinstance(editor, InstructPix2PixEditor)
    assert editor.name == "instruct_pix2pix" == InstructPix2PixEditor.name
    assert EDITORS["instruct_pix2pix"] is InstructPix2PixEditor
    pipe = editor.pipe
    assert pipe.unet.config.in_channels == 8  # the tiny IP2P UNet read back from disk
    assert pipe.safety_checker is None
    assert pipe.device.type == "cpu" and pipe.unet.dtype.is_floating_point


def test_working_size_at_its_resolution(editor):
    assert editor.working_size(77, 50) == (128, 64)  # long side 128, sides rounded to x64
    assert editor.working_size(4000, 3000) == (128, 128)
    assert editor.config.image_guidance_scale == 1.5  # the paper's default


def test_unknown_editor_is_rejected(tiny_models):
    cfg = _config(tiny_models).model_copy(update={"editor": "nope"})  # bypasses validation on purpose
    with pytest.raises(ValueError, match="unknown editor 'nope'"):
        load_editor(cfg)


def test_edit_keeps_working_size_and_changes_pixels(editor):
    images = [noise_image(128, 64, 0), noise_image(128, 64, 1)]
    out = editor.edit(
        images, [EditPrompt("make it blue", "a room"), EditPrompt("paint the wall", "a street")], [1, 2]
    )
    assert len(out) == 2
    for src, dst in zip(images, out, strict=True):
        assert dst.size == (128, 64) and dst.mode == "RGB"
        assert np.abs(pixels(dst) - pixels(src)).mean() > 1


def test_same_seed_same_output_different_seed_different_output(editor):
    images = [noise_image(64, 64, 3)] * 2
    prompts = [EditPrompt("replace the face", "a person")] * 2
    first = editor.edit(images, prompts, [7, 8])
    again = editor.edit(images, prompts, [7, 8])
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    other = editor.edit(images, prompts, [9, 10])
    for a, b in zip(first, other, strict=True):
        assert np.abs(pixels(a) - pixels(b)).mean() > 1


def test_edit_validates_its_inputs(editor):
    assert editor.edit([], [], []) == []
    with pytest.raises(ValueError, match="same length"):
        editor.edit([noise_image(64, 64, 0)], [EditPrompt("b", "a")], [1, 2])
    with pytest.raises(ValueError, match="one size"):
        editor.edit([noise_image(64, 64, 0), noise_image(128, 64, 0)], [EditPrompt("b", "a")] * 2, [1, 2])


def test_importing_stage2_does_not_import_torch():
    code = (
        "import sys, u2s.stage2.runner, u2s.stage2.editors, u2s.stage2.editors.instruct_pix2pix; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compile_option_compiles_the_denoiser_and_keeps_outputs(tiny_models):
    import torch

    plain = load_editor(_config(tiny_models))
    compiled = load_editor(_config(tiny_models).model_copy(update={"compile": True}))
    assert not isinstance(plain.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    images, prompts = [noise_image(64, 64, 5)], [EditPrompt("make it blue", "a room")]
    expected = pixels(plain.edit(images, prompts, [3])[0])
    assert np.abs(pixels(compiled.edit(images, prompts, [3])[0]) - expected).max() <= 2
