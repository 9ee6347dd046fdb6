"""Stage-2 editors, by name: the one list of editors.

Adding an editor takes its own file (an :class:`Editor` subclass and its :class:`EditorConfig`) and one
line here; ``Stage2Config`` (``stage2.editor`` and the section ``stage2.<name>``) is assembled from this
registry. An editor kept outside the package is added with :func:`register_editor` (in every process that
validates a config or loads the editor, e.g. from Ray's ``worker_process_setup_hook``): its name is then a
valid ``stage2.editor``, and it runs on its config class's defaults (``Stage2Config`` has no section for
it). Editor modules import no torch or diffusers at module level (models load in constructors),
so importing the registry stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from u2s.stage2.editors.base import Editor, EditorConfig
from u2s.stage2.editors.baselines import BlurEditor, BlurImageEditor, MaskEditor, PixelateEditor
from u2s.stage2.editors.flowedit_sd3 import FlowEditSD3Editor
from u2s.stage2.editors.flux_kontext import FluxKontextEditor
from u2s.stage2.editors.instruct_pix2pix import InstructPix2PixEditor
from u2s.stage2.editors.safe_attention import SafeAttentionEditor

if TYPE_CHECKING:
    from u2s.config_base import StorageConfig
    from u2s.stage2.editors.base import Stage2Settings

#: Editor name → class. The names are the values of ``stage2.editor`` and the stage-2 section names;
#: the first is the default editor.
EDITORS: dict[str, type[Editor]] = {
    cls.name: cls
    for cls in (
        InstructPix2PixEditor,
        SafeAttentionEditor,
        FlowEditSD3Editor,
        FluxKontextEditor,
        BlurEditor,
        PixelateEditor,
        MaskEditor,
        BlurImageEditor,
    )
}


def register_editor(cls: type[Editor]) -> type[Editor]:
    """Add ``cls`` to :data:`EDITORS` under ``cls.name`` (replacing an editor of that name); returns it."""
    EDITORS[cls.name] = cls
    return cls


def load_editor(config: Stage2Settings, storage: StorageConfig | None = None) -> Editor:
    """Construct the editor named by ``config.editor`` (this loads its model; an s3:// model is staged
    into the local model cache first, ``storage`` saying how to reach it and where the cache is)."""
    try:
        cls = EDITORS[config.editor]
    except KeyError:
        known = ", ".join(sorted(EDITORS))
        raise ValueError(f"unknown editor {config.editor!r}; available: {known}") from None
    return cls(config, storage)


__all__ = ["EDITORS", "Editor", "EditorConfig", "load_editor", "register_editor"]
