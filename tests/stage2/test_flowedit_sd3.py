"""FlowEdit on a tiny saved SD3 pipeline: the ODE against the authors' algorithm, its identities, sizes."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from PIL import Image

from u2s.config import ModelConfig, Resources, Stage2Config
from u2s.schema import new_row, rows_to_table
from u2s.stage2.editors import EDITORS, Editor, load_editor
from u2s.stage2.editors.base import EditPrompt
from u2s.stage2.editors.flowedit_sd3 import FlowEditSD3Config, FlowEditSD3Editor, flowedit_size
from u2s.stage2.runner import EditStage, row_seed
from u2s.testing.images import max_diff, mean_diff, noise_image
from u2s.testing.tiny_models import build_tiny_sd3

STEPS = 8
PROMPT = EditPrompt(
    edit_instruction="replace the man with a woman",
    public_caption="a person in a kitchen",
    private_caption="John Smith cooking in his kitchen",
    combined_caption="a woman in a kitchen",
)


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> str:
    return str(build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3") / "sd3"))


def _settings(model: str, **flowedit) -> FlowEditSD3Config:
    return FlowEditSD3Config(
        model=ModelConfig(model=model, dtype="float32", device="cpu"),
        **{"num_inference_steps": STEPS, "n_max": 6, **flowedit},
    )


def _config(model: str, **flowedit) -> Stage2Config:
    return Stage2Config(
        editor="flowedit_sd3", flowedit_sd3=_settings(model, **flowedit),
        resources=Resources(batch_size=2, torch_threads=1),
    )  # fmt: skip


@pytest.fixture(scope="module")
def editor(sd3_model) -> FlowEditSD3Editor:
    return load_editor(_config(sd3_model))


@pytest.fixture
def configure(editor):
    """Run the shared editor under other FlowEdit settings for one test."""
    original = editor.config

    def apply(**flowedit) -> FlowEditSD3Editor:
        editor.config = _settings(original.model.model, **flowedit)
        return editor

    yield apply
    editor.config = original


IMAGES = [noise_image(128, 64, 0), noise_image(128, 64, 1)]


def _vae_round_trip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    with torch.inference_mode():
        latents = pipe.vae.encode(pipe.image_processor.preprocess(images)).latent_dist.mode()
        return pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")


def _reference_flowedit(pipe, image, source, target, seed, *, n_max, n_min=0, g_src=3.5, g_tgt=13.5):
    """The authors' FlowEditSD3 (fallenshock/FlowEdit), transcribed: one image, one call per CFG half."""
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    timesteps = sched.timesteps
    gen = torch.Generator().manual_seed(seed)
    vae = pipe.vae

    def embed(prompt):
        return pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt="",
                                  do_classifier_free_guidance=True, max_sequence_length=256)  # fmt: skip

    def velocity(z, t, embeds, scale):
        pe, npe, ppe, nppe = embeds

        def run(e, p):
            return pipe.transformer(
                hidden_states=z, timestep=t.expand(1), encoder_hidden_states=e, pooled_projections=p
            ).sample

        uncond, cond = run(npe, nppe), run(pe, ppe)
        return uncond + scale * (cond - uncond)

    with torch.inference_mode():
        x = vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode()
        x_src = (x - vae.config.shift_factor) * vae.config.scaling_factor
        src_emb, tar_emb = embed(source), embed(target)
        zt_edit = x_src.clone()
        for i, t in enumerate(timesteps):
            if STEPS - i > n_max:
                continue
            t_i = t / 1000
            t_im1 = timesteps[i + 1] / 1000 if i + 1 < len(timesteps) else torch.zeros_like(t_i)
            if STEPS - i > n_min:
                fwd_noise = torch.randn(x_src.shape[1:], generator=gen)[None]
                zt_src = (1 - t_i) * x_src + t_i * fwd_noise
                zt_tar = zt_edit + zt_src - x_src
                v_delta = velocity(zt_tar, t, tar_emb, g_tgt) - velocity(zt_src, t, src_emb, g_src)
                zt_edit = zt_edit + (t_im1 - t_i) * v_delta
            else:
                if i == STEPS - n_min:
                    fwd_noise = torch.randn(x_src.shape[1:], generator=gen)[None]
                    xt_src = sched.scale_noise(x_src, t[None], noise=fwd_noise)
                    xt_tar = zt_edit + xt_src - x_src
                xt_tar = xt_tar + (t_im1 - t_i) * velocity(xt_tar, t, tar_emb, g_tgt)
        out = zt_edit if n_min == 0 else xt_tar
        out = vae.decode(out / vae.config.scaling_factor + vae.config.shift_factor).sample
        return pipe.image_processor.postprocess(out, output_type="pil")[0]


# --- loading -------------------------------------------------------------------------------------------


def test_loads_saved_pipeline_through_registry(editor):
    assert isinstance(editor, FlowEditSD3Editor) and isinstance(editor, Editor)
    assert editor.name == "flowedit_sd3"
    assert EDITORS["flowedit_sd3"] is FlowEditSD3Editor
    assert type(editor.pipe).__name__ == "StableDiffusion3Pipeline"
    assert editor.pipe.device.type == "cpu" and editor.multiple == 16


def test_n_min_above_n_max_is_rejected(sd3_model):
    with pytest.raises(ValueError, match=r"n_min \(3\) must not exceed n_max \(2\)"):
        _settings(sd3_model, n_max=2, n_min=3)


def test_needs_the_texts_of_its_prompt_columns(sd3_model):
    assert _settings(sd3_model).stage1_texts() == {"private_caption", "combined_caption"}
    settings = _settings(sd3_model, source_prompt="public_caption", target_prompt="edit_instruction")
    assert settings.stage1_texts() == {"public_caption", "edit_instruction"}


# --- the algorithm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_min", [0, 2])
def test_matches_the_authors_algorithm(editor, configure, n_min):
    """Batched (both branches and CFG halves in one call) equals the per-image reference loop."""
    configure(n_max=6, n_min=n_min)
    seeds = [11, 12]
    out = editor.edit(IMAGES, [PROMPT, PROMPT], seeds)
    ref = [
        _reference_flowedit(editor.pipe, img, PROMPT.private_caption, PROMPT.combined_caption, seed,
                            n_max=6, n_min=n_min)
        for img, seed in zip(IMAGES, seeds, strict=True)
    ]  # fmt: skip
    assert max_diff(out, ref) <= 1
    # The check has teeth: the edit moved far from the input, and swapped guidances land elsewhere.
    assert mean_diff(out, _vae_round_trip(editor.pipe, IMAGES)) > 5
    swapped = _reference_flowedit(editor.pipe, IMAGES[0], PROMPT.private_caption, PROMPT.combined_caption,
                                  seeds[0], n_max=6, n_min=n_min, g_src=13.5, g_tgt=3.5)  # fmt: skip
    assert mean_diff([out[0]], [swapped]) > 5


def test_n_max_zero_is_the_vae_round_trip(configure):
    editor = configure(n_max=0)
    out = editor.edit(IMAGES, [PROMPT, PROMPT], [1, 2])
    assert max_diff(out, _vae_round_trip(editor.pipe, IMAGES)) <= 1  # shift/scale float rounding only


def test_equal_prompts_and_guidances_do_not_edit(configure):
    editor = configure(n_max=0)
    unedited = editor.edit(IMAGES, [PROMPT, PROMPT], [1, 2])
    editor = configure(n_max=6, source_prompt="public_caption", target_prompt="public_caption",
                       source_guidance_scale=5.0, target_guidance_scale=5.0)  # fmt: skip
    out = editor.edit(IMAGES, [PROMPT, PROMPT], [1, 2])
    assert max_diff(out, unedited) == 0  # V_delta is exactly zero at every step
    assert max_diff(out, _vae_round_trip(editor.pipe, IMAGES)) <= 1
    editor = configure(n_max=6, source_prompt="public_caption", target_prompt="public_caption")
    assert mean_diff(editor.edit(IMAGES, [PROMPT, PROMPT], [1, 2]), unedited) > 1  # 3.5 vs 13.5: edits


def test_deterministic_per_seed_and_batch_independent(editor):
    first = editor.edit(IMAGES, [PROMPT, PROMPT], [5, 6])
    assert max_diff(editor.edit(IMAGES, [PROMPT, PROMPT], [5, 6]), first) == 0
    # alone in a batch: the same output up to float rounding of other batch shapes
    assert max_diff(editor.edit(IMAGES[1:], [PROMPT], [6]), first[1:]) <= 1
    assert mean_diff(editor.edit(IMAGES, [PROMPT, PROMPT], [7, 8]), first) > 0.5


def test_prompt_columns_are_honoured(editor, configure):
    base = editor.edit(IMAGES[:1], [PROMPT], [3])
    changed = lambda **kw: EditPrompt(**{**PROMPT.__dict__, **kw})  # noqa: E731
    # unused columns: the instruction, and the public caption while a combined caption exists
    unused = changed(edit_instruction="something else", public_caption="a dog on a beach")
    assert max_diff(editor.edit(IMAGES[:1], [unused], [3]), base) == 0
    assert mean_diff(editor.edit(IMAGES[:1], [changed(combined_caption="a red car")], [3]), base) > 1
    assert mean_diff(editor.edit(IMAGES[:1], [changed(private_caption="Jane Doe outdoors")], [3]), base) > 1
    with pytest.raises(ValueError, match="no private_caption"):
        editor.edit(IMAGES[:1], [changed(private_caption="")], [3])
    # a row without a combined caption falls back to its public caption
    fallback = editor.edit(IMAGES[:1], [changed(combined_caption=None)], [3])
    assert mean_diff(fallback, base) > 1
    as_public = configure(target_prompt="public_caption").edit(IMAGES[:1], [PROMPT], [3])
    assert max_diff(fallback, as_public) == 0
    # configured columns: source = public caption
    swapped = configure(source_prompt="public_caption").edit(IMAGES[:1], [PROMPT], [3])
    assert mean_diff(swapped, base) > 1


def test_prompts_stay_out_of_logs(editor, caplog):
    secret = "Zyxwv Qutsr at 12 Elm Street"
    with caplog.at_level(logging.DEBUG):
        editor.edit(IMAGES[:1], [EditPrompt(secret, secret, secret * 20, secret * 20)], [1])
    assert "Zyxwv" not in caplog.text


# --- sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "multiple", "expected"),
    [
        ((128, 64), 1536, 16, (128, 64)),
        ((200, 120), 1536, 16, (192, 112)),  # native size, floored to x16; never upscaled
        ((1000, 700), 1536, 16, (992, 688)),
        ((3000, 2000), 1536, 16, (1536, 1024)),  # long side capped at 1536
        ((3072, 2000), 1536, 16, (1536, 992)),
        ((2000, 4000), 1536, 16, (768, 1536)),
        ((100, 70), 64, 16, (64, 32)),
        ((200, 10), 1536, 16, (192, 16)),  # a side below the multiple becomes one multiple
    ],
)
def test_flowedit_size(size, max_side, multiple, expected):
    assert flowedit_size(*size, max_side, multiple) == expected


def test_working_size_is_native_capped_and_x16(editor, configure):
    assert editor.multiple == 16
    for width, height in ((200, 120), (333, 777), (1536, 1536)):  # within the cap: native, floored to x16
        w, h = editor.working_size(width, height)
        assert w % 16 == h % 16 == 0 and 0 <= width - w < 16 and 0 <= height - h < 16
    for width, height in ((3000, 2000), (2000, 4000), (5000, 40)):  # above it: the long side is capped
        w, h = editor.working_size(width, height)
        assert w % 16 == h % 16 == 0 and 1536 - 16 < max(w, h) <= 1536
    assert configure(max_side=512, side_multiple=32).working_size(3000, 2000) == (512, 320)


def test_output_at_input_size_model_at_paper_size(configure):
    editor = configure(max_side=64)
    seen = []
    hook = editor.pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True
    )
    try:
        images = [noise_image(100, 70, 0), noise_image(100, 70, 1), noise_image(100, 70, 2)]
        out = editor.edit(images, [PROMPT] * 3, [1, 2, 3])
    finally:
        hook.remove()
    assert [img.size for img in out] == [(100, 70)] * 3 and all(img.mode == "RGB" for img in out)
    # 100x70 → 64x45 (max side) → 64x32 (x16) → 8x4 latents; 3 rows x 2 branches x 2 CFG halves
    assert seen == [(12, 4, 4, 8)] * 6
    assert editor.edit([], [], []) == []
    with pytest.raises(ValueError, match="one size"):
        editor.edit([noise_image(64, 64, 0), noise_image(128, 64, 0)], [PROMPT] * 2, [1, 2])


# --- through the runner --------------------------------------------------------------------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _flagged_png(rid: str, img: Image.Image) -> dict:
    row = new_row(rid, f"src/{rid}", "people", _png(img))
    row.update(width=img.width, height=img.height, privacy_flag=True, categories=["people"],
               public_caption="a person", private_caption="PRIVATE name",
               edit_instruction="change the face")  # fmt: skip
    return row


def test_edit_stage_with_flowedit(sd3_model):
    stage = EditStage(_config(sd3_model, n_max=3, num_inference_steps=4))
    rows = [
        _flagged_png(f"r{i}", noise_image(w, h, i)) for i, (w, h) in enumerate([(77, 50), (80, 52), (50, 77)])
    ]
    rows[0]["combined_caption"] = "a person with another face"
    out = stage(rows_to_table(rows)).to_pylist()
    for row, before in zip(out, rows, strict=True):
        assert row["status"] == "edited" and row["error"] is None and row["editor"] == "flowedit_sd3"
        assert row["seed"] == row_seed(42, row["id"])
        decoded = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert decoded.size == (before["width"], before["height"]) == (row["width"], row["height"])
        assert row["image"]["bytes"] != before["image"]["bytes"]


def test_edit_stage_gives_flowedit_the_papers_size(sd3_model):
    """The runner hands FlowEdit each image near its native size (long side <= 1536, sides x16), bucketed
    by that size, and restores the original size: no resize to IP2P's 512 on the way."""
    stage = EditStage(_config(sd3_model, n_max=1, num_inference_steps=1))
    seen: list[tuple[int, int]] = []
    latents: list[tuple[int, ...]] = []
    real_edit = stage.editor.edit

    def spy(images, prompts, seeds):
        seen.extend(img.size for img in images)
        return real_edit(images, prompts, seeds)

    stage.editor.edit = spy
    hook = stage.editor.pipe.vae.encoder.register_forward_pre_hook(
        lambda _, args: latents.append(args[0].shape)
    )
    sizes = [(200, 120), (3000, 2000), (200, 120)]
    try:
        out = stage(
            rows_to_table([_flagged_png(f"r{i}", noise_image(w, h, i)) for i, (w, h) in enumerate(sizes)])
        )
    finally:
        hook.remove()
    assert sorted(seen) == [(192, 112), (192, 112), (1536, 1024)]
    assert sorted(shape[-2:] for shape in latents) == [(112, 192), (1024, 1536)]  # 2 buckets, 2 encodes
    for row, (w, h) in zip(out.to_pylist(), sizes, strict=True):
        assert row["status"] == "edited", row["error"]
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (w, h) == (row["width"], row["height"])
