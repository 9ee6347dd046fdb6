"""SafeAttention: the processor's math (variants G and F) on one attention module, then the editor on the
tiny saved IP2P pipeline: untrained equals plain IP2P, λ ≠ 0 brings in the public caption, CFG branches
all see [c_p ; c_e], and saved weights round-trip."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from u2s.config import ModelConfig, Resources, Stage2Config
from u2s.stage2.editors import EDITORS, load_editor
from u2s.stage2.editors.base import EditPrompt
from u2s.stage2.editors.safe_attention import SafeAttentionConfig
from u2s.stage2.safe_attention_processor import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    SafeAttentionProcessor,
    load_safe_attention,
    read_safe_attention,
    safe_attention_processors,
    save_safe_attention,
)
from u2s.testing.images import noise_image

VARIANTS = ["gated", "fusion"]

# ---------------------------------------------------------------------------------------------------
# The processor on one diffusers Attention module (query dim 32, context dim 16, 4 heads of 8).


def _attention() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()


def _inputs(seq: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 32, generator=g)
    return x, torch.randn(2, seq, 16, generator=g), torch.randn(2, seq, 16, generator=g)


def _with(attn: Attention, variant: str) -> SafeAttentionProcessor:
    proc = SafeAttentionProcessor(attn, variant)
    attn.set_processor(proc)
    return proc


def _heads(t: torch.Tensor, h: int = 4) -> torch.Tensor:  # (B, n, h·d) → (B, h, n, d)
    return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def _merge(out: torch.Tensor, attn: Attention) -> torch.Tensor:
    return attn.to_out[0](out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_processor_is_the_pretrained_cross_attention_on_the_edit_instruction(variant):
    attn = _attention()
    assert isinstance(attn.processor, AttnProcessor2_0)
    x, c_p, c_e = _inputs()
    with torch.no_grad():
        plain = attn(x, encoder_hidden_states=c_e)
        proc = _with(attn, variant)
        safe = attn(x, encoder_hidden_states=torch.cat([c_p, c_e], dim=1))
    assert torch.equal(safe, plain)  # λ = 0: bit-identical, whatever the public caption
    # The public projections start as copies of the pretrained ones; λ starts at 0.
    assert torch.equal(proc.to_k_public.weight, attn.to_k.weight)
    assert torch.equal(proc.to_v_public.weight, attn.to_v.weight)
    assert (variant == "fusion") == hasattr(proc, "to_q_public")
    assert proc.public_scale.item() == 0.0
    # The processor's weights are submodule parameters of the attention (IP-Adapter style).
    assert {n for n, _ in attn.named_parameters() if n.startswith("processor.")} >= {
        "processor.public_scale",
        "processor.to_k_public.weight",
    }


def test_gated_variant_matches_the_paper_formula_and_its_gate_cancels():
    """G: A_p ← A_p·(1+g), renormalised over keys; g is per query, so it cancels: only λ matters."""
    attn = _attention()
    proc = _with(attn, "gated")
    x, c_p, c_e = _inputs()
    ctx = torch.cat([c_p, c_e], dim=1)
    with torch.no_grad():
        proc.public_scale.fill_(0.7)
        proc.to_k_public.weight.mul_(1.5)  # make the public branch its own
        q = _heads(attn.to_q(x))
        a_e = _softmax_attention(q, _heads(attn.to_k(c_e)))
        a_p = _softmax_attention(q, _heads(proc.to_k_public(c_p)))
        g = torch.sigmoid(proc.map_fuse(torch.stack([a_e.amax(-1), a_p.amax(-1)], dim=-1)))
        gated = a_p * (1 + g)
        gated = gated / gated.sum(-1, keepdim=True)
        expected = _merge(a_e @ _heads(attn.to_v(c_e)) + 0.7 * gated @ _heads(proc.to_v_public(c_p)), attn)
        out = attn(x, encoder_hidden_states=ctx)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # The same formula without any gate gives the same output: renormalisation cancels g ...
        ungated = _merge(a_e @ _heads(attn.to_v(c_e)) + 0.7 * a_p @ _heads(proc.to_v_public(c_p)), attn)
        torch.testing.assert_close(out, ungated, rtol=1e-5, atol=1e-6)
        # ... so other gate weights change nothing either.
        for p in proc.map_fuse.parameters():
            p.normal_(0, 3.0)
        torch.testing.assert_close(attn(x, encoder_hidden_states=ctx), out, rtol=1e-5, atol=1e-6)
    # And the gate MLP receives (numerically) no gradient, while λ and the public projections do.
    attn(x, encoder_hidden_states=ctx).square().sum().backward()
    gate_grad = max(p.grad.abs().max().item() for p in proc.map_fuse.parameters())
    assert gate_grad < 1e-5
    assert proc.public_scale.grad.abs().item() > 1e-3
    assert proc.to_v_public.weight.grad.abs().max().item() > 1e-3


def test_fusion_variant_matches_the_paper_formula_and_its_fuser_matters():
    """F: [A_e ; A_p] per query row → Conv1d fuser → public half re-softmaxed → A_p'; λ·A_p' V_p."""
    attn = _attention()
    proc = _with(attn, "fusion")
    x, c_p, c_e = _inputs()
    ctx = torch.cat([c_p, c_e], dim=1)
    with torch.no_grad():
        proc.public_scale.fill_(1.0)  # λ = 1 is the published formula
        proc.to_q_public.weight.mul_(-1.0)
        a_e = _softmax_attention(_heads(attn.to_q(x)), _heads(attn.to_k(c_e)))
        a_p = _softmax_attention(_heads(proc.to_q_public(x)), _heads(proc.to_k_public(c_p)))
        rows = torch.cat([a_e, a_p], dim=-1)  # (B, h, N, 2·7)
        fused = proc.map_fuse(rows.reshape(-1, 1, 14)).reshape(rows.shape)
        a_p_fused = torch.softmax(fused[..., 7:], dim=-1)
        expected = _merge(a_e @ _heads(attn.to_v(c_e)) + a_p_fused @ _heads(proc.to_v_public(c_p)), attn)
        out = attn(x, encoder_hidden_states=ctx)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        for p in proc.map_fuse.parameters():
            p.normal_(0, 1.0)
        assert (attn(x, encoder_hidden_states=ctx) - out).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_mask_splits_with_the_context(variant):
    attn = _attention()
    x, c_p, c_e = _inputs()
    with torch.no_grad():
        plain_prefix = attn(x, encoder_hidden_states=c_e[:, :3])
        _with(attn, variant)
        ctx = torch.cat([c_p, c_e], dim=1)
        unmasked = attn(x, encoder_hidden_states=ctx)
        zeros = torch.zeros(2, 1, 14)
        assert torch.allclose(attn(x, encoder_hidden_states=ctx, attention_mask=zeros), unmasked)
        # Hiding edit tokens 3.. (additive −inf) = the pretrained attention over the first 3 only.
        bias = zeros.clone()
        bias[..., 7 + 3 :] = float("-inf")
        masked = attn(x, encoder_hidden_states=ctx, attention_mask=bias)
    torch.testing.assert_close(masked, plain_prefix, rtol=1e-5, atol=1e-6)


def test_processor_rejects_bad_inputs():
    attn = _attention()
    with pytest.raises(ValueError, match="unknown SafeAttention variant"):
        SafeAttentionProcessor(attn, "nope")
    with pytest.raises(ValueError, match="cross-attention only"):
        SafeAttentionProcessor(Attention(query_dim=32, heads=4, dim_head=8), "gated")
    _with(attn, "gated")
    x, _, c_e = _inputs()
    with pytest.raises(ValueError, match="public caption ; edit instruction"):
        attn(x, encoder_hidden_states=c_e)  # 7 tokens: not a [c_p ; c_e] pair
    with pytest.raises(ValueError, match="public caption ; edit instruction"):
        attn(x)


# ---------------------------------------------------------------------------------------------------
# The editor on the tiny saved IP2P pipeline.


def _ip2p(tiny_models) -> dict:
    return dict(
        model=ModelConfig(model=str(tiny_models["instruct_pix2pix"]), dtype="float32", device="cpu"),
        num_inference_steps=2, resolution=128,
    )  # fmt: skip


def _config(tiny_models) -> Stage2Config:
    return Stage2Config(
        instruct_pix2pix=_ip2p(tiny_models), resources=Resources(batch_size=2, torch_threads=1)
    )


def _safe_config(tiny_models, variant: str, weights: str | None = None) -> Stage2Config:
    return Stage2Config(
        editor="safe_attention",
        safe_attention=SafeAttentionConfig(**_ip2p(tiny_models), variant=variant, weights=weights),
        resources=Resources(batch_size=2, torch_threads=1),
    )


@pytest.fixture(scope="module")
def plain(tiny_models):
    return load_editor(_config(tiny_models))


@pytest.fixture(scope="module")
def safe_editors(tiny_models):
    """Untrained SafeAttention editors by variant (tests that change weights restore them)."""
    return {variant: load_editor(_safe_config(tiny_models, variant)) for variant in VARIANTS}


IMAGES = [noise_image(32, 32, 0), noise_image(32, 32, 1)]  # small: F's fuser runs per query row
PROMPTS = [EditPrompt("make the shirt blue", "a person in a room"), EditPrompt("blur the sign", "a street")]
SEEDS = [11, 12]


def _plain_np(plain, prompts=PROMPTS) -> np.ndarray:
    cfg = plain.config
    return plain.pipe(
        prompt=[p.edit_instruction for p in prompts],
        image=IMAGES,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        image_guidance_scale=cfg.image_guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS],
        output_type="np",
    ).images


def _set_public_scale(editor, value: float) -> None:
    with torch.no_grad():
        for proc in editor.processors.values():
            proc.public_scale.fill_(value)


def test_registry_loads_the_editor_with_processors_on_every_cross_attention(safe_editors):
    from u2s.stage2.editors.safe_attention import SafeAttentionEditor

    assert EDITORS["safe_attention"] is SafeAttentionEditor
    editor = safe_editors["gated"]
    assert isinstance(editor, SafeAttentionEditor) and editor.name == "safe_attention"
    procs = editor.pipe.unet.attn_processors
    attn2 = {name for name in procs if name.endswith("attn2.processor")}
    assert attn2 and set(editor.processors) == attn2 == set(safe_attention_processors(editor.pipe.unet))
    for name, proc in procs.items():
        assert isinstance(proc, SafeAttentionProcessor) == (name in attn2)
    assert {p.variant for p in safe_editors["fusion"].processors.values()} == {"fusion"}
    # The extra weights are UNet parameters (IP-Adapter style), so they move and save with it.
    names = [n for n, _ in editor.pipe.unet.named_parameters() if ".attn2.processor." in n]
    assert any(n.endswith("public_scale") for n in names)


@pytest.mark.parametrize("variant", VARIANTS)
def test_untrained_editor_equals_plain_instruct_pix2pix(plain, safe_editors, variant):
    editor = safe_editors[variant]
    ref = _plain_np(plain)
    out = editor.generate(IMAGES, PROMPTS, SEEDS, output_type="np")
    assert out.dtype == np.float32 and out.shape == ref.shape
    max_abs = float(np.abs(out - ref).max())
    print(f"{variant}: max |SafeAttention - IP2P| = {max_abs:.3g}")
    # Float32 reordering only: 0.0 on one CPU, 1.8e-6 on another; a processor that changed the
    # attention would differ by orders of magnitude more.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # Through `edit` (PIL, uint8) too: the public caption does not matter while λ = 0 (bit for bit,
    # same processors), and the images match plain IP2P to one grey level (a 1e-6 float difference
    # can round a pixel that sits on .5 the other way).
    other = [EditPrompt(p.edit_instruction, "something else entirely") for p in PROMPTS]
    plain_imgs = plain.edit(IMAGES, PROMPTS, SEEDS)
    own_imgs = editor.edit(IMAGES, PROMPTS, SEEDS)
    for a, own, b in zip(editor.edit(IMAGES, other, SEEDS), own_imgs, plain_imgs, strict=True):
        assert a.size == b.size == (32, 32)
        assert np.array_equal(np.asarray(a), np.asarray(own))
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_nonzero_public_scale_brings_in_the_public_caption(plain, safe_editors, variant):
    editor = safe_editors[variant]
    ref = _plain_np(plain)
    _set_public_scale(editor, 1.0)
    try:
        out = editor.generate(IMAGES, PROMPTS, SEEDS, output_type="np")
        again = editor.generate(IMAGES, PROMPTS, SEEDS, output_type="np")
        other_caption = [EditPrompt(p.edit_instruction, "a quiet empty beach at noon") for p in PROMPTS]
        changed = editor.generate(IMAGES, other_caption, SEEDS, output_type="np")
    finally:
        _set_public_scale(editor, 0.0)
    assert np.array_equal(out, again)  # still deterministic per seed
    assert np.abs(out - ref).max() > 1e-3  # no longer plain IP2P
    for row in range(len(PROMPTS)):  # each row depends on its own public caption
        assert np.abs(changed[row] - out[row]).max() > 1e-3


def test_every_guidance_branch_sees_the_dual_context(safe_editors):
    editor = safe_editors["gated"]
    seen: list[torch.Tensor] = []
    attn = next(m for n, m in editor.pipe.unet.named_modules() if n.endswith("attn2"))
    hook = attn.processor.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        editor.edit(IMAGES, PROMPTS, SEEDS)
    finally:
        hook.remove()
    assert len(seen) == editor.config.num_inference_steps
    with torch.inference_mode():
        public = editor.encode_texts([p.public_caption for p in PROMPTS])
        edit = editor.encode_texts([p.edit_instruction for p in PROMPTS])
        empty = editor.encode_texts([""])
    b = len(PROMPTS)
    for ctx in seen:
        # IP2P's batch: [text+image, image only, unconditional], each (B, 2·77, D).
        assert ctx.shape == (3 * b, 154, editor.pipe.text_encoder.config.hidden_size)
        torch.testing.assert_close(ctx[:b], torch.cat([public, edit], dim=1))
        torch.testing.assert_close(ctx[b:], torch.cat([empty, empty], dim=1).expand(2 * b, -1, -1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_weights_round_trip_into_a_fresh_editor(tiny_models, tmp_path, safe_editors, variant):
    trained = load_editor(_safe_config(tiny_models, variant))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # "trained-looking": every extra parameter moved, λ away from 0
        for proc in trained.processors.values():
            for p in proc.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            proc.public_scale.fill_(0.8)
    folder = save_safe_attention(trained.pipe.unet, tmp_path / "sa")
    assert json.loads((folder / CONFIG_NAME).read_text()) == {"variant": variant, "format": 1}
    saved_variant, tensors = read_safe_attention(folder / WEIGHTS_NAME)
    assert saved_variant == variant
    assert all(".attn2.processor." in key for key in tensors)
    assert len(tensors) == sum(len(p.state_dict()) for p in trained.processors.values())

    reloaded = load_editor(_safe_config(tiny_models, variant, weights=str(folder)))
    expected = trained.generate(IMAGES, PROMPTS, SEEDS, output_type="np")
    np.testing.assert_array_equal(reloaded.generate(IMAGES, PROMPTS, SEEDS, output_type="np"), expected)
    fresh = safe_editors[variant]  # untrained: the loaded weights are what changes the output
    assert np.abs(fresh.generate(IMAGES, PROMPTS, SEEDS, output_type="np") - expected).max() > 1e-3


def test_load_rejects_a_variant_mismatch_and_missing_weights(tiny_models, tmp_path, safe_editors):
    folder = save_safe_attention(safe_editors["fusion"].pipe.unet, tmp_path / "fusion")
    with pytest.raises(ValueError, match="variant 'fusion'"):
        load_editor(_safe_config(tiny_models, "gated", weights=str(folder)))
    with pytest.raises(FileNotFoundError):
        load_safe_attention(safe_editors["gated"].pipe.unet, tmp_path / "nothing-here")


def test_plain_unet_gets_the_saved_variant_installed(tiny_models, tmp_path, safe_editors):
    folder = save_safe_attention(safe_editors["fusion"].pipe.unet, tmp_path / "fusion")
    unet = load_editor(_config(tiny_models)).pipe.unet
    assert not safe_attention_processors(unet)
    assert load_safe_attention(unet, folder) == "fusion"
    procs = safe_attention_processors(unet)
    assert set(procs) == set(safe_editors["fusion"].processors)


def test_empty_batch_and_validation(safe_editors):
    editor = safe_editors["gated"]
    assert editor.edit([], [], []) == []
    with pytest.raises(ValueError, match="same length"):
        editor.edit(IMAGES, PROMPTS[:1], SEEDS)


def test_importing_the_editor_does_not_import_torch():
    code = (
        "import sys, u2s.stage2.editors, u2s.stage2.editors.safe_attention; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
