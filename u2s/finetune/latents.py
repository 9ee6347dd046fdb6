"""Precomputed VAE latents and text embeddings (``precompute: true``): encode the pairs once, train on them.

:func:`precompute` is a Ray Data pass over the training pairs: an encoder actor (the training model's
own VAE and text encoders) turns each pair into its original's and edited image's VAE latent
*distribution* parameters (mean and log-variance, of the centre crop at ``resolution``) and the model's
text condition (IP2P: the CLIP context; FLUX Kontext: T5 embeddings and the pooled CLIP vector). They
are written as Parquet under ``<storage_path>/cache/<fingerprint>/`` with a ``_cache.json`` marker last;
the fingerprint covers the editor, base model, resolution and the pairs' content, so a later job on the
same pairs reads the cache and encodes nothing.

The train loop then calls :func:`cached_loss` instead of collating images: the model's own loss runs
with its VAE and text condition standing in for the cached values (:func:`cached_encoders`), so the
latent sample, noise, timesteps and dropout are drawn exactly as on images and the loss is the same.
What is given up: random crops and flips (every pair is its centre crop).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ray.data
    import torch

    from u2s.finetune.config import FinetuneConfig

CACHE_DIR = "cache"
MARKER = "_cache.json"
#: Cached columns: each image's latent distribution parameters, and the text condition's tensors.
LATENT_COLUMNS = ("original_latent", "edited_latent")
TEXT_COLUMNS = ("text_0", "text_1")


@dataclass
class CacheInfo:
    """Where the cache of a job's pairs is, and whether this job made it or found it."""

    uri: str
    fingerprint: str
    rows: int
    reused: bool


def _digests(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = []
    for i in range(len(batch["id"])):
        h = hashlib.sha256()
        for column in ("id", "original", "edited", "edit_instruction", "public_caption"):
            value = batch[column][i]
            h.update(value if isinstance(value, bytes) else str(value).encode())
            h.update(b"\0")
        out.append(h.hexdigest())
    return {"digest": np.array(out)}


def fingerprint(cfg: FinetuneConfig, pairs: ray.data.Dataset) -> str:
    """The cache key of ``pairs`` under ``cfg``: editor, base model (and revision), resolution, the
    SafeAttention text layout, and a digest of every pair's id, images and texts (order-free)."""
    assert cfg.model is not None
    digests = sorted(pairs.map_batches(_digests, batch_format="numpy").to_pandas()["digest"])
    key = {
        "editor": cfg.editor, "model": cfg.model.model, "revision": cfg.model.revision,
        "resolution": cfg.resolution, "pairs": hashlib.sha256("".join(digests).encode()).hexdigest(),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_uri(cfg: FinetuneConfig, key: str) -> str:
    from u2s.io.storage import uri_join

    return uri_join(cfg.storage_path, CACHE_DIR, key)


def load_model(cfg: FinetuneConfig, device: str = "cpu") -> Any:
    """The training model of ``cfg.editor`` (its VAE and text encoders encode the cache)."""
    if cfg.editor == "flux_kontext":
        from u2s.finetune.models.flux_kontext import FluxKontextModel

        return FluxKontextModel(cfg, device)
    from u2s.finetune.models.ip2p import IP2PModel

    return IP2PModel(cfg, device)


class Encoder:
    """Ray Data actor: pair rows → their latent distribution parameters and text condition."""

    def __init__(self, cfg: FinetuneConfig, collate: Callable[..., Any]) -> None:
        import torch

        from u2s.torch_utils import resolve_device

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.cfg, self.collate = cfg, collate
        self.model = load_model(cfg, resolve_device("cuda" if cfg.use_gpu else "cpu"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keys = list(batch)
        rows = [
            dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)
        ]
        images = self.collate(rows, self.cfg, generator=None)  # centre crops, no flip
        out: dict[str, np.ndarray] = {"id": np.array([str(r["id"]) for r in rows])}
        with torch.no_grad():
            vae = self.model.vae
            for column, pixels in zip(LATENT_COLUMNS, (images.original, images.edited), strict=True):
                parameters = vae.encode(pixels.to(self.model.device)).latent_dist.parameters
                out[column] = parameters.float().cpu().numpy()
            condition = self.model.conditioning(images)
            tensors = condition if isinstance(condition, tuple) else (condition,)
            for column, tensor in zip(TEXT_COLUMNS, tensors, strict=False):
                out[column] = tensor.float().cpu().numpy()
        return out


def precompute(
    cfg: FinetuneConfig, pairs: ray.data.Dataset, collate: Callable[..., Any]
) -> tuple[ray.data.Dataset, CacheInfo]:
    """The cached rows of ``pairs`` (encoded now, or read from an earlier job's cache) and where they are.
    ``collate`` is the train loop's rows → images function (centre crops, no flip, when not given a
    generator)."""
    import ray.data

    from u2s.io.storage import arrow_filesystem, read_json, uri_join, write_json

    key = fingerprint(cfg, pairs)
    uri = cache_uri(cfg, key)
    marker = read_json(uri_join(uri, MARKER), cfg.storage)
    fs, path = arrow_filesystem(uri, cfg.storage)
    reused = marker is not None and marker.get("fingerprint") == key
    if not reused:
        encoded = pairs.map_batches(
            Encoder, fn_constructor_kwargs={"cfg": cfg, "collate": collate}, batch_size=cfg.batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.cpus_per_worker,
            num_gpus=1 if cfg.use_gpu else 0,
        )  # fmt: skip
        encoded.write_parquet(path, filesystem=fs)
        rows = ray.data.read_parquet(path, filesystem=fs).count()
        marker = {"fingerprint": key, "rows": rows, "editor": cfg.editor, "resolution": cfg.resolution}
        write_json(uri_join(uri, MARKER), cfg.storage, marker)
    cached = ray.data.read_parquet(path, filesystem=fs)
    return cached, CacheInfo(uri=uri, fingerprint=key, rows=int(marker["rows"]), reused=reused)


class _CachedVAE:
    """Stands in for the VAE: ``encode`` of cached distribution parameters returns that distribution."""

    def __init__(self, vae: Any) -> None:
        self.config = vae.config

    @staticmethod
    def encode(parameters: torch.Tensor) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(parameters))


@contextlib.contextmanager
def cached_encoders(model: Any) -> Iterator[None]:
    """Within it, ``model``'s VAE encodes cached distribution parameters and its text condition is the
    batch's cached one (:class:`CachedBatch`), so ``model.loss`` runs unchanged on the cache."""
    vae = model.vae
    model.vae = _CachedVAE(vae)
    model.conditioning = lambda batch: batch.condition
    try:
        yield
    finally:
        model.vae = vae
        del model.conditioning  # the class's method again


@dataclass
class CachedBatch:
    """A micro-batch of cached pairs, shaped like :class:`~u2s.finetune.models.ip2p.PairBatch`: the
    images are latent distribution parameters, ``condition`` the model's text condition."""

    original: torch.Tensor
    edited: torch.Tensor
    condition: Any
    edit_instruction: list[str]
    public_caption: list[str]


def cached_batch(rows: list[dict[str, Any]]) -> CachedBatch:
    """Cached rows (as the train loop reads them) → a :class:`CachedBatch`."""
    import torch

    def stack(column: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(r[column], dtype=np.float32) for r in rows]))

    texts = [stack(c) for c in TEXT_COLUMNS if rows[0].get(c) is not None]
    return CachedBatch(
        original=stack("original_latent"), edited=stack("edited_latent"),
        condition=tuple(texts) if len(texts) > 1 else texts[0], edit_instruction=[""] * len(rows),
        public_caption=[""] * len(rows),
    )  # fmt: skip


def cached_loss(
    model: Any, unet: Any, rows: list[dict[str, Any]], generator: torch.Generator
) -> torch.Tensor:
    """The model's training loss on cached rows. ``generator`` first advances as :func:`collate`'s crop
    and flip draws would (three per row), so the loss's own draws match the image path's."""
    import torch

    for _ in rows:
        torch.rand(3, generator=generator)
    with cached_encoders(model):
        return model.loss(unet, cached_batch(rows), generator)
