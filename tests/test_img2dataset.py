"""Shards written by the real img2dataset (its own venv: it pins pandas<3, which the lock does not allow)
from a local HTTP server, some URLs failing with 404 or 500: every URL reaches u2s exactly once, the
downloaded ones with their bytes, the failed ones as error rows whose reason names no URL or caption."""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from u2s.config import InputConfig, Resources, StorageConfig
from u2s.io.ids import IdKey
from u2s.io.img2dataset import download_error
from u2s.io.readers import read_source

REPO = Path(__file__).resolve().parents[1]
#: img2dataset and its pins, installed once into a venv of its own (reused across runs).
IMG2DATASET = "img2dataset==1.47.0"
TOOL_VENV = REPO / ".cache" / "img2dataset-venv"
RESOURCES = Resources(batch_size=3, num_cpus=0.5)
LOCAL = StorageConfig()
GOOD = 5
CAPTION = "jane doe at 12 elm street, photo {}"  # private text: never in an error reason


@pytest.fixture(scope="session")
def img2dataset_bin() -> Path:
    """The ``img2dataset`` command from :data:`TOOL_VENV`, built with uv on first use."""
    marker = TOOL_VENV / "u2s-installed.txt"
    if not marker.exists() or marker.read_text() != IMG2DATASET:
        uv = Path(sys.executable).parent / "uv"
        subprocess.run([uv, "venv", "-q", "--clear", "-p", sys.executable, TOOL_VENV], check=True)
        subprocess.run([uv, "pip", "install", "-q", "--python", TOOL_VENV / "bin" / "python", IMG2DATASET],
                       check=True)  # fmt: skip
        marker.write_text(IMG2DATASET)
    return TOOL_VENV / "bin" / "img2dataset"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files from a folder; anything under /fail/ answers 500."""

    def do_GET(self) -> None:
        if self.path.startswith("/fail/"):
            self.send_error(500)
        else:
            super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> dict[str, bytes | int]:
    """URL → served JPEG bytes, or the HTTP status it fails with; served on 127.0.0.1 for the module."""
    root = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    out: dict[str, bytes | int] = {}
    for i in range(GOOD):
        buf = io.BytesIO()
        Image.new("RGB", (24, 16), (40 * i, 255 - 40 * i, 7)).save(buf, "JPEG")
        (root / f"img{i}.jpg").write_bytes(buf.getvalue())
        out[f"{base}/img{i}.jpg"] = buf.getvalue()
    out[f"{base}/private/jane_doe.jpg"] = 404
    out[f"{base}/fail/john_roe.jpg"] = 500
    yield out
    server.shutdown()


def _download(exe: Path, urls: dict, folder: Path, output_format: str) -> tuple[subprocess.Popen, Path]:
    """Start img2dataset on ``urls`` (from ``folder``: a ``ray/`` folder in the cwd would shadow Ray)."""
    folder.mkdir(parents=True, exist_ok=True)
    url_list = folder / "urls.tsv"
    url_list.write_text("url\tcaption\n" + "".join(f"{u}\t{CAPTION.format(i)}\n" for i, u in enumerate(urls)))
    out = folder / "out"
    process = subprocess.Popen(
        [exe, "--url_list", url_list, "--input_format", "tsv", "--url_col", "url", "--caption_col", "caption",
         "--output_folder", out, "--output_format", output_format, "--processes_count", "1",
         "--thread_count", "4", "--resize_mode", "no", "--disable_all_reencoding", "True",
         "--number_sample_per_shard", "4", "--retries", "0", "--timeout", "10",
         "--distributor", "multiprocessing", "--enable_wandb", "False"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
    )  # fmt: skip
    return process, out


@pytest.fixture(scope="module")
def shards(img2dataset_bin, urls, tmp_path_factory) -> dict[str, Path]:
    """img2dataset's webdataset and parquet outputs of the same URLs (both runs at once)."""
    root = tmp_path_factory.mktemp("img2dataset")
    runs = {fmt: _download(img2dataset_bin, urls, root / fmt, fmt) for fmt in ("webdataset", "parquet")}
    for fmt, (process, _) in runs.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"img2dataset ({fmt}) failed: {stderr[-2000:]}"
    return {fmt: out for fmt, (_, out) in runs.items()}


def _url_of_key(folder: Path) -> dict[str, str]:
    """img2dataset's own record of which key is which URL (its per-shard Parquet tables)."""
    return {
        row["key"]: row["url"]
        for path in sorted(folder.glob("*.parquet"))
        for row in pq.read_table(path, columns=["key", "url"]).to_pylist()
    }


def _check_every_url_once(rows: list[dict], keys: dict[str, str], urls: dict) -> None:
    assert sorted(r["id"] for r in rows) == sorted(keys)  # each key (= URL) once, no other row
    assert sorted(keys.values()) == sorted(urls)
    for row in rows:
        served = urls[keys[row["id"]]]
        if isinstance(served, bytes):
            assert row["status"] is None and row["image"]["bytes"] == served, row["id"]
        else:
            assert row["status"] == "error" and row["image"]["bytes"] is None
            assert row["error"] == f"read: download failed (HTTP {served})"
        assert "127.0.0.1" not in (row["error"] or "") and "doe" not in (row["error"] or "")


def test_img2dataset_webdataset_output_every_url_once(shards, urls, ray_cluster) -> None:
    folder = shards["webdataset"]
    assert len(list(folder.glob("*.tar"))) == 2
    cfg = InputConfig(uri=str(folder), format="webdataset", id="column", label_member="txt")
    rows = read_source(cfg, LOCAL, RESOURCES).take_all()
    keys = _url_of_key(folder)
    _check_every_url_once(rows, keys, urls)
    captions = {u: CAPTION.format(i) for i, u in enumerate(urls)}
    for row in rows:
        shard = row["source"].rpartition("#")[0]
        assert Path(shard).parent == folder and shard.endswith(".tar")
        assert row["label"] == (captions[keys[row["id"]]] if row["status"] is None else None)

    # Keyed ids (the default) over the same shards: the same rows, ids that are not the keys.
    keyed = read_source(InputConfig(uri=str(folder), format="webdataset"), LOCAL, RESOURCES, IdKey.generate())
    keyed_rows = keyed.take_all()
    assert sorted(r["source"] for r in keyed_rows) == sorted(r["source"] for r in rows)
    assert not {r["id"] for r in keyed_rows} & set(keys)


def test_a_cut_img2dataset_shard_still_gives_every_url_once(shards, urls, tmp_path, ray_cluster) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(shards["webdataset"], folder)
    shard = sorted(folder.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        last_image = max(m.offset_data for m in tar.getmembers() if m.name.endswith(".jpg"))
    # A partial upload, cut inside the last image: the sidecar still lists every URL.
    shard.write_bytes(shard.read_bytes()[: last_image + 10])
    rows = read_source(
        InputConfig(uri=str(folder), format="webdataset", id="column"), LOCAL, RESOURCES
    ).take_all()
    keys = _url_of_key(folder)
    assert sorted(r["id"] for r in rows) == sorted(keys)
    by_id = {r["id"]: r for r in rows}
    cut = [k for k in _keys_in(shard) if by_id[k]["error"] == "read: ReadError"]
    assert cut and all(by_id[k]["image"]["bytes"] is None for k in cut)
    for key, row in by_id.items():
        served = urls[keys[key]]
        if key in cut:
            assert isinstance(served, bytes)  # downloaded, lost with the shard's tail
        elif isinstance(served, bytes):
            assert row["status"] is None and row["image"]["bytes"] == served
        else:
            assert row["error"] == f"read: download failed (HTTP {served})"


def test_img2dataset_parquet_output_every_url_once(shards, urls, ray_cluster) -> None:
    folder = shards["parquet"]
    cfg = InputConfig(uri=str(folder), format="parquet", id_column="key")  # image column: found (jpg)
    rows = read_source(cfg, LOCAL, RESOURCES).take_all()
    _check_every_url_once(rows, _url_of_key(folder), urls)


def test_download_errors_keep_only_fixed_phrases_and_status_codes() -> None:
    assert download_error("success", None) is None
    assert download_error("failed_to_download", "HTTP Error 403: Forbidden") == "download failed (HTTP 403)"
    assert download_error("failed_to_download", "<urlopen error [Errno -2] Name or service not known: "
                          "jane-doe.example>") == "download failed"  # fmt: skip
    assert (
        download_error("failed_to_resize", "image /x/jane.jpg too small") == "image rejected by img2dataset"
    )


@pytest.mark.slow
def test_a_run_on_img2dataset_shards_publishes_every_url_once(
    shards, urls, tiny_models, tmp_path, ray_cluster
):
    from u2s.config import load_config
    from u2s.io.writers import read_columns
    from u2s.pipeline import run

    folder = shards["webdataset"]
    cfg = load_config(
        preset="cpu-tiny",
        overrides=[
            f"input.uri={folder}", "input.format=webdataset", "input.id=column",
            f"output.uri={tmp_path}/safe", f"output.sensitive_uri={tmp_path}/sensitive",
            f"stage1.vlm.model={tiny_models['vlm']}", f"stage1.llm.model={tiny_models['llm']}",
            "stage1.calls.inspect.generation.max_new_tokens=16",
            "stage1.calls.describe.generation.max_new_tokens=8", "stage2.editor=blur_image",
        ],
    )  # fmt: skip
    run(cfg)
    keys = _url_of_key(folder)
    safe = read_columns(cfg.output.uri, LOCAL, ["id", "status", "error"]).to_pylist()
    sensitive = read_columns(cfg.output.sensitive_uri, LOCAL, ["id", "source", "status"]).to_pylist()
    for table in (safe, sensitive):
        assert sorted(r["id"] for r in table) == sorted(keys)
    for row in safe:
        served = urls[keys[row["id"]]]
        if isinstance(served, int):
            assert row["status"] == "error" and row["error"] == f"read: download failed (HTTP {served})"
        else:  # read and decoded; the tiny random models may fail it later (stage 1's own errors)
            assert row["status"] != "error" or not row["error"].startswith(("read:", "decode:")), row["error"]
    shard_of_key = {k: str(shard) for shard in folder.glob("*.tar") for k in _keys_in(shard)}
    assert sorted(r["source"] for r in sensitive) == sorted(f"{shard_of_key[k]}#{k}" for k in keys)


def _keys_in(shard: Path) -> set[str]:
    """The keys of a shard, from its img2dataset sidecar."""
    return set(pq.read_table(shard.with_suffix(".parquet"), columns=["key"]).column("key").to_pylist())
