"""Stage 1, call C: a text LLM turns the public caption into an identity-neutral edit instruction."""

from __future__ import annotations

from u2s.stage1.call import ModelCallStage


class InstructStage(ModelCallStage, call="instruct"):
    """Sets ``edit_instruction`` on flagged in-flight rows that have a public caption."""
