"""End to end, ``stage2.verify``: a run on a real local Ray cluster whose stage 1 is the HTTP engine
against an oracle server (its verdicts decided by the test) and whose editor changes every pixel slightly
but hides nothing (a half-pixel whole-image blur, as a latent editor's VAE round trip does).

- a picture the oracle keeps is published as it came, and never inspected again;
- a picture the oracle re-flags once is edited again (the ladder's next rung) and passes on attempt 2;
- a picture the oracle re-flags every time becomes an error row, ``verify: still private``, no image;
- the astronaut's face survives the slight blur: the ``faces`` check fails it, the ladder's blur over
  faces hides it, and attempt 2 passes.

Every input id appears exactly once in each table, and what re-flagged is written only to the sensitive
table.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2s.config import load_config
from u2s.demo_data import write_sample_dataset
from u2s.io.writers import read_columns
from u2s.pipeline import run, stage_pools
from u2s.schema import SAFE_SCHEMA, SENSITIVE_SCHEMA
from u2s.stage2.detectors import FaceDetector
from u2s.testing.chat_server import ChatRequest, OracleChatServer, oracle_overrides

pytestmark = pytest.mark.slow

SIDE = 112
#: Base colours of the three noise pictures (the oracle tells pictures apart by their mean colour, which a
#: blur keeps).
COLOURS = {"kept": (200, 60, 60), "once": (60, 200, 60), "never": (60, 60, 200)}


def _noise(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-50, 51, (256, 256, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _mean(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))


@pytest.fixture(scope="module")
def verify_run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify") / "photos"
    root.mkdir()
    files = {}
    for seed, (name, colour) in enumerate(COLOURS.items()):
        files[name] = root / f"{name}.png"
        _noise(colour, seed).save(files[name])
    samples = tmp_path_factory.mktemp("samples")
    astronaut = next(s.path for s in write_sample_dataset(samples) if s.kind == "face")
    files["face"] = root / "face.jpg"
    files["face"].write_bytes(astronaut.read_bytes())
    means = {name: _mean(Image.open(path)) for name, path in files.items()}

    lock = threading.Lock()
    inspections: Counter[str] = Counter()

    def answer(request: ChatRequest) -> dict:
        if "privacy_flag" in request.fields:  # call A, on originals and (re-inspect) on edits
            mean = _mean(request.image)
            name = min(means, key=lambda n: float(np.abs(means[n] - mean).sum()))
            with lock:
                inspections[name] += 1
                seen = inspections[name]
            # 1st: the original; then one call per edit attempt.
            flag = {"kept": False, "once": seen <= 2, "never": True, "face": seen == 1}[name]
            return {"privacy_flag": flag, "categories": ["people"] if flag else []}
        if "review" in request.fields:  # call B
            review = [{"item": "a face", "reason": "identifies a person", "category": "people"}]
            return {"review": review, "private_caption": "A private caption.", "public_caption": "A picture."}
        return {"edit_instruction": "give the person short grey hair and a plain blue jacket"}  # call C

    out = tmp_path_factory.mktemp("verify-out")
    with OracleChatServer(answer) as url:
        cfg = load_config(
            preset="cpu-tiny",
            overrides=[
                f"input.uri={root}",
                f"output.uri={out}/safe",
                f"output.sensitive_uri={out}/sensitive",
                "output.compression=none",  # so the byte scan of the safe files means something
                *oracle_overrides(url),
                f"stage1.image_size={SIDE}",
                "stage2.editor=blur_image",
                "stage2.blur_image.blur_radius=0.002",  # half a pixel at 256 px: every pixel, no privacy
                "stage2.verify={checks: [reinspect, faces], max_attempts: 3, "
                "ladder: [{editor: blur, settings: {blur: {regions: [faces]}}}]}",
                # Eight actor pools on the session's 2 CPUs: small reservations leave room for the
                # one-CPU streaming split and the decode and write tasks.
                "stage1.calls.inspect.resources.num_cpus=0.1",
                "stage1.calls.instruct.resources.num_cpus=0.1",
                "stage2.resources.num_cpus=0.05",
                "stage2.verify.resources={pool_size: 1, batch_size: 4, num_cpus: 0.05}",
            ],
        )
        summary = run(cfg)
    safe = read_columns(cfg.output.uri, cfg.storage, SAFE_SCHEMA.names).to_pylist()
    sensitive = read_columns(cfg.output.sensitive_uri, cfg.storage, SENSITIVE_SCHEMA.names).to_pylist()
    by_name = {Path(row["source"]).stem: row for row in sensitive}
    safe_by_id = {row["id"]: row for row in safe}
    published = {name: safe_by_id[row["id"]] for name, row in by_name.items()}
    return {"cfg": cfg, "summary": summary, "files": files, "inspections": inspections, "safe": safe,
            "sensitive": by_name, "published": published}  # fmt: skip


def test_every_input_id_appears_exactly_once_in_each_table(verify_run):
    sensitive_ids = [row["id"] for row in verify_run["sensitive"].values()]
    safe_ids = [row["id"] for row in verify_run["safe"]]
    assert len(verify_run["sensitive"]) == len(verify_run["files"]) == 4
    assert len(safe_ids) == len(set(safe_ids)) == 4 and set(safe_ids) == set(sensitive_ids)
    assert verify_run["summary"].rows == 4


def test_each_row_ends_as_its_verdicts_decide(verify_run):
    safe, sensitive = verify_run["published"], verify_run["sensitive"]
    outcome = {name: (row["status"], row["verify_attempts"], row["verified"]) for name, row in safe.items()}
    assert outcome == {
        "kept": ("kept", None, None),
        "once": ("edited", 2, True),
        "never": ("error", 3, False),
        "face": ("edited", 2, True),
    }
    failed = {name: [entry["failed"] for entry in row["verify"] or []] for name, row in sensitive.items()}
    assert failed == {
        "kept": [],
        "once": [["reinspect"], []],
        "never": [["reinspect"]] * 3,
        "face": [["faces"], []],
    }
    assert [e["editor"] for e in sensitive["once"]["verify"]] == ["blur_image", "blur"]
    assert sensitive["never"]["verify"][0]["categories"] == ["people"]
    assert sensitive["face"]["verify"][0]["face_distance"] < 0.6


def test_a_row_never_made_safe_publishes_no_image(verify_run):
    never = verify_run["published"]["never"]
    assert never["error"] == "verify: still private"
    assert never["image"] is None and never["public_caption"] is None and never["editor"] is None


def test_published_edits_are_the_verified_attempts(verify_run):
    published = verify_run["published"]
    for name in ("once", "face"):
        row = published[name]
        assert row["editor"] == "blur" and row["seed"] == verify_run["sensitive"][name]["verify"][-1]["seed"]
        edited = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert edited.size == Image.open(verify_run["files"][name]).size == (row["width"], row["height"])
    assert FaceDetector()(Image.open(io.BytesIO(published["face"]["image"]["bytes"]))) == []
    kept = Image.open(io.BytesIO(published["kept"]["image"]["bytes"]))
    assert np.array_equal(
        np.asarray(kept.convert("RGB")), np.asarray(Image.open(verify_run["files"]["kept"]))
    )


def test_rows_that_passed_are_not_inspected_again(verify_run):
    # The original, then one re-inspection per edit attempt; nothing for a row once it has passed.
    assert verify_run["inspections"] == {"kept": 1, "once": 3, "never": 4, "face": 3}
    summary = verify_run["summary"]
    assert summary.stage_rows["verify"] == summary.stage_rows["edit"] == 3
    assert summary.errors_by_stage == {"verify": 1}


def test_what_re_flagged_lives_only_in_the_sensitive_table(verify_run):
    assert "verify" not in SAFE_SCHEMA.names and "verify" in SENSITIVE_SCHEMA.names
    safe_dir = Path(verify_run["cfg"].output.uri)
    for path in safe_dir.glob("*.parquet"):
        data = path.read_bytes()
        assert b"face_distance" not in data and b"reinspect" not in data


def test_the_plan_has_an_editor_and_a_check_per_attempt(verify_run):
    pools = list(stage_pools(verify_run["cfg"]))
    edit = pools.index("edit")
    assert pools[edit:] == ["edit", "verify", "edit.2", "verify.2", "edit.3", "verify.3", "write"]
