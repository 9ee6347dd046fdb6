"""Nothing private reaches the safe table: a run over files that carry GPS positions, capture times,
camera serials, names in EXIF/XMP/IPTC/PNG text/WebP/GIF comments, and names in their file and folder
names (the person's folder is a class folder: its label is withheld with `output.publish: []`) publishes
none of it, in any byte of the safe folder (its Parquet files, written uncompressed so
the scan is meaningful, and its public run record) or of Ray's logs; the sensitive table keeps what it
should.

Stage 1 runs on the HTTP engine against an oracle server (a real OpenAI-compatible server whose answers
the test decides), so the outcomes are certain by construction: the face photo, the receipt and the plain
texture are flagged (the texture is the flagged image in which the blur baseline finds nothing), the
other pictures are kept.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2s.config import DecodeConfig, HttpEngineConfig, ModelConfig, Stage1Config, load_config
from u2s.io.decode import load_rgb
from u2s.io.decode_stage import DecodeStage
from u2s.io.writers import read_columns
from u2s.pipeline import run
from u2s.schema import SENSITIVE_SCHEMA, new_row, safe_schema
from u2s.stage1.inspect import InspectStage
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides
from u2s.testing.leak_corpus import PERSON_FILE, PERSON_FOLDER, build_leak_corpus, encode, photo
from u2s.testing.rows import decoded_rows, run_stage

pytestmark = pytest.mark.slow

IMAGE_SIZE = 112
PRIVATE_CAPTION = "Quentin Ashdown-Velarde signs papers at his kitchen table."
EXIF_ORIENTATION = 0x0112


def _signature(img: Image.Image) -> np.ndarray:
    """A 4x4 grid of mean colours: tells the corpus's pictures apart at any thumbnail size."""
    return np.asarray(img.convert("RGB").resize((4, 4), Image.Resampling.BOX), dtype=np.float64)


@pytest.fixture(scope="module")
def leak_run(ray_cluster, tmp_path_factory):
    corpus = build_leak_corpus(tmp_path_factory.mktemp("leaks") / "photos")
    flagged = {corpus.person_named, corpus.texture, *(f for f in corpus.files if f.name == "receipt.png")}
    # What the VLM will see of each file (decode's thumbnail), to recognise it at the oracle.
    thumbs = decoded_rows([f.read_bytes() for f in corpus.files], thumbnail_side=IMAGE_SIZE)
    known = [
        (_signature(Image.open(io.BytesIO(row["thumbnail"]))), path)
        for row, path in zip(thumbs, corpus.files, strict=True)
    ]

    def answer(request: ChatRequest) -> dict:
        if "privacy_flag" in request.fields:  # call A: flag exactly the chosen files
            signature = _signature(request.image)
            _, file = min(known, key=lambda k: float(np.abs(k[0] - signature).sum()))
            flag = file in flagged
            return {"privacy_flag": flag, "categories": ["people"] if flag else []}
        if "review" in request.fields:  # call B
            review = [{"item": "a face", "reason": "identifies a person", "category": "people"}]
            return {
                "review": review,
                "private_caption": PRIVATE_CAPTION,
                "public_caption": "A person indoors.",
            }
        return {"edit_instruction": "give the person short grey hair and a plain blue jacket"}  # call C

    out = tmp_path_factory.mktemp("leak-out")
    with OracleChatServer(answer) as url:
        cfg = load_config(
            preset="cpu-tiny",
            overrides=[
                f"input.uri={corpus.root}",
                "input.format=class_folders",  # labels = folder names, the person's name among them
                "output.publish=[]",  # ...withheld
                f"output.uri={out}/safe",
                f"output.sensitive_uri={out}/sensitive",
                "output.compression=none",
                *oracle_overrides(url),
                f"stage1.image_size={IMAGE_SIZE}",
                "stage2.editor=blur",
            ],
        )
        summary = run(cfg)
    safe = read_columns(cfg.output.uri, cfg.storage, safe_schema(cfg.output.publish).names).to_pylist()
    sensitive = read_columns(cfg.output.sensitive_uri, cfg.storage, SENSITIVE_SCHEMA.names).to_pylist()
    return {"corpus": corpus, "cfg": cfg, "summary": summary, "safe": safe, "sensitive": sensitive,
            "flagged": flagged}  # fmt: skip


def test_every_file_is_published_or_edited_as_the_oracle_decided(leak_run):
    corpus, sensitive = leak_run["corpus"], {r["source"]: r for r in leak_run["sensitive"]}
    assert len(leak_run["safe"]) == len(sensitive) == len(corpus.files)
    for path in corpus.files:
        row = sensitive[str(path)]
        assert row["status"] == ("edited" if path in leak_run["flagged"] else "kept"), path.name
    # The texture, in which the blur baseline finds no face and no text, was blurred whole, not published
    # unchanged as "edited".
    by_id = {r["id"]: r for r in leak_run["safe"]}
    texture = by_id[sensitive[str(corpus.texture)]["id"]]
    original = np.asarray(Image.open(corpus.texture).convert("RGB"))
    edited = np.asarray(Image.open(io.BytesIO(texture["image"]["bytes"])).convert("RGB"))
    assert edited.shape == original.shape and not np.array_equal(edited, original)
    assert leak_run["summary"].metadata_removed >= 5  # every file but the bare texture carried metadata
    assert leak_run["summary"].multi_frame == len(corpus.multi_frame) == 5
    assert sum(row["frames"] > 1 for row in leak_run["sensitive"]) == 5


def test_no_secret_in_any_byte_of_the_safe_folder(leak_run):
    safe_dir = Path(leak_run["cfg"].output.uri)
    files = sorted(p for p in safe_dir.iterdir() if p.is_file())
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "_run.json" for p in files)
    for path in files:
        leaked = leak_run["corpus"].leaks(path.read_bytes())
        assert leaked == [], f"{path.name} leaks {leaked}"
        assert (
            PERSON_FILE.encode() not in path.read_bytes() and PERSON_FOLDER.encode() not in path.read_bytes()
        )


def test_published_images_carry_no_metadata_but_their_orientation(leak_run):
    for row in leak_run["safe"]:
        if row["image"] is None:
            continue
        with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
            assert set(img.getexif()) <= {EXIF_ORIENTATION}  # an EXIF block, if any, holds only that
            text_keys = {"xmp", "XML:com.adobe.xmp", "comment", "Comment", "Author", "Description"}
            assert not text_keys & set(img.info), img.info.keys()
        assert leak_run["corpus"].leaks(row["image"]["bytes"]) == []


def test_the_sensitive_table_keeps_the_source_and_the_captions(leak_run):
    sensitive = {r["source"]: r for r in leak_run["sensitive"]}
    person = sensitive[str(leak_run["corpus"].person_named)]
    assert PERSON_FOLDER in person["source"] and person["source"].endswith(PERSON_FILE)
    assert person["label"] == PERSON_FOLDER and "label" not in leak_run["safe"][0]  # withheld
    assert person["private_caption"] == PRIVATE_CAPTION and person["categories"] == ["people"]
    assert all(PRIVATE_CAPTION not in str(value) for row in leak_run["safe"] for value in row.values())


def test_no_secret_in_rays_logs(leak_run):
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_logs_dir_path())
    for log in logs.rglob("*"):
        if log.is_file() and log.suffix in (".out", ".err", ".log"):
            content = log.read_bytes()
            assert leak_run["corpus"].leaks(content) == [], log.name
            assert PRIVATE_CAPTION.encode() not in content and PERSON_FILE.encode() not in content, log.name


def _published(leak_run, path: Path) -> bytes:
    sensitive = {r["source"]: r for r in leak_run["sensitive"]}
    row = {r["id"]: r for r in leak_run["safe"]}[sensitive[str(path)]["id"]]
    assert row["status"] == "kept", path.name
    return row["image"]["bytes"]


def test_multi_frame_files_publish_only_the_frame_the_vlm_inspected(leak_run):
    corpus = leak_run["corpus"]
    for path in corpus.multi_frame:
        original = Image.open(path)
        assert original.n_frames > 1
        published = Image.open(io.BytesIO(_published(leak_run, path)))
        assert getattr(published, "n_frames", 1) == 1 and not getattr(published, "is_animated", False)
        # frame 0, the one decode thumbnailed for the VLM (an APNG's default image, not its animation)
        np.testing.assert_array_equal(
            np.asarray(published.convert("RGB")), np.asarray(load_rgb(path.read_bytes()))
        )


def test_colour_under_alpha_zero_is_not_published(leak_run):
    path = leak_run["corpus"].alpha_hidden
    original = np.asarray(Image.open(path).convert("RGBA"))
    hidden = original[..., 3] == 0
    assert hidden.any() and original[..., :3][hidden].any()  # the corpus file does hide a page of text
    published = Image.open(io.BytesIO(_published(leak_run, path)))
    shown = np.asarray(published.convert("RGB"))  # what a training loader sees
    assert not shown[hidden].any()
    np.testing.assert_array_equal(np.asarray(published.convert("RGBA"))[~hidden], original[~hidden])


def test_with_all_frames_inspected_a_face_in_a_later_frame_flags_the_row():
    """decode.frames: all: one inspect request per frame over the HTTP engine; the oracle flags only the
    face, which is frame 2 of an APNG whose default image (frame 0) and frame 1 are harmless."""
    side = 64
    face = photo("astronaut").resize((96, 96))
    harmless = [photo(name).convert("RGB").resize((96, 96)) for name in ("rocket", "brick")]
    apng = encode(harmless[0], "PNG", save_all=True, default_image=True, append_images=[harmless[1], face])
    still = encode(harmless[1], "PNG")
    face_signature = _signature(face)
    seen = []

    def answer(request: ChatRequest) -> dict:
        is_face = float(np.abs(_signature(request.image) - face_signature).mean()) < 8
        seen.append(is_face)
        return {"privacy_flag": is_face, "categories": ["people"] if is_face else []}

    rows = [new_row("anim", "mem://anim.png", None, apng), new_row("still", "mem://still.png", None, still)]
    rows = run_stage(DecodeStage(DecodeConfig(frames="all"), thumbnail_side=side), rows)
    with OracleChatServer(answer) as url:
        stage1 = Stage1Config(
            engine="http", http=HttpEngineConfig(base_url=url, api_key_env=None, backoff_s=0.01),
            vlm=ModelConfig(model="oracle-vlm"), llm=ModelConfig(model="oracle-llm"), image_size=side,
        )  # fmt: skip
        stage = InspectStage(stage1)
        anim, plain = run_stage(stage, rows)
        stage.engine.close()
    assert len(seen) == 4 and sum(seen) == 1  # three frames and the still image, each asked once
    assert anim["privacy_flag"] is True and anim["status"] is None and anim["flagged_frame"] == 2
    assert anim["categories"] == ["people"]
    assert plain["privacy_flag"] is False and plain["status"] == "kept" and plain["flagged_frame"] is None
