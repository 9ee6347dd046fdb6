"""Configuration of `u2s eval`: what to compare, which metrics, their models and their actor pools.

Validated in full before Ray starts, like a job config. Build one from the command line's options, a
YAML file (``u2s eval --config eval.yaml``) and ``--set key.path=value`` overrides with
:func:`load_eval_config`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The YAML/override helpers are the job config's own (one syntax for `u2s run` and `u2s eval`).
from u2s.config import (
    HttpEngineConfig,
    InputConfig,
    ModelConfig,
    Resources,
    StorageConfig,
    _deep_merge,
    apply_overrides,
    read_yaml_mapping,
    validate_config,
)

MetricName = Literal[
    "face_sim", "face_sim_strict", "text_sim", "text_sim_vlm", "race_entropy", "vlm_score",
    "clip_text", "clip_direction", "clip_image", "ssim", "lpips", "phash",
]  # fmt: skip

#: Metrics that run with no further setting (CLIP loads `models.clip`; LPIPS where its backbone loads).
DEFAULT_METRICS: tuple[str, ...] = (
    "face_sim", "face_sim_strict", "text_sim", "clip_text", "clip_direction", "clip_image", "ssim", "lpips",
    "phash",
)  # fmt: skip
#: Metrics asked of a vision-language model through the stage-1 engines (need `models.vlm`).
VLM_METRICS: tuple[str, ...] = ("text_sim_vlm", "race_entropy", "vlm_score")

_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute(uri: str | None) -> str | None:
    """Local paths become absolute: Ray workers do not share the driver's working directory."""
    return uri if uri is None or "://" in uri else os.path.abspath(uri)


class FaceConfig(_Model):
    """Face detection and identity embeddings for FaceSim (PAPER.md §4)."""

    backend: Literal["auto", "dlib", "antelopev2"] = Field(
        "auto", description="auto: antelopev2 when `model_dir` is set, else dlib. dlib: HOG detector + the "
        "face-recognition ResNet (128-d) that ship in dlib-bin/face_recognition_models (offline). "
        "antelopev2: InsightFace's SCRFD detector + ArcFace (512-d) ONNX files, run with onnxruntime.",
    )  # fmt: skip
    model_dir: str | None = Field(
        None, description="InsightFace antelopev2 folder (scrfd_10g_bnkps.onnx, glintr100.onnx, ...)."
    )
    size: int = Field(512, ge=64, description="Both images are resized to size² first (the paper: 512).")
    det_size: int = Field(512, ge=64, description="antelopev2 detector input side (the paper: 512).")
    det_threshold: float = Field(0.5, gt=0, lt=1, description="antelopev2 detection score threshold.")
    upsample: int = Field(1, ge=0, description="dlib HOG upsampling passes (finds smaller faces).")

    _absolute_paths = field_validator("model_dir")(_absolute)

    @model_validator(mode="after")
    def _dir_for_antelope(self) -> FaceConfig:
        if self.backend == "antelopev2" and not self.model_dir:
            raise ValueError("backend 'antelopev2' needs face.model_dir (the antelopev2 folder)")
        return self

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "antelopev2" if self.model_dir else "dlib"
        return self.backend


class OcrConfig(_Model):
    """OCR for TextSim: rapidocr's detector and recognizer, from the files that ship in the package."""

    min_score: float = Field(0.5, ge=0, le=1, description="Detector box threshold.")
    max_side: int = Field(1280, ge=64, description="Images are downscaled to this long side at most.")


class VlmMetricsConfig(_Model):
    """The vision-language model behind TextSim (VLM), Race Entropy and VLMScore, through stage-1 engines.

    The paper extracts text and demographics with InternVL2.5-8B and judges pairs with InternVL3.5-8B;
    the transformers engine needs a transformers-native class (e.g. ``OpenGVLab/InternVL3-8B-hf``), the
    http engine talks to any OpenAI-compatible server (``vllm serve OpenGVLab/InternVL2_5-8B``).
    """

    engine: Literal["transformers", "http"] = Field(
        "transformers", description="Stage-1 engine: transformers (local) or http (OpenAI-compatible server)."
    )
    model: ModelConfig = Field(..., description="VLM for text extraction and demographics.")
    judge: ModelConfig | None = Field(
        None, description="VLM judge for VLMScore (the paper: InternVL3.5-8B). None: `model`."
    )
    http: HttpEngineConfig | None = Field(None, description="Server settings when engine is 'http'.")
    processor_kwargs: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="transformers engine: extra VLM processor arguments."
    )
    image_size: int = Field(448, ge=28, description="Each image is fitted into this square (the paper: 448).")
    max_new_tokens: int = Field(512, ge=1, description="Token budget per answer (the paper: 512).")
    retry_temperature: float = Field(0.7, ge=0, description="An invalid answer is retried once at this.")
    race_labels: Literal["paper", "other", "seven"] = Field(
        "paper", description="The prompt offers 7 race labels, the paper's entropy uses 5. paper: labels "
        "outside the five (Middle Eastern, Indian) are dropped, entropy / log 5 (the authors' code); other: "
        "they count as Other, / log 5; seven: all seven labels, / log 7.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _http(self) -> VlmMetricsConfig:
        if self.engine == "http" and self.http is None:
            raise ValueError("engine 'http' needs models.vlm.http (base_url, ...)")
        return self


class EvalModels(_Model):
    """Models of the metric families."""

    clip: ModelConfig = Field(
        default_factory=lambda: ModelConfig(model="openai/clip-vit-large-patch14"),
        description="CLIP for the image-text, directional and image-image scores (the paper: ViT-L/14).",
    )
    face: FaceConfig = Field(default_factory=FaceConfig)
    ocr: OcrConfig = Field(default_factory=OcrConfig)
    lpips_net: Literal["vgg", "alex", "squeeze"] = Field("vgg", description="LPIPS backbone (paper: vgg).")
    vlm: VlmMetricsConfig | None = Field(None, description="Needed by text_sim_vlm, race_entropy, vlm_score.")


def _small_pool() -> Resources:
    # Small CPU reservations: actors hold theirs for the whole job, and Ray Data's join tasks need a whole
    # CPU each, which a 2-CPU machine must keep free. Give GPU families (clip, vlm) num_gpus on a cluster.
    return Resources(pool_size=1, batch_size=8, num_cpus=0.1, torch_threads=1)


class EvalResources(_Model):
    """Actor pools, one per model family (each loads its models once per actor)."""

    face: Resources = Field(default_factory=_small_pool, description="FaceSim (dlib or antelopev2).")
    ocr: Resources = Field(default_factory=_small_pool, description="TextSim (rapidocr).")
    clip: Resources = Field(default_factory=_small_pool, description="CLIP scores.")
    lpips: Resources = Field(default_factory=_small_pool, description="LPIPS.")
    pixel: Resources = Field(default_factory=_small_pool, description="SSIM, pHash.")
    vlm: Resources = Field(default_factory=_small_pool, description="VLM metrics.")
    io: Resources = Field(
        default_factory=lambda: Resources(batch_size=32, num_cpus=0.1),
        description="Reading tables and originals, the prepare step, the thumbnail actor.",
    )
    join_partitions: int = Field(4, ge=1, description="Hash partitions of the joins on id.")
    join_num_cpus: float = Field(0.05, gt=0, description="CPUs per join aggregator actor.")


class ReportConfig(_Model):
    """The before/after grid of ``report.html``."""

    rows: int = Field(8, ge=0, description="Sampled rows per method (edited, then error, then kept rows).")
    thumb_size: int = Field(256, ge=32, description="Long side of the embedded images.")
    private_text: Literal["auto", "never"] = Field(
        "auto", description="auto: captions and edit instructions appear only when `out` lies under the "
        "sensitive table's folder (the report is then on the sensitive side); never: no text at all.",
    )  # fmt: skip


class EvalRayConfig(_Model):
    """How to reach Ray (as in a job config)."""

    address: str | None = Field(None, description="Ray address; None: attach if a cluster runs, else start.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")
    object_store_memory: int | None = Field(None, ge=75 * 2**20, description="Local object store bytes.")


class EvalConfig(_Model):
    """One evaluation: originals against the safe tables of one or more runs (methods)."""

    original: InputConfig = Field(..., description="The original images (any input format u2s reads).")
    methods: dict[str, str] = Field(
        ..., min_length=1, description="Method name → its safe table (a run's output folder, its _run.json, "
        "or a Parquet file/folder), local or s3://.",
    )  # fmt: skip
    sensitive_uri: str | None = Field(
        None, description="The sensitive table of a run (private caption, edit instruction): "
        "enables directional CLIP and, on the sensitive side, captions in the report.",
    )  # fmt: skip
    out: str = Field(..., description="Output folder: metrics.parquet, summary.json, report.html.")
    overwrite: bool = Field(True, description="Replace those three files if they exist.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    metrics: list[MetricName] = Field(
        default_factory=lambda: list(DEFAULT_METRICS), min_length=1, description="Metrics to compute."
    )
    models: EvalModels = Field(default_factory=EvalModels)
    resources: EvalResources = Field(default_factory=EvalResources)
    report: ReportConfig = Field(default_factory=ReportConfig)
    bootstrap_resamples: int = Field(2000, ge=100, description="Resamples of the 95% bootstrap CIs.")
    seed: int = Field(0, description="Seed of the bootstrap and of the report's row sampling.")
    ray: EvalRayConfig = Field(default_factory=EvalRayConfig)

    _absolute_paths = field_validator("sensitive_uri", "out")(_absolute)

    @field_validator("methods")
    @classmethod
    def _method_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _METHOD_NAME.match(name):
                raise ValueError(f"method name {name!r}: letters, digits, _ . - (at most 64)")
        return {name: _absolute(uri) or uri for name, uri in value.items()}

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _vlm_for_vlm_metrics(self) -> EvalConfig:
        wanted = [m for m in self.metrics if m in VLM_METRICS]
        if wanted and self.models.vlm is None:
            raise ValueError(f"metrics {', '.join(wanted)} need models.vlm (a VLM and its engine)")
        return self


def load_eval_config(
    base: dict[str, Any] | None = None, path: str | Path | None = None, overrides: list[str] | None = None
) -> EvalConfig:
    """A YAML file, then ``base`` (e.g. from command-line options) over it, then ``key.path=value``
    overrides; :class:`~u2s.config.ConfigError` names each bad field."""
    tree = read_yaml_mapping(path) if path else {}
    return validate_config(EvalConfig, apply_overrides(_deep_merge(tree, base or {}), overrides))
