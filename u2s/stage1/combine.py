"""Stage 1, call D (optional, ``stage1.combine``): the text LLM merges the public caption and the edit
instruction into one caption of the edited image, ``combined_caption`` (FlowEdit's target prompt and
that of other single-prompt editors)."""

from __future__ import annotations

from u2s.stage1.call import ModelCallStage


class CombineStage(ModelCallStage, call="combine"):
    """Sets ``combined_caption`` on flagged in-flight rows that have a public caption and an instruction."""
