"""Ids that confirm nothing: keyed ids, their key kept only beside the sensitive table, stable on --resume.

What is checked is what someone holding the safe table can and cannot do: a guessed path's SHA-1 (the
old, unkeyed id) finds no row; another output of the same images has other ids; the key is nowhere in
the safe output, the records or the logs; and a resumed run gives its new rows the ids the first attempt
would have given them (else a row would be doubled, which the exactly-once check catches).
"""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from u2s.config import InputConfig, OutputConfig, Resources, StorageConfig, load_config
from u2s.io.ids import ID_KEY_NAME, IdKey, IdKeyError, output_id_key, read_id_key
from u2s.io.listing import list_input
from u2s.io.writers import parquet_files, prepare_outputs, read_columns
from u2s.testing.images import noise_image

RESOURCES = Resources(batch_size=4, num_cpus=0.5)
LOCAL = StorageConfig()
IMAGES = 6


def sha20(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:20]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Paths that name people, as private datasets' paths do."""
    root = tmp_path_factory.mktemp("ids") / "patients"
    for i in range(IMAGES):
        folder = root / f"person_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        noise_image(32, 24, seed=i).save(folder / f"scan{i}.png")
    return root


def _sources(images: Path) -> list[str]:
    return sorted(str(p) for p in images.rglob("*.png"))


def _listed(input: InputConfig, key: IdKey | None) -> tuple[dict[str, str], str]:
    listing = list_input(input, LOCAL, RESOURCES, key)
    rows = listing.dataset.take_all()
    return {r["source"]: r["id"] for r in rows}, listing.fingerprint


def _prepare(out: Path, input: InputConfig, resume: bool = False, overwrite: bool = False) -> IdKey | None:
    output = OutputConfig(uri=str(out / "safe"), sensitive_uri=str(out / "sensitive"), overwrite=overwrite)
    resuming = prepare_outputs(output, LOCAL, resume=resume)
    return output_id_key(input, output, LOCAL, resume=resuming)


# ----------------------------------------------------------------------------------- listing and key


def test_the_key_is_made_once_per_output_and_kept_beside_the_sensitive_table(images, tmp_path, ray_cluster):
    input = InputConfig(uri=str(images))
    key = _prepare(tmp_path / "a", input)
    key_file = tmp_path / "a" / "sensitive" / ID_KEY_NAME
    assert key_file.is_file() and stat.S_IMODE(key_file.stat().st_mode) == 0o600  # owner only
    assert list((tmp_path / "a" / "safe").iterdir()) == []  # nothing on the published side
    assert key is not None and repr(key) == str(key) == "IdKey(...)"  # never printed
    ids, fingerprint = _listed(input, key)
    assert sorted(ids) == _sources(images)
    assert len(set(ids.values())) == IMAGES and all(len(i) == 20 for i in ids.values())
    assert not set(ids.values()) & {sha20(s) for s in ids}  # a guessed path's SHA-1 finds nothing

    # An interrupted run leaves its outputs; resuming reads the same key: the same ids and fingerprint.
    (tmp_path / "a" / "safe" / "part-x-000000-000.parquet").write_bytes(b"a committed file")
    resumed_key = _prepare(tmp_path / "a", input, resume=True)
    assert _listed(input, resumed_key) == (ids, fingerprint)
    assert read_id_key(str(tmp_path / "a" / "sensitive"), LOCAL) == resumed_key

    # Another output of the same images: another key, no id in common, another fingerprint.
    other_ids, other_fingerprint = _listed(input, _prepare(tmp_path / "b", input))
    assert sorted(other_ids) == sorted(ids)
    assert not set(other_ids.values()) & set(ids.values()) and other_fingerprint != fingerprint

    # A run told to share the first output's key (runs to compare) gets its ids, and keeps its own copy.
    shared = input.model_copy(update={"id_key_from": str(tmp_path / "a" / "sensitive")})
    assert _listed(shared, _prepare(tmp_path / "c", shared)) == (ids, fingerprint)
    assert (tmp_path / "c" / "sensitive" / ID_KEY_NAME).is_file()

    # overwrite replaces the output, rows and ids alike: a fresh key.
    replaced = _prepare(tmp_path / "a", input, overwrite=True)
    assert not set(_listed(input, replaced)[0].values()) & set(ids.values())


def test_source_hash_and_column_ids_need_no_key_and_write_none(images, tmp_path, ray_cluster):
    input = InputConfig(uri=str(images), id="source_hash")
    assert _prepare(tmp_path / "out", input) is None
    assert not (tmp_path / "out" / "sensitive" / ID_KEY_NAME).exists()
    ids, _ = _listed(input, None)
    assert all(row_id == sha20(source) for source, row_id in ids.items())  # documented: confirms paths


def test_keyed_ids_without_a_key_are_refused(images, ray_cluster):
    with pytest.raises(IdKeyError, match="needs the output's id key"):
        list_input(InputConfig(uri=str(images)), LOCAL, RESOURCES)


def test_resuming_rows_written_without_a_key_is_refused(images, tmp_path, ray_cluster):
    """Rows an unkeyed run wrote cannot be matched by keyed ids: resume stops before listing."""
    _prepare(tmp_path / "out", InputConfig(uri=str(images), id="source_hash"))
    (tmp_path / "out" / "safe" / "part-x-000000-000.parquet").write_bytes(b"a committed file")
    with pytest.raises(IdKeyError, match="no id key"):
        _prepare(tmp_path / "out", InputConfig(uri=str(images)), resume=True)
    # An output the earlier attempt left without any row is fine: it just gets its key now.
    _prepare(tmp_path / "empty", InputConfig(uri=str(images), id="source_hash"))
    assert _prepare(tmp_path / "empty", InputConfig(uri=str(images)), resume=True) is not None


def test_the_key_object_lives_only_under_the_sensitive_prefix_on_s3(s3_endpoint, s3_bucket, ray_cluster):
    import boto3

    storage = StorageConfig(endpoint_url=s3_endpoint)
    output = OutputConfig(uri=f"{s3_bucket}/safe", sensitive_uri=f"{s3_bucket}/restricted/sensitive")
    key = output_id_key(InputConfig(uri="/unused"), output, storage, resume=prepare_outputs(output, storage))
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket[5:])
    assert [item["Key"] for item in listed["Contents"]] == [f"restricted/sensitive/{ID_KEY_NAME}"]
    assert read_id_key(output.sensitive_uri, storage) == key


# ------------------------------------------------------------------------------------- whole runs


def _config(tiny_models, images: Path, out: Path, *extra: str):
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={images}",
            f"output.uri={out}/safe",
            f"output.sensitive_uri={out}/sensitive",
            "output.rows_per_file=2",
            f"stage1.vlm.model={tiny_models['vlm']}",
            f"stage1.llm.model={tiny_models['llm']}",
            "stage1.calls.inspect.generation.max_new_tokens=64",
            "stage1.calls.describe.generation.max_new_tokens=8",
            "stage2.editor=blur_image",
            *extra,
        ],
    )


@pytest.mark.slow
def test_runs_publish_keyed_ids_that_resume_keeps_and_other_outputs_do_not_share(
    ray_cluster, tiny_models, images, tmp_path, caplog
):
    from u2s.pipeline import run

    caplog.set_level(logging.DEBUG)
    cfg = _config(tiny_models, images, tmp_path / "a")
    run(cfg)
    safe_ids = set(read_columns(cfg.output.uri, LOCAL, ["id"]).column("id").to_pylist())
    sensitive = read_columns(cfg.output.sensitive_uri, LOCAL, ["id", "source"]).to_pylist()
    assert sorted(row["source"] for row in sensitive) == _sources(images)  # the map back to sources
    assert {row["id"] for row in sensitive} == safe_ids and len(safe_ids) == IMAGES
    assert not safe_ids & {sha20(source) for source in _sources(images)}  # guessed paths confirm nothing

    key = read_id_key(cfg.output.sensitive_uri, LOCAL)
    secret = {key.secret, key.secret.hex().encode()}
    safe_files = [p for p in Path(cfg.output.uri).rglob("*") if p.is_file()]
    assert safe_files and not [p for p in safe_files if p.name == ID_KEY_NAME]
    for path in [*safe_files, Path(cfg.output.sensitive_uri, "_run.json")]:
        data = path.read_bytes()
        assert not [s for s in secret if s in data], path.name
    assert key.secret.hex() not in caplog.text

    # Interrupted after some files: drop the last committed pair, as if the run had stopped there.
    last = parquet_files(cfg.output.uri, LOCAL)[-1]
    lost = set(pq.read_table(Path(cfg.output.uri, last), columns=["id"]).column("id").to_pylist())
    Path(cfg.output.uri, last).unlink()
    Path(cfg.output.sensitive_uri, last).unlink()
    summary = run(cfg, resume=True)
    assert summary.resumed == IMAGES - len(lost) and summary.written == len(lost)
    assert set(read_columns(cfg.output.uri, LOCAL, ["id"]).column("id").to_pylist()) == safe_ids

    other = _config(tiny_models, images, tmp_path / "b")
    run(other)
    other_ids = set(read_columns(other.output.uri, LOCAL, ["id"]).column("id").to_pylist())
    assert len(other_ids) == IMAGES and not other_ids & safe_ids
