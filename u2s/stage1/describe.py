"""Stage 1, call B: on flagged rows the VLM writes a privacy review, a private and a public caption."""

from __future__ import annotations

from u2s.stage1.call import ModelCallStage


class DescribeStage(ModelCallStage, call="describe"):
    """Sets ``review`` (list of {item, reason, category}), ``private_caption`` and ``public_caption``."""
