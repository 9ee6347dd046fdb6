"""Pydantic building blocks shared by the job config (:mod:`u2s.config`) and the editors' own configs.

A leaf module (pydantic and the standard library only): each editor file defines its config class on
these, and :mod:`u2s.config` assembles ``Stage2Config`` from the editor registry, so neither imports
the other's module while it is being built.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def absolute_path(uri: str | None) -> str | None:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(uri)


class ModelConfig(ConfigModel):
    """A model loaded with `from_pretrained`: a Hugging Face id or a local/mounted path."""

    model: str = Field(..., description="HF model id or local path (`~` and ${ENV} are expanded).")
    revision: str | None = Field(None, description="HF revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    trust_remote_code: bool = Field(False, description="Allow model repos with custom code.")

    @field_validator("model")
    @classmethod
    def _local_dir_absolute(cls, value: str) -> str:
        # An existing local folder wins over a hub id (as in `from_pretrained`); pin it for the workers.
        return os.path.abspath(value) if os.path.isdir(value) else value
