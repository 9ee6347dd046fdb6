"""Stage-2 editors, by name. Each is imported only when a job asks for it (no torch at import)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from u2s.stage2.editors.base import Editor

if TYPE_CHECKING:
    from u2s.config import Stage2Config

#: Editor name → "module:Class". The names are the values of `Stage2Config.editor`.
EDITORS: dict[str, str] = {
    "instruct_pix2pix": "u2s.stage2.editors.instruct_pix2pix:InstructPix2PixEditor",
    "safe_attention": "u2s.stage2.editors.safe_attention:SafeAttentionEditor",
    "flowedit_sd3": "u2s.stage2.editors.flowedit_sd3:FlowEditSD3Editor",
    "flux_kontext": "u2s.stage2.editors.flux_kontext:FluxKontextEditor",
    "blur": "u2s.stage2.editors.baselines:BlurEditor",
    "pixelate": "u2s.stage2.editors.baselines:PixelateEditor",
    "mask": "u2s.stage2.editors.baselines:MaskEditor",
    "blur_image": "u2s.stage2.editors.baselines:BlurImageEditor",
}


def load_editor(config: Stage2Config) -> Editor:
    """Import the editor named by ``config.editor`` and construct it (this loads its model)."""
    try:
        target = EDITORS[config.editor]
    except KeyError:
        known = ", ".join(sorted(EDITORS))
        raise ValueError(f"unknown editor {config.editor!r}; available: {known}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)


__all__ = ["EDITORS", "Editor", "load_editor"]
