"""Errors of the I/O layer, in a module of their own: every reader can raise them without an import cycle."""

from __future__ import annotations


class InputError(ValueError):
    """The input cannot be read as configured (missing root, no images, duplicate ids...)."""
