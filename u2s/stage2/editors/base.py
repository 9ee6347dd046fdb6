"""The interface every stage-2 editor implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from PIL import Image

    from u2s.config import Stage2Config


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


class Editor(ABC):
    """An image editor that rewrites the private content of a batch of images.

    Subclasses set ``name`` (the registry key, recorded in each edited row's ``editor`` column) and are
    constructed with the job's :class:`~u2s.config.Stage2Config`; the constructor loads the model once
    (heavy imports go there, not at module import) and :meth:`edit` is then called once per batch.
    """

    name: ClassVar[str]
    #: False: the runner resizes each image to a working size (sides multiples of 64, long side
    #: ``stage2.resolution``) before :meth:`edit` and back to its original size after. True: the editor
    #: gets each image at its own size (batches still share one size) and its output is kept as is,
    #: so pixels it leaves alone stay exact (the region baselines need this).
    native_size: ClassVar[bool] = False

    def edit(
        self,
        images: list[Image.Image],
        prompts: list[EditPrompt],
        seeds: list[int],
    ) -> list[Image.Image]:
        """Edit a batch of images; returns one RGB image per input, in order.

        Args:
            images: upright RGB images that all share one size (the runner guarantees it): the working
                size, or the images' own size for ``native_size`` editors.
            prompts: per image, the texts stage 1 wrote (see :class:`EditPrompt`).
            seeds: per image, the seed of its random stream (63-bit, non-negative). An image's output
                must depend only on its own inputs and seed, so reruns reproduce it.

        The three lists have the same length. Outputs have the same size as the inputs. Texts are
        private: implementations must never log them. Validates the batch, then calls :meth:`_edit`.
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


def load_pipeline(pipeline_cls: Any, config: Stage2Config, **kwargs: Any) -> tuple[str, Any]:
    """``pipeline_cls.from_pretrained(config.model)`` on its device, in its dtype; returns (device, pipe).

    The one loader of every diffusion editor: model libraries' input-echoing warnings silenced first
    (prompts are private), progress bars off. Call :func:`compile_denoiser` once the pipeline is final.
    """
    from u2s.log_privacy import silence_input_echo
    from u2s.torch_utils import resolve_device, resolve_dtype

    silence_input_echo()
    model = config.model
    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    pipe = pipeline_cls.from_pretrained(model.model, revision=model.revision, dtype=dtype, **kwargs).to(
        device
    )
    pipe.set_progress_bar_config(disable=True)
    return device, pipe


def compile_denoiser(pipe: Any, config: Stage2Config) -> None:
    """`torch.compile` the pipeline's denoiser (UNet or transformer) when ``config.compile`` is set.

    The denoiser runs once per step and CFG branch, so it is where compilation pays; the first batch
    of each new working size pays the compile time (buckets keep those few).
    """
    if not config.compile:
        return
    import torch

    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            setattr(pipe, name, torch.compile(module, mode=config.compile_mode))


def seeded_generators(device: str, seeds: list[int]) -> list[Any]:
    """One `torch.Generator` per row on ``device``: a row's noise depends only on its own seed."""
    import torch

    return [torch.Generator(device).manual_seed(seed) for seed in seeds]
