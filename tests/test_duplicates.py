"""Rows listed twice are caught before any model runs: a source listed again under the same id is
dropped and counted, one id for different sources is refused (naming ids, never sources)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from u2s.config import InputConfig, Resources, StorageConfig, load_config
from u2s.io.errors import InputError
from u2s.io.ids import IdKey
from u2s.io.listing import list_input
from u2s.io.writers import read_columns
from u2s.testing.images import noise_image

RESOURCES = Resources(batch_size=4, num_cpus=0.5)
LOCAL = StorageConfig()
KEY = IdKey.generate()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("dupes")
    paths = [folder / f"scan_{name}.png" for name in ("alice", "bob", "carol")]
    for seed, path in enumerate(paths):
        noise_image(32, 24, seed=seed).save(path)
    return paths


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_source_listed_twice_is_kept_once_across_and_within_files(images, tmp_path, ray_cluster) -> None:
    a, b, c = (str(p) for p in images)
    _manifest(tmp_path / "m" / "1.jsonl", [{"uri": a}, {"uri": b}, {"uri": a}])
    _manifest(tmp_path / "m" / "2.jsonl", [{"uri": c}, {"uri": a}])
    cfg = InputConfig(uri=str(tmp_path / "m"), format="manifest")
    first, again = list_input(cfg, LOCAL, RESOURCES, KEY), list_input(cfg, LOCAL, RESOURCES, KEY)
    rows = first.dataset.take_all()
    assert sorted(r["source"] for r in rows) == sorted([a, b, c]) and len({r["id"] for r in rows}) == 3
    assert first.rows == 3 and first.stats()["duplicates_dropped"] == 2
    assert first.fingerprint == again.fingerprint  # what --resume compares
    once = InputConfig(
        uri=str(_manifest(tmp_path / "once.jsonl", [{"uri": u} for u in (c, b, a)])), format="manifest"
    )
    assert list_input(once, LOCAL, RESOURCES, KEY).fingerprint == first.fingerprint  # of the rows kept


def test_one_id_for_different_sources_is_refused_naming_ids_only(images, tmp_path, ray_cluster) -> None:
    a, b, c = (str(p) for p in images)
    _manifest(tmp_path / "m.jsonl", [{"uri": a, "n": "7"}, {"uri": b, "n": "8"}, {"uri": c, "n": "7"}])
    cfg = InputConfig(uri=str(tmp_path / "m.jsonl"), format="manifest", id="column", id_column="n")
    with pytest.raises(InputError, match=r"e\.g\. 7\)") as refused:
        list_input(cfg, LOCAL, RESOURCES, KEY)
    assert not [p for p in images if p.name in str(refused.value)]
    # The same in a Parquet id column, the colliding rows in different files (different tasks).
    (tmp_path / "p").mkdir()
    for name in ("a", "b"):
        pq.write_table(
            pa.table({"image": pa.array([b"x"], pa.binary()), "n": ["1"]}), tmp_path / "p" / f"{name}.parquet"
        )
    parquet = InputConfig(uri=str(tmp_path / "p"), format="parquet", id="column", id_column="n")
    with pytest.raises(InputError, match=r"e\.g\. 1\)"):
        list_input(parquet, LOCAL, RESOURCES, KEY)


def _config(tiny_models, manifest: Path, out: Path, *extra: str):
    return load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={manifest}",
            "input.format=manifest",
            f"output.uri={out}/safe",
            f"output.sensitive_uri={out}/sensitive",
            f"stage1.vlm.model={tiny_models['vlm']}",
            f"stage1.llm.model={tiny_models['llm']}",
            "stage1.calls.inspect.generation.max_new_tokens=64",
            "stage1.calls.describe.generation.max_new_tokens=8",
            "stage2.editor=blur_image",
            *extra,
        ],
    )


@pytest.mark.slow
def test_a_run_over_a_manifest_listing_a_uri_twice_writes_it_once(images, tiny_models, tmp_path, ray_cluster):
    from u2s.pipeline import run

    a, b, c = (str(p) for p in images)
    manifest = _manifest(tmp_path / "m.jsonl", [{"uri": a}, {"uri": b}, {"uri": c}, {"uri": b}])
    cfg = _config(tiny_models, manifest, tmp_path / "out")
    summary = run(cfg)
    assert summary.rows == 3 and summary.listing["duplicates_dropped"] == 1
    for uri in (cfg.output.uri, cfg.output.sensitive_uri):
        ids = read_columns(uri, LOCAL, ["id"]).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == 3
    sources = read_columns(cfg.output.sensitive_uri, LOCAL, ["source"]).column("source").to_pylist()
    assert sorted(sources) == sorted([a, b, c])
    for record in (Path(cfg.output.uri, "_run.json"), Path(cfg.output.sensitive_uri, "_run.json")):
        assert json.loads(record.read_text())["summary"]["listing"]["duplicates_dropped"] == 1
    resumed = run(cfg, resume=True)  # the same listing, the same fingerprint: nothing left to do
    assert resumed.resumed == 3 and resumed.written == 0

    clash = _manifest(tmp_path / "clash.jsonl", [{"uri": a, "n": "1"}, {"uri": b, "n": "1"}])
    refused = _config(tiny_models, clash, tmp_path / "refused", "input.id=column", "input.id_column=n")
    with pytest.raises(InputError, match=r"e\.g\. 1\)"):
        run(refused)
    assert not Path(refused.output.sensitive_uri, "_run.json").exists()  # stopped before any row ran
    assert not list(Path(refused.output.uri).rglob("*.parquet"))
