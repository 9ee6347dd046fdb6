"""Evaluation of u2s outputs (stage-1 flags; quality, privacy and utility metrics)."""
