"""The FLUX.1 Kontext editor, loaded from a tiny saved pipeline through the registry."""

from __future__ import annotations

import pytest

from u2s.config import ModelConfig, Resources, Stage2Config
from u2s.stage2.editors import EDITORS, Editor, load_editor
from u2s.stage2.editors.base import EditPrompt
from u2s.stage2.editors.flux_kontext import FluxKontextEditor
from u2s.testing.images import max_diff, mean_diff, noise_image
from u2s.testing.tiny_models import build_tiny_flux_kontext

PROMPT = EditPrompt("replace the face with another face", "a person", "John Smith at home")


@pytest.fixture(scope="module")
def editor(tmp_path_factory) -> FluxKontextEditor:
    model = build_tiny_flux_kontext(tmp_path_factory.mktemp("tiny-kontext") / "flux_kontext")
    cfg = Stage2Config(
        editor="flux_kontext", resources=Resources(batch_size=2, torch_threads=1),
        flux_kontext={"model": ModelConfig(model=str(model), dtype="float32", device="cpu"),
                      "num_inference_steps": 3, "resolution": 128},
    )  # fmt: skip
    return load_editor(cfg)


IMAGES = [noise_image(128, 64, 0), noise_image(128, 64, 1)]


def test_loads_saved_pipeline_through_registry(editor):
    assert isinstance(editor, FluxKontextEditor) and isinstance(editor, Editor)
    assert editor.name == "flux_kontext"
    assert EDITORS["flux_kontext"] is FluxKontextEditor
    assert type(editor.pipe).__name__ == "FluxKontextPipeline" and editor.pipe.device.type == "cpu"


def test_working_size_at_its_resolution(editor):
    assert editor.config.guidance_scale == 2.5  # the default: diffusers' Kontext value
    assert editor.working_size(300, 200) == (128, 64)  # long side 128, sides rounded to x64
    assert editor.working_size(2000, 3000) == (64, 128)


def _tokens_seen(editor, run) -> list[int]:
    seen = []
    hook = editor.pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        run()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize(("size", "model_size"), [((128, 64), (128, 64)), ((100, 70), (96, 64))])
def test_output_at_input_size_model_at_working_size(editor, size, model_size):
    images = [noise_image(*size, 0), noise_image(*size, 1)]
    out = []
    tokens = _tokens_seen(editor, lambda: out.extend(editor.edit(images, [PROMPT] * 2, [1, 2])))
    assert [img.size for img in out] == [size] * 2 and all(img.mode == "RGB" for img in out)
    # no Kontext auto-resize: target + context tokens are the working size's 16x16 patches, every step
    assert tokens == [2 * (model_size[0] // 16) * (model_size[1] // 16)] * 3


def test_deterministic_per_seed(editor):
    first = editor.edit(IMAGES, [PROMPT] * 2, [5, 6])
    assert max_diff(editor.edit(IMAGES, [PROMPT] * 2, [5, 6]), first) == 0
    assert max_diff(editor.edit(IMAGES[1:], [PROMPT], [6]), first[1:]) <= 1  # batch-independent
    assert mean_diff(editor.edit(IMAGES, [PROMPT] * 2, [7, 8]), first) > 0.5


def test_follows_the_edit_instruction(editor):
    base = editor.edit(IMAGES[:1], [PROMPT], [3])
    other = EditPrompt("paint the wall blue", PROMPT.public_caption, PROMPT.private_caption)
    assert mean_diff(editor.edit(IMAGES[:1], [other], [3]), base) > 0.5
    unused = EditPrompt(PROMPT.edit_instruction, "a dog", "someone else", "a dog on a beach")
    assert max_diff(editor.edit(IMAGES[:1], [unused], [3]), base) == 0


def test_edit_validates_its_inputs(editor):
    assert editor.edit([], [], []) == []
    with pytest.raises(ValueError, match="same length"):
        editor.edit(IMAGES[:1], [PROMPT], [1, 2])
    with pytest.raises(ValueError, match="one size"):
        editor.edit([noise_image(64, 64, 0), noise_image(128, 64, 0)], [PROMPT] * 2, [1, 2])
