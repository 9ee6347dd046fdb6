"""SafeAttention: a public-caption branch inside every cross-attention of the IP2P UNet (PAPER.md §3.2).

:class:`SafeAttentionProcessor` is a diffusers attention processor that owns its extra weights (an
``nn.Module``, as IP-Adapter processors are), so they follow the UNet through ``.to()``, appear in its
``state_dict`` and train with it. :func:`install_safe_attention` puts one on every cross-attention
(``attn2``) and leaves self-attention (``attn1``) alone.

The UNet's ``encoder_hidden_states`` is ``[c_p ; c_e]``, the public caption and the edit instruction
CLIP-encoded separately and concatenated on the sequence axis, (B, 2·77, D); each processor splits it in
half. With ``Q = xWq``, ``K_e = c_e Wk``, ``V_e = c_e Wv`` (pretrained weights), ``s = 1/√d_head``,
``A_e = softmax(s·Q K_eᵀ)`` and own public copies ``Wk_p, Wv_p`` (``to_k_public``, ``to_v_public``):

* **gated (variant G)**: ``A_p = softmax(s·Q K_pᵀ)`` with the shared query;
  ``g = sigmoid(MLP(2→16→1)([max_k A_e, max_k A_p]))`` per query; ``A_p ← A_p·(1+g)``, renormalised over
  the keys; ``out = A_e V_e + λ·A_p V_p``, then the shared ``to_out``. ``λ`` (``public_scale``) starts
  at 0. **Property**: ``g`` is one number per query, so renormalising over the keys cancels it
  (``A_p(1+g) / Σ_k A_p(1+g) = A_p``, exact up to float rounding): the gate has no effect on the output
  and gets (numerically) zero gradient; only ``λ`` and the public projections matter. This is the
  method as published; u2s keeps it literal (no ε in the denominator, which is ≥ 1 anyway) and its
  tests demonstrate the cancellation.
* **fusion (variant F)**: own query too, ``A_p = softmax(s·(x Wq_p) K_pᵀ)``; per head and query the row
  ``[A_e ; A_p]`` (154 values) goes as a 1-channel sequence through the fuser
  ``Conv1d(1→16, k3, p1) → GELU → Conv1d(16→1, k3, p1)``; its public half (last 77) is re-softmaxed
  into ``A_p'``; ``out = A_e V_e + λ·A_p' V_p`` → ``to_out``. The paper's F has no ``λ``; **u2s adds
  the zero-initialised scale** so that untrained F, like untrained G, equals pretrained IP2P on the
  edit instruction (``λ = 1`` gives the published formula).

The public copies start as copies of the pretrained projections, the gate/fuser with PyTorch's default
initialisation. Parameter names follow the reference implementation (``to_q_public``, ``to_k_public``,
``to_v_public``, ``map_fuse`` = gate MLP in G, fuser in F, ``public_scale``).

The edit term ``A_e V_e`` is computed exactly as diffusers' default ``AttnProcessor2_0`` does (same
``scaled_dot_product_attention`` call), so with ``λ = 0`` the output is bit-identical to plain IP2P.
The other maps are explicit (B, heads, N, 77) tensors, softmaxed in float32. F's fuser runs on every
query row, so it holds (B·heads·N, 16, 154) activations per layer: far more than G at high resolution.

Weights are saved with :func:`save_safe_attention` as a folder holding ``safe_attention.safetensors``
(keys ``<processor name>.<parameter>``, e.g.
``up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_k_public.weight``; the variant is also
in the file's metadata) and ``safe_attention.json`` (``{"variant": ..., "format": 1}``), and read back
with :func:`load_safe_attention`. Converting the authors' ldm checkpoint is not implemented.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

VARIANTS: tuple[str, ...] = ("gated", "fusion")
WEIGHTS_NAME = "safe_attention.safetensors"
CONFIG_NAME = "safe_attention.json"
FORMAT_VERSION = 1


def _copy_linear(src: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` with the same shape, device, dtype and values as ``src``."""
    dst = nn.Linear(
        src.in_features,
        src.out_features,
        bias=src.bias is not None,
        device=src.weight.device,
        dtype=src.weight.dtype,
    )
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    return dst


def _as_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An attention mask as a float32 additive bias (a boolean mask marks the keys that take part)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _attention_map(
    query: torch.Tensor, key: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """``softmax(s·Q Kᵀ + bias)`` over the keys, in float32: (B, h, N, d) × (B, h, M, d) → (B, h, N, M)."""
    logits = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


class SafeAttentionProcessor(nn.Module):
    """Dual-condition cross-attention processor (variant G ``gated`` or F ``fusion``; see the module doc).

    Built from the ``Attention`` it will serve: the public projections are copies of that module's
    pretrained ``to_k``/``to_v`` (and ``to_q`` for F), on its device and dtype.
    """

    def __init__(self, attn: Attention, variant: str = "gated") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown SafeAttention variant {variant!r}; expected one of {VARIANTS}")
        if not attn.is_cross_attention:
            raise ValueError("SafeAttention replaces cross-attention only (attn2), not self-attention")
        self.variant: str = variant
        weight = attn.to_q.weight
        self.to_k_public = _copy_linear(attn.to_k)
        self.to_v_public = _copy_linear(attn.to_v)
        if variant == "fusion":
            self.to_q_public = _copy_linear(attn.to_q)
            # Fuser over each query's row [A_e ; A_p], a 1-channel sequence of 2·77 values.
            self.map_fuse = nn.Sequential(
                nn.Conv1d(1, 16, kernel_size=3, padding=1),
                nn.GELU(),
                nn.Conv1d(16, 1, kernel_size=3, padding=1),
            )
        else:
            # Gate MLP over [max_k A_e, max_k A_p] per query.
            self.map_fuse = nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 1))
        self.map_fuse.to(device=weight.device, dtype=weight.dtype)
        # λ: zero, so an untrained processor reproduces the pretrained cross-attention on c_e.
        self.public_scale = nn.Parameter(torch.zeros(1, device=weight.device, dtype=weight.dtype))

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-attention of ``hidden_states`` (queries) over ``encoder_hidden_states = [c_p ; c_e]``.

        Mirrors ``AttnProcessor2_0`` (spatial/group norms, 4-D inputs, residual, output rescale); an
        additive or boolean ``attention_mask`` over the 2·L context tokens is split with the context.
        """
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] % 2:
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(
                "SafeAttention needs encoder_hidden_states = [public caption ; edit instruction] "
                f"(B, 2·L, D), got {got}"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, context_len, _ = encoder_hidden_states.shape
        half = context_len // 2
        heads = attn.heads

        mask_p = mask_e = None
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch_size)
            attention_mask = attention_mask.view(batch_size, heads, -1, attention_mask.shape[-1])
            mask_p, mask_e = attention_mask[..., :half], attention_mask[..., half:]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        c_p, c_e = encoder_hidden_states[:, :half], encoder_hidden_states[:, half:]
        key_e, value_e = attn.to_k(c_e), attn.to_v(c_e)
        key_p, value_p = self.to_k_public(c_p), self.to_v_public(c_p)
        head_dim = key_e.shape[-1] // heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, n, h·d) → (B, h, n, d)
            return t.view(batch_size, -1, heads, head_dim).transpose(1, 2)

        q, k_e, v_e, k_p, v_p = map(split_heads, (query, key_e, value_e, key_p, value_p))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k_e, k_p = attn.norm_k(k_e), attn.norm_k(k_p)

        # Edit term A_e·V_e, exactly as the pretrained processor computes it.
        out = F.scaled_dot_product_attention(q, k_e, v_e, attn_mask=mask_e, dropout_p=0.0, is_causal=False)

        bias_p = _as_bias(mask_p)
        a_e = _attention_map(q, k_e, attn.scale, _as_bias(mask_e))
        if self.variant == "fusion":
            q_p = split_heads(self.to_q_public(hidden_states))
            if attn.norm_q is not None:
                q_p = attn.norm_q(q_p)
            a_p = _attention_map(q_p, k_p, attn.scale, bias_p)
            fuse_dtype = self.map_fuse[0].weight.dtype
            rows = torch.cat([a_e, a_p], dim=-1).to(fuse_dtype)  # (B, h, N, 2L)
            fused = self.map_fuse(rows.reshape(-1, 1, 2 * half)).reshape(rows.shape)
            a_p = fused[..., half:].float()
            if bias_p is not None:
                a_p = a_p + bias_p
            a_p = a_p.softmax(dim=-1)  # A_p'
        else:
            a_p = _attention_map(q, k_p, attn.scale, bias_p)
            gate_dtype = self.map_fuse[0].weight.dtype
            peaks = torch.stack([a_e.amax(dim=-1), a_p.amax(dim=-1)], dim=-1).to(gate_dtype)
            g = torch.sigmoid(self.map_fuse(peaks)).float()  # (B, h, N, 1): one gate per query
            a_p = a_p * (1.0 + g)
            a_p = a_p / a_p.sum(dim=-1, keepdim=True)  # over keys: the per-query g cancels here
        out_p = torch.matmul(a_p.to(v_p.dtype), v_p)
        out = out + self.public_scale.to(out_p.dtype) * out_p

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_safe_attention(unet: nn.Module, variant: str = "gated") -> dict[str, SafeAttentionProcessor]:
    """Put a fresh :class:`SafeAttentionProcessor` on every cross-attention ``attn2`` of ``unet``.

    Self-attention (``attn1``) keeps its processor. Returns processor name → processor, the names being
    those of ``unet.attn_processors`` (``...attn2.processor``).
    """
    from diffusers.models.attention_processor import Attention

    installed = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn2" and module.is_cross_attention:
            module.set_processor(SafeAttentionProcessor(module, variant))
            installed[f"{name}.processor"] = module.processor
    if not installed:
        raise ValueError("the UNet has no cross-attention (attn2) to equip with SafeAttention")
    return installed


def safe_attention_processors(unet: nn.Module) -> dict[str, SafeAttentionProcessor]:
    """The SafeAttention processors installed on ``unet``, by processor name (empty if none)."""
    return {
        name: proc for name, proc in unet.attn_processors.items() if isinstance(proc, SafeAttentionProcessor)
    }


def _variant_of(processors: dict[str, SafeAttentionProcessor]) -> str:
    variants = {proc.variant for proc in processors.values()}
    if len(variants) != 1:
        raise ValueError(
            f"expected SafeAttention processors of one variant, found {sorted(variants) or 'none'}"
        )
    return variants.pop()


def save_safe_attention(unet: nn.Module, path: str | Path) -> Path:
    """Save the SafeAttention weights of ``unet`` into folder ``path`` (created); returns the folder.

    Writes ``safe_attention.safetensors`` (``<processor name>.<parameter>`` → tensor, the variant in
    its metadata) and ``safe_attention.json`` (``{"variant": ..., "format": 1}``). Only the extra
    weights are saved; the pretrained UNet stays where it was loaded from.
    """
    from safetensors.torch import save_file

    processors = safe_attention_processors(unet)
    variant = _variant_of(processors)
    tensors = {
        f"{name}.{key}": value.detach().to("cpu").contiguous()
        for name, proc in processors.items()
        for key, value in proc.state_dict().items()
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"variant": variant, "format": FORMAT_VERSION}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={k: str(v) for k, v in meta.items()})
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_safe_attention(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Read saved SafeAttention weights: a folder from :func:`save_safe_attention` or its
    ``.safetensors`` file. Returns (variant, name → tensor)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"no SafeAttention weights at {weights}")
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
        names = f.keys()
        tensors = {name: f.get_tensor(name) for name in names}
    config = weights.with_name(CONFIG_NAME)
    if config.is_file():
        meta = {**meta, **json.loads(config.read_text())}
    variant = meta.get("variant")
    if variant not in VARIANTS:
        raise ValueError(f"{weights}: unknown or missing SafeAttention variant {variant!r}")
    if int(meta.get("format", FORMAT_VERSION)) != FORMAT_VERSION:
        raise ValueError(f"{weights}: unsupported SafeAttention format {meta.get('format')!r}")
    return variant, tensors


def load_safe_attention(unet: nn.Module, path: str | Path) -> str:
    """Load saved SafeAttention weights into ``unet``; returns the variant.

    Installs fresh processors of the saved variant if ``unet`` has none; if it has, their variant must
    match the saved one. Every processor parameter must be in the file and every tensor in the file must
    match one (shapes included); values are cast to each parameter's dtype and device.
    """
    variant, tensors = read_safe_attention(path)
    processors = safe_attention_processors(unet) or install_safe_attention(unet, variant)
    installed = _variant_of(processors)
    if installed != variant:
        raise ValueError(f"saved SafeAttention weights are variant {variant!r}, the UNet has {installed!r}")
    expected = {f"{name}.{key}" for name, proc in processors.items() for key in proc.state_dict()}
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"SafeAttention weights do not fit this UNet: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    with torch.no_grad():
        for name, proc in processors.items():
            for key, param in proc.state_dict(keep_vars=True).items():
                value = tensors[f"{name}.{key}"]
                if value.shape != param.shape:
                    raise ValueError(
                        f"{name}.{key}: saved shape {tuple(value.shape)} != {tuple(param.shape)}"
                    )
                param.copy_(value)
    return variant
