"""The interface every stage-2 editor implements, and the base of each editor's own config."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from u2s.config_base import ConfigModel, ModelConfig

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config_base import Resources, StorageConfig

#: Side lengths of the IP2P family's working sizes are multiples of this.
SIZE_MULTIPLE = 64


class EditorConfig(ConfigModel):
    """Base of an editor's own settings: the section ``stage2.<editor name>`` of a job config.

    Each editor file defines one subclass with the paper's defaults, and its editor class names it in
    ``config_class``; ``Stage2Config`` gets one optional section per registered editor.
    """

    def stage1_texts(self) -> frozenset[str]:
        """The stage-1 texts (``EditPrompt`` fields) the editor reads. The job config switches stage 1's
        combine call on when this holds ``combined_caption``."""
        return frozenset({"edit_instruction"})


@dataclass(frozen=True)
class EditPrompt:
    """The texts stage 1 wrote for one image. All of them are private: never log them.

    Editors pick what they need: instruction editors the edit instruction, dual-condition editors also
    the public caption, FlowEdit a source prompt (describes the original) and a target prompt.
    """

    edit_instruction: str
    public_caption: str = ""
    private_caption: str = ""
    combined_caption: str | None = None  # the public caption with the edit applied (stage 1 call D)

    def column(self, name: str) -> str:
        """The text of a configurable prompt column (e.g. FlowEdit's source/target columns)."""
        value = getattr(self, name)
        if not value:
            raise ValueError(f"the row has no {name}")
        return value


class Stage2Settings(Protocol):
    """What an editor reads of the stage-2 config (:class:`u2s.config.Stage2Config`, which is assembled
    from the editor registry): its own section and the settings every editor shares."""

    editor: str
    compile: bool
    compile_mode: str
    aspect_buckets: list[tuple[int, int]] | None
    resources: Resources

    def section(self, name: str | None = None) -> EditorConfig: ...


class Editor(ABC):
    """An image editor that rewrites the private content of a batch of images.

    Subclasses set ``name`` (the registry key, recorded in each edited row's ``editor`` column) and
    ``config_class`` (their section of the job config), and are constructed with the job's
    ``Stage2Config``: ``self.config`` is then the editor's own section and ``self.stage2`` the whole
    stage-2 config (shared settings: ``compile``, ``resources``...) and ``self.storage`` how to reach
    s3:// models (None: the AWS chain). The constructor loads the model once (heavy imports go there,
    not at module import); :meth:`edit` is then called once per batch.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[EditorConfig]]
    #: Encoding of this editor's outputs under ``stage2.output_format: auto``: JPEG (q95) for an editor
    #: that rewrites every pixel anyway; a lossless one where untouched pixels must stay exact.
    output_format: ClassVar[str] = "JPEG"

    def __init__(self, stage2: Stage2Settings, storage: StorageConfig | None = None) -> None:
        self.stage2 = stage2
        self.storage = storage
        self.config: Any = stage2.section(self.name)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of ``width`` × ``height`` (upright) is edited at. Default: its own size.

        The runner resizes each image to this size before :meth:`edit` (images of one call share it)
        and its output back to the original size after; at the image's own size nothing is resampled,
        so pixels an editor leaves alone stay exact.
        """
        return width, height

    def bucket_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the runner edits an image of ``width`` × ``height`` at: its :meth:`working_size`, or,
        under ``stage2.aspect_buckets`` and for an editor that works at a fixed ``resolution`` (its config
        has one: the InstructPix2Pix family, FLUX Kontext), the working size of the nearest bucket ratio.

        It depends on the image alone, never on its batch-mates, so an image's output does not either.
        Native-size editors (FlowEdit, the baselines) keep their own sizes: a bucket would resample them.
        """
        ratios = self.stage2.aspect_buckets
        if not ratios or not hasattr(self.config, "resolution"):
            return self.working_size(width, height)
        return self.working_size(*nearest_aspect(width, height, ratios))

    def edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        """Edit a batch of images; returns one RGB image per input, in order.

        Args:
            images: upright RGB images that all share one size (the runner guarantees it, and gives
                each image at its :meth:`working_size`).
            prompts: per image, the texts stage 1 wrote (see :class:`EditPrompt`).
            seeds: per image, the seed of its random stream (63-bit, non-negative). An image's output
                must depend only on its own inputs and seed, so reruns reproduce it.

        The three lists have the same length. Outputs have the same size as the inputs. An output equal
        to its input means "not edited": the runner publishes no such image. Texts are private:
        implementations must never log them. Validates the batch, then calls :meth:`_edit`.
        """
        self.check_batch(images, prompts, seeds)
        return self._edit(images, prompts, seeds) if images else []

    @abstractmethod
    def _edit(
        self, images: list[Image.Image], prompts: list[EditPrompt], seeds: list[int]
    ) -> list[Image.Image]:
        """The editor's work on a validated, non-empty batch (see :meth:`edit`)."""

    @staticmethod
    def check_batch(images: list[Image.Image], prompts: list[EditPrompt], seeds: list[int]) -> None:
        """Raise ValueError unless the lists align and every image shares one size."""
        if not len(images) == len(prompts) == len(seeds):
            raise ValueError("images, prompts and seeds must have the same length")
        if len({img.size for img in images}) > 1:
            raise ValueError("all images of one edit call must share one size")


def fit_long_side(width: int, height: int, long_side: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The aspect-preserving size whose long side is ``long_side``, sides rounded to ``multiple``.

    Each side is rounded to the nearest multiple (at least one multiple). Latent-diffusion editors need
    sides divisible by the VAE's downsampling (8) times the UNet's (up to 8), and coarse rounding also
    leaves few distinct sizes, so rows fall into few buckets and batches stay full.
    """
    if width < 1 or height < 1:
        raise ValueError(f"invalid image size {width}x{height}")
    scale = long_side / max(width, height)
    w, h = (max(multiple, int(side * scale / multiple + 0.5) * multiple) for side in (width, height))
    return w, h


def nearest_aspect(width: int, height: int, ratios: list[tuple[int, int]]) -> tuple[int, int]:
    """The size with ``width`` × ``height``'s long side and the ratio in ``ratios`` nearest to its own
    (width:height pairs, compared in log scale so 4:3 and 3:4 are as far from 1:1; ties go to the first)."""
    if width < 1 or height < 1:
        raise ValueError(f"invalid image size {width}x{height}")
    own = math.log(width / height)
    rw, rh = min(ratios, key=lambda r: abs(math.log(r[0] / r[1]) - own))
    side = max(width, height)
    return (side, max(1, round(side * rh / rw))) if rw >= rh else (max(1, round(side * rw / rh)), side)


def load_pipeline(
    pipeline_cls: Any, model: ModelConfig, storage: StorageConfig | None = None, **kwargs: Any
) -> tuple[str, Any]:
    """``pipeline_cls.from_pretrained(model.model)`` on its device, in its dtype; returns (device, pipe).

    The one loader of every diffusion editor: model libraries' input-echoing warnings silenced first
    (prompts are private), progress bars off; an s3:// model is staged into the local model cache first
    (``storage``: endpoint and cache) and loads from there. Call :func:`compile_denoiser` once the
    pipeline is final.
    """
    from u2s.io.model_store import local_model
    from u2s.log_privacy import silence_input_echo
    from u2s.torch_utils import resolve_device, resolve_dtype

    silence_input_echo()
    model = local_model(model, storage)
    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    pipe = pipeline_cls.from_pretrained(model.model, revision=model.revision, dtype=dtype, **kwargs).to(
        device
    )
    pipe.set_progress_bar_config(disable=True)
    return device, pipe


def compile_denoiser(pipe: Any, stage2: Stage2Settings) -> None:
    """`torch.compile` the pipeline's denoiser (UNet or transformer) when ``stage2.compile`` is set.

    The denoiser runs once per step and CFG branch, so it is where compilation pays; the first batch
    of each new working size pays the compile time (buckets keep those few).
    """
    if not stage2.compile:
        return
    import torch

    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            setattr(pipe, name, torch.compile(module, mode=stage2.compile_mode))


def seeded_generators(device: str, seeds: list[int]) -> list[Any]:
    """One `torch.Generator` per row on ``device``: a row's noise depends only on its own seed."""
    import torch

    return [torch.Generator(device).manual_seed(seed) for seed in seeds]
