"""Pydantic building blocks shared by the job config (:mod:`u2s.config`) and the editors' own configs.

A leaf module (pydantic and the standard library only): each editor file defines its config class on
these, and :mod:`u2s.config` assembles ``Stage2Config`` from the editor registry, so neither imports
the other's module while it is being built.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: URI schemes of model locations that u2s stages into the local model cache (:mod:`u2s.io.model_store`).
MODEL_STORE_SCHEMES = ("s3",)


def is_object_store_uri(location: str | None) -> bool:
    """Whether a model location is an object-storage URI (``s3://bucket/prefix``) rather than a hub id
    or a local path."""
    scheme, sep, _ = (location or "").partition("://")
    return bool(sep) and scheme.lower() in MODEL_STORE_SCHEMES


def absolute_path(uri: str | None) -> str | None:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(uri)


def model_location(value: str | None) -> str | None:
    """A file or folder of weights: an ``s3://`` URI (kept, trailing ``/`` dropped) or a local path (made
    absolute); other schemes are refused."""
    if value is None or "://" not in value:
        return absolute_path(value)
    if not is_object_store_uri(value):
        schemes = ", ".join(f"{s}://" for s in MODEL_STORE_SCHEMES)
        raise ValueError(f"unsupported location scheme in {value!r}: use a local path or {schemes}")
    if not value.partition("://")[2].strip("/"):
        raise ValueError(f"location {value!r} names no bucket")
    return value.rstrip("/")


class ModelConfig(ConfigModel):
    """A model loaded with `from_pretrained`: a Hugging Face id, a local/mounted path, or an ``s3://``
    prefix holding a saved model folder (staged into the local model cache on each worker)."""

    model: str = Field(
        ..., description="HF model id, local path (`~` and ${ENV} are expanded), or s3://bucket/prefix of a "
        "saved model folder (e.g. a `huggingface-cli download` copied with `aws s3 sync`): each worker "
        "syncs it once into the model cache (`storage.model_cache_dir`, $U2S_MODEL_CACHE) and loads the "
        "local copy, tokenizer and processor included; endpoint and credentials as for the data "
        "(`storage`).",
    )  # fmt: skip
    revision: str | None = Field(
        None, description="HF revision (branch, tag or commit). For an s3:// model: an optional pin, the "
        "content digest workers log when staging it (its first 8+ hex characters): other content is "
        "refused, and a node that holds the pinned copy loads it without listing the bucket.",
    )  # fmt: skip
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    trust_remote_code: bool = Field(False, description="Allow model repos with custom code.")

    @field_validator("model")
    @classmethod
    def _local_dir_absolute(cls, value: str) -> str:
        if "://" in value:
            return model_location(value)  # s3://, checked
        # An existing local folder wins over a hub id (as in `from_pretrained`); pin it for the workers.
        return os.path.abspath(value) if os.path.isdir(value) else value

    @model_validator(mode="after")
    def _object_store_revision(self) -> ModelConfig:
        pinned = self.revision is not None and is_object_store_uri(self.model)
        if pinned and not re.fullmatch(r"[0-9a-fA-F]{8,64}", self.revision):
            raise ValueError(
                "revision of an s3:// model pins its content: the digest workers log when staging it "
                "(8 to 64 hex characters)"
            )
        return self
