"""Training pairs from u2s runs: a Ray Data pipeline over the safe and sensitive tables (PAPER.md §3.3).

Per run: the sensitive table's ``status: edited`` rows (id, source, edit instruction, public caption)
join, by ``id``, the safe table's edited images; each original is fetched from its ``source`` (under
``original`` when set) with :func:`u2s.io.readers.fetch_bytes`. Pairs then pass the paper's CLIP filter:
with the eval suite's :class:`~u2s.eval.detectors.ClipEncoder`, a pair is kept when
``CLIP(edited, caption) > threshold × CLIP(original, caption)`` (the paper's ratio ``> 0.7`` for
positive scores), the caption being the public caption. Train and val are split by a hash of the seed
and the id, so the split does not depend on the order rows arrive in.

Rows: ``{id, original: bytes, edited: bytes, edit_instruction, public_caption}``. Texts are private:
nothing here logs them.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    import ray.data

    from u2s.config import StorageConfig
    from u2s.finetune.config import FinetuneConfig, RunSource

PAIR_COLUMNS = ("id", "original", "edited", "edit_instruction", "public_caption")
SENSITIVE_COLUMNS = ("id", "source", "status", "edit_instruction", "public_caption")


def is_val(id: str, seed: int, val_fraction: float) -> bool:
    """Whether pair ``id`` belongs to the val split (a hash of seed and id below ``val_fraction``)."""
    digest = hashlib.sha256(f"{seed}:{id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _read_files(batch: pa.Table, columns: list[str], storage: StorageConfig) -> Any:
    import pyarrow.parquet as pq

    from u2s.io.storage import arrow_filesystem

    for uri in batch.column("file").to_pylist():
        afs, path = arrow_filesystem(uri, storage)
        with afs.open_input_file(path) as f:
            for part in pq.ParquetFile(f).iter_batches(batch_size=64, columns=columns):
                table = pa.Table.from_batches([part])
                yield table.filter(pa.compute.equal(table.column("status"), "edited"))


def _read_edited(uri: str, columns: tuple[str, ...], cfg: FinetuneConfig) -> ray.data.Dataset:
    """A u2s table's ``status: edited`` rows (``columns``), one read task per Parquet file."""
    import ray.data

    from u2s.eval.job import parquet_files

    files = parquet_files(uri, cfg.storage)
    return ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).map_batches(
        _read_files, fn_kwargs={"columns": list(columns), "storage": cfg.storage}, batch_size=1,
        batch_format="pyarrow", **cfg.data.ray_remote_args(),
    )  # fmt: skip


def _edited_images(batch: pa.Table) -> pa.Table:
    images = batch.column("image").to_pylist()
    return pa.table({
        "id": batch.column("id"),
        "edited": pa.array([(image or {}).get("bytes") for image in images], pa.binary()),
    })  # fmt: skip


def _fetch_originals(batch: pa.Table, root: str | None, storage: StorageConfig) -> pa.Table:
    """Add each row's original image bytes (fetched from ``source``); rows whose fetch fails are dropped
    (counted by :func:`build_pairs` as pairs without an original)."""
    from u2s.io.readers import fetch_bytes
    from u2s.io.storage import uri_join

    sources = batch.column("source").to_pylist()
    uris = [uri_join(root, s) if root else s for s in sources]
    contents = fetch_bytes(uris, storage)
    data = [bytes(c) if isinstance(c, bytes | bytearray | memoryview) else None for c in contents]
    batch = batch.append_column("original", pa.array(data, pa.binary()))
    return batch.filter(pa.compute.is_valid(batch.column("original")))


class ClipRatio:
    """Ray Data actor: CLIP image-text scores of the edited and original images against the public
    caption, and the filter's verdict (``keep``), per pair."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        from u2s.eval.detectors import ClipEncoder
        from u2s.torch_utils import set_threads

        set_threads(cfg.data.threads())
        self.threshold = cfg.clip_ratio_threshold
        self.clip = ClipEncoder(cfg.clip_model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import io

        from PIL import Image

        n = batch.num_rows
        images = [Image.open(io.BytesIO(b)) for b in batch.column("edited").to_pylist()]
        images += [Image.open(io.BytesIO(b)) for b in batch.column("original").to_pylist()]
        embedded = self.clip.images(images)
        texts = self.clip.texts([c or "" for c in batch.column("public_caption").to_pylist()])
        edited = (embedded[:n] * texts).sum(dim=-1).tolist()
        original = (embedded[n:] * texts).sum(dim=-1).tolist()
        keep = [e > self.threshold * o for e, o in zip(edited, original, strict=True)]
        batch = batch.append_column("clip_edited", pa.array(edited, pa.float64()))
        batch = batch.append_column("clip_original", pa.array(original, pa.float64()))
        return batch.append_column("keep", pa.array(keep, pa.bool_()))


def _run_pairs(run: RunSource, cfg: FinetuneConfig) -> ray.data.Dataset:
    """One run's edited pairs with their originals (before the CLIP filter)."""
    io_args = cfg.data.ray_remote_args()
    sensitive = _read_edited(run.sensitive, SENSITIVE_COLUMNS, cfg)
    safe = _read_edited(run.safe, ("id", "image", "status"), cfg).map_batches(
        _edited_images, batch_format="pyarrow", **io_args
    )
    joined = sensitive.join(safe, "inner", num_partitions=2, on=("id",),
                            aggregator_ray_remote_args={"num_cpus": 0.05})  # fmt: skip
    return joined.map_batches(
        _fetch_originals, fn_kwargs={"root": run.original, "storage": cfg.storage},
        batch_size=cfg.data.batch_size, batch_format="pyarrow", **io_args,
    )  # fmt: skip


def _split(batch: pa.Table, seed: int, val_fraction: float) -> pa.Table:
    """Add ``kept`` (passes the CLIP filter) and ``kept_val`` (kept and in the val split) as 0/1."""
    has_keep = "keep" in batch.column_names
    keep = batch.column("keep").to_pylist() if has_keep else [True] * batch.num_rows
    val = [
        k and is_val(i, seed, val_fraction) for i, k in zip(batch.column("id").to_pylist(), keep, strict=True)
    ]
    batch = batch.append_column("kept", pa.array([int(k) for k in keep], pa.int64()))
    return batch.append_column("kept_val", pa.array([int(v) for v in val], pa.int64()))


def _train_rows(batch: pa.Table) -> pa.Table:
    """The kept rows outside the val split, as pair rows."""
    mask = pa.compute.and_(
        pa.compute.equal(batch.column("kept"), 1), pa.compute.equal(batch.column("kept_val"), 0)
    )
    return batch.filter(mask).select(list(PAIR_COLUMNS))


def _where(batch: pa.Table, column: str, value: int) -> pa.Table:
    """The rows whose ``column`` equals ``value``, as pair rows."""
    rows = batch.filter(pa.compute.equal(batch.column(column), value))
    return rows.select(list(PAIR_COLUMNS))


def count_rows(cfg: FinetuneConfig) -> int:
    """Rows of every run's sensitive table (all statuses), from the Parquet footers."""
    import pyarrow.parquet as pq

    from u2s.eval.job import parquet_files
    from u2s.io.storage import arrow_filesystem

    total = 0
    for run in cfg.runs:
        for uri in parquet_files(run.sensitive, cfg.storage):
            afs, path = arrow_filesystem(uri, cfg.storage)
            with afs.open_input_file(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
    return total


def build_pairs(cfg: FinetuneConfig) -> tuple[ray.data.Dataset, ray.data.Dataset, dict[str, int]]:
    """The train and val Datasets of pair rows (:data:`PAIR_COLUMNS`) and their counts.

    Counts: ``rows`` (the runs' sensitive rows, any status), ``edited`` (edited pairs whose original
    was fetched), ``missing_original`` (edited rows without a safe image or an original),
    ``clip_filtered`` (pairs the CLIP ratio dropped), ``train``, ``val``. The pairs are materialized once
    (the counts need them); train and val are views of that one copy.
    """
    import ray.data

    runs = [_run_pairs(run, cfg) for run in cfg.runs]
    ds = runs[0].union(*runs[1:]) if len(runs) > 1 else runs[0]
    if cfg.clip_ratio_threshold is not None:
        ds = ds.map_batches(
            ClipRatio, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.data.batch_size,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), **cfg.data.ray_remote_args(),
        )  # fmt: skip
    io_args = cfg.data.ray_remote_args()
    ds = ds.map_batches(
        _split, fn_kwargs={"seed": cfg.seed, "val_fraction": cfg.val_fraction}, batch_format="pyarrow",
        **io_args,
    ).materialize()  # fmt: skip
    edited = ds.count()
    sums = ds.sum(["kept", "kept_val"]) if edited else {}
    kept, n_val = (int(sums.get(f"sum({name})") or 0) for name in ("kept", "kept_val"))
    edited_rows = sum(_read_edited(run.sensitive, ("id", "status"), cfg).count() for run in cfg.runs)

    train = ds.map_batches(_train_rows, batch_format="pyarrow", **io_args)
    val = ds.map_batches(
        _where, fn_kwargs={"column": "kept_val", "value": 1}, batch_format="pyarrow", **io_args
    )

    counts = {
        "rows": count_rows(cfg),
        "edited": edited,
        "missing_original": edited_rows - edited,
        "clip_filtered": edited - kept,
        "train": kept - n_val,
        "val": n_val,
    }
    return train, val, counts
