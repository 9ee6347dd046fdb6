"""Pydantic building blocks shared by the job config (:mod:`u2s.config`) and the editors' own configs.

A leaf module (pydantic and the standard library only): each editor file defines its config class on
these, and :mod:`u2s.config` assembles ``Stage2Config`` from the editor registry, so neither imports
the other's module while it is being built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

#: What a secret becomes wherever a config is shown, recorded or fingerprinted.
REDACTED = "<redacted>"
#: ``model_dump(context=REVEAL_SECRETS)`` keeps the secrets: only for the config ``u2s submit`` ships to
#: the job, which needs them (:func:`u2s.config.dump_config`).
REVEAL_SECRETS = {"reveal_secrets": True}
#: ``Field(json_schema_extra=SECRET_VALUES)``: every value of this mapping is a secret (its keys are not).
SECRET_VALUES = {"secret": "values"}

#: Words that make a key a secret's name: ``hf_token``, ``api_key``, ``AWS_SECRET_ACCESS_KEY``,
#: ``password``, ``credentials``, ``Authorization``... (``max_num_batched_tokens`` is not one).
_SECRET_WORDS = re.compile(
    r"\w*(token|secret|secrets|key|password|passwd|passphrase)|pwd|credentials?|auth(?:n|z|orization|entication)?|cookie|bearer|signature"
)
#: A URL's ``user:password@`` part.
_URL_PASSWORD = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*):[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """Whether a key names a secret: one of its words (snake_case, kebab-case, camelCase, UPPER_CASE)
    is or ends with token, secret, key or password, or is credential(s), auth..., pwd, cookie, bearer or
    signature. A name ending in ``_env`` or ``_var`` names the environment variable that holds a secret
    (``api_key_env``), which is not one."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    words = [w for w in words if w]
    if not words or words[-1] in ("env", "var"):
        return False
    return any(_SECRET_WORDS.fullmatch(w) for w in words)


def redact_secrets(tree: Any, every_value: bool = False) -> Any:
    """``tree`` (a dumped config, or any part of one) with every secret replaced by :data:`REDACTED`: the
    value of each key that :func:`is_secret_name` (at any depth), the password of each URL, and with
    ``every_value`` every value of a mapping."""
    if isinstance(tree, dict):
        return {
            k: REDACTED if v is not None and (every_value or is_secret_name(str(k))) else redact_secrets(v)
            for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact_secrets(v) for v in tree)
    if isinstance(tree, str):
        return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", tree)
    return tree


def secret_paths(config: BaseModel) -> list[str]:
    """Dotted paths of the secrets a config holds (``stage1.vllm.env_vars.HF_TOKEN``), never their values."""
    paths: list[str] = []

    def walk(shown: Any, real: Any, where: str) -> None:
        if isinstance(real, dict) and isinstance(shown, dict):
            for key, value in real.items():
                walk(shown.get(key), value, f"{where}.{key}" if where else str(key))
        elif isinstance(real, list) and isinstance(shown, list) and len(real) == len(shown):
            for i, (a, b) in enumerate(zip(shown, real, strict=True)):
                walk(a, b, f"{where}.{i}")
        elif shown != real:
            paths.append(where)

    walk(config.model_dump(mode="json"), config.model_dump(mode="json", context=REVEAL_SECRETS), "")
    return paths


def _secret_values(model: type[BaseModel], name: str) -> bool:
    field = model.model_fields.get(name)
    return field is not None and field.json_schema_extra == SECRET_VALUES


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated.

    Secrets never leave a config in clear: ``model_dump`` (what ``u2s config show``, both ``_run.json``
    records and the config fingerprint are made of), ``repr`` and validation errors redact them (see
    :func:`redact_secrets`; fields marked :data:`SECRET_VALUES`, such as ``stage1.vllm.env_vars``, have
    every value redacted). Only ``model_dump(context=REVEAL_SECRETS)`` keeps them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    @model_serializer(mode="wrap")
    def _redact(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        if (info.context or {}).get("reveal_secrets") or not isinstance(data, dict):
            return data
        return {k: self._redacted(k, v) for k, v in data.items()}

    def _redacted(self, name: str, value: Any) -> Any:
        if value is None:
            return value
        if is_secret_name(name):
            return REDACTED
        return redact_secrets(value, every_value=_secret_values(type(self), name))

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, value if isinstance(value, BaseModel) or name is None else self._redacted(name, value)


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
    trust_remote_code: bool = Field(
        False, description="Allow model repos with custom code: it runs in every worker, so a hub model "
        "also needs `revision` pinned to a commit (40 hex characters; a branch or tag can move). A local "
        "folder or an s3:// copy is your own code and needs no pin.",
    )  # fmt: skip

    @field_validator("model")
    @classmethod
    def _local_dir_absolute(cls, value: str) -> str:
        if "://" in value:
            return model_location(value)  # s3://, checked
        # An existing local folder wins over a hub id (as in `from_pretrained`); pin it for the workers.
        return os.path.abspath(value) if os.path.isdir(value) else value

    @field_validator("trust_remote_code")
    @classmethod
    def _remote_code_pinned(cls, value: bool, info: ValidationInfo) -> bool:
        """Code from a hub repo runs only at a pinned commit: what was reviewed is what runs."""
        model, revision = info.data.get("model"), info.data.get("revision")
        if not value or model is None or model.startswith(("/", "~", ".")) or is_object_store_uri(model):
            return value
        if revision is None or not re.fullmatch(r"[0-9a-f]{40}", revision):
            raise ValueError(
                "runs the model repository's own code: pin revision to a commit (40 hex characters; a "
                "branch or tag can move), or use a local copy of the model"
            )
        return value

    @model_validator(mode="after")
    def _object_store_revision(self) -> ModelConfig:
        pinned = self.revision is not None and is_object_store_uri(self.model)
        if pinned and not re.fullmatch(r"[0-9a-fA-F]{8,64}", self.revision):
            raise ValueError(
                "revision of an s3:// model pins its content: the digest workers log when staging it "
                "(8 to 64 hex characters)"
            )
        return self


class StorageConfig(ConfigModel):
    """How to reach object storage. Credentials come from the standard AWS chain (env, profile, role)."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, R2...). Default: $AWS_ENDPOINT_URL or AWS."
    )
    region: str | None = Field(None, description="S3 region. Default: $AWS_DEFAULT_REGION or the AWS chain.")
    anon: bool = Field(False, description="Anonymous access (public buckets).")
    max_attempts: int = Field(
        10, ge=1, description="botocore attempts per S3 request (throttling, 5xx, dropped connections)."
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        "adaptive", description="botocore retry mode: exponential backoff with jitter; adaptive also "
        "rate-limits the client on throttling.",
    )  # fmt: skip
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to open a connection.")
    read_timeout: float = Field(60.0, gt=0, description="Seconds to wait for data on a connection.")
    task_retries: int = Field(
        3, ge=0, description="Times Ray re-runs a read or write task whose storage stayed unreachable "
        "after botocore's own attempts; then the job fails with a clear message (finish it with --resume).",
    )  # fmt: skip
    model_cache_dir: str | None = Field(
        None, description="Local folder that s3:// models (and weights) are synced into on each worker, "
        "once per node (a file lock serialises the actors that start together; a shared ReadWriteMany "
        "volume makes it once per cluster). None: $U2S_MODEL_CACHE on the worker, else "
        "~/.cache/u2s/models. A copy is reused while the prefix's listing (keys, sizes, ETags) is "
        "unchanged.",
    )  # fmt: skip


class Resources(ConfigModel):
    """Ray resources of one stage's actor pool (or tasks, for stateless stages)."""

    pool_size: int | tuple[int, int] = Field(
        (1, 4),
        description="Actors in the pool: a fixed size n, or [min, max] for an autoscaling pool "
        "(ActorPoolStrategy(min_size, max_size)): Ray Data adds actors to the pool that is the bottleneck, "
        "as far as the cluster (or its autoscaler) has room.",
    )
    batch_size: int = Field(8, ge=1, description="Rows per batch handed to the stage.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor/task.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per actor (vLLM calls: per engine worker, see `stage1.vllm`)."
    )
    memory: int | None = Field(
        None, ge=0, description="Bytes of RAM reserved per actor/task (Ray's `memory` resource). None: none."
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100', 'A10G'.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per actor. Default: max(1, num_cpus)."
    )
    max_restarts: int = Field(
        8,
        ge=0,
        description="Restarts per actor after it died: a fatal device or engine error (the actor exits so "
        "Ray starts a fresh one, see `u2s.healing`), or a kill (out of memory). Ray's `max_restarts`; Ray "
        "Data's default is unbounded. A fatal error on the last life fails the job with a message that "
        "says so.",
    )
    max_task_retries: int = Field(
        -1,
        ge=-1,
        description="Retries of a batch whose actor died or was unreachable (Ray's `max_task_retries`; -1: "
        "until the actor's restarts run out). A retried batch runs one row at a time and each death turns "
        "the row that caused it into an error row, so a batch with k such rows needs k + 1 retries; a lost "
        "node makes every batch sent to its actors fail fast until the actor is restarted elsewhere, which "
        "`max_restarts` already bounds.",
    )

    @field_validator("pool_size")
    @classmethod
    def _pool_bounds(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if not 1 <= low <= high:
            raise ValueError("pool_size must be >= 1, or [min, max] with 1 <= min <= max")
        return value

    def pool_bounds(self) -> tuple[int, int]:
        """(min, max) actors; a fixed size n is (n, n)."""
        return (self.pool_size, self.pool_size) if isinstance(self.pool_size, int) else self.pool_size

    def actor_pool_kwargs(self) -> dict[str, int]:
        """`ray.data.ActorPoolStrategy` keyword arguments for this pool."""
        low, high = self.pool_bounds()
        return {"size": low} if low == high else {"min_size": low, "max_size": high}

    def ray_remote_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            args["num_gpus"] = self.num_gpus
        if self.accelerator_type:
            args["accelerator_type"] = self.accelerator_type
        if self.memory:
            args["memory"] = self.memory
        return args

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))

    def actor_fault_args(self) -> dict[str, int]:
        """`map_batches` arguments that bound an actor pool's restarts and a batch's retries."""
        return {"max_restarts": self.max_restarts, "max_task_retries": self.max_task_retries}
