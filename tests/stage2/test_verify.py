"""Closed-loop verification of edits (``stage2.verify``), stage by stage on real rows: the real baseline
editors and dlib's face embeddings on the demo's astronaut photo, and call A re-run on the HTTP engine
against an oracle server whose verdicts the test decides."""

from __future__ import annotations

import io
import re
import threading

import numpy as np
import pytest

from u2s.config import ConfigError, Stage2Config, load_config
from u2s.demo_data import write_sample_dataset
from u2s.io.decode import load_rgb
from u2s.io.writers import safe_projection
from u2s.schema import SAFE_SCHEMA, SENSITIVE_SCHEMA, rows_to_table
from u2s.stage2.detectors import FaceDetector
from u2s.stage2.runner import EditStage
from u2s.stage2.verify import VerifyStage
from u2s.testing.chat_server import ChatRequest, OracleChatServer
from u2s.testing.images import noise_image
from u2s.testing.rows import decoded_rows, run_stage

#: A whole-image blur of half a pixel on the 256 px astronaut: every pixel changes, her face stays (what a
#: latent editor's VAE round trip does to an image it did not really edit).
SLIGHT = {"blur_radius": 0.002}


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("samples")
    return {s.path.relative_to(root).as_posix(): s.path.read_bytes() for s in write_sample_dataset(root)
            if s.expected == "image"}  # fmt: skip


@pytest.fixture(scope="module")
def stage1():
    return load_config(preset="cpu-tiny").stage1


def _flagged(images: list[bytes]) -> list[dict]:
    rows = decoded_rows(images, thumbnail_side=112)
    for row in rows:
        row.update(privacy_flag=True, categories=["people"], edit_instruction="change the person",
                   public_caption="a person", private_caption="PRIVATE")  # fmt: skip
    return rows


def _stage2(**verify) -> Stage2Config:
    return Stage2Config(editor="blur_image", blur_image=SLIGHT, verify=verify)


def _attempts(stage2: Stage2Config, stage1, rows: list[dict], side: int = 112) -> list[dict]:
    """Every attempt of the plan, in order: edit 1, verify 1, edit 2, verify 2, ..."""
    for attempt in range(1, stage2.verify.max_attempts + 1):
        rows = run_stage(EditStage(stage2, attempt=attempt), rows)
        rows = run_stage(VerifyStage(stage2, stage1, attempt, side), rows)
    return rows


# --- config ---------------------------------------------------------------------------------------------


def test_ladder_rungs_set_editor_settings_and_pool_and_the_last_rung_repeats():
    stage2 = Stage2Config(
        editor="blur_image", blur_image=SLIGHT,
        verify={"checks": ["faces"], "max_attempts": 4, "ladder": [
            {"settings": {"blur_image": {"blur_radius": 0.05}, "blur": {"padding": 0.3}}},
            {"editor": "blur", "settings": {"blur": {"regions": ["faces"]}}, "resources": {"num_cpus": 2}},
        ]},
    )  # fmt: skip
    first, second, third, fourth = (stage2.attempt(k) for k in (1, 2, 3, 4))
    assert first is stage2
    assert (second.editor, second.section().blur_radius) == ("blur_image", 0.05)
    assert (third.editor, third.section().regions, third.resources.num_cpus) == ("blur", ["faces"], 2)
    assert (fourth.editor, fourth.section().regions) == ("blur", ["faces"])
    assert stage2.section().blur_radius == 0.002  # the first attempt keeps its own settings
    assert not Stage2Config(editor="blur").verify.enabled and stage2.verify.enabled


@pytest.mark.parametrize(
    ("verify", "where"),
    [
        ("{checks: [faces], ladder: [{editor: sharpen}]}", "verify.ladder.0.editor"),
        ("{checks: [faces], ladder: [{settings: {blur_image: {blur_radius: -1}}}]}",
         "verify.ladder.0.settings.blur_image: blur_radius"),
        ("{checks: [faces], ladder: [{settings: {blur_image: {radius: 1}}}]}",
         "verify.ladder.0.settings.blur_image: no fields ['radius']"),
        ("{checks: [faces], ladder: [{settings: {blur: {padding: 0.1, size: 1}}}]}",
         "verify.ladder.0.settings.blur: no fields ['size']"),  # another editor's entry is checked too
        ("{checks: [faces], ladder: [{settings: {sharpen: {}}}]}",
         "verify.ladder.0.settings.sharpen: unknown"),
        ("{checks: [ocr]}", "stage2.verify.checks"),
        ("{checks: [reinspect], reinspect_ignore: [faces]}", "stage2.verify.reinspect_ignore"),
        ("{checks: [faces], max_attempts: 0}", "stage2.verify.max_attempts"),
    ],
)  # fmt: skip
def test_bad_verify_settings_fail_at_load_naming_the_field(verify, where):
    with pytest.raises(ConfigError, match=re.escape(where)):
        load_config(preset="cpu-tiny", overrides=["stage2.editor=blur_image", f"stage2.verify={verify}"])


def test_presets_verify_with_reinspect_in_paper_and_not_in_cpu_tiny():
    paper = load_config(preset="paper").stage2.verify
    assert paper.checks == ["reinspect"] and paper.max_attempts >= 2 and paper.ladder
    for editor in ("instruct_pix2pix", "flowedit_sd3", "flux_kontext"):  # the ladder fits every editor
        stage2 = load_config(preset="paper", overrides=[f"stage2.editor={editor}"]).stage2
        stronger, last = stage2.attempt(2), stage2.attempt(paper.max_attempts)
        assert stronger.editor == editor and stronger.section() != stage2.section()
        assert last.editor == "blur" and last.resources.num_gpus == 0
    assert not load_config(preset="cpu-tiny").stage2.verify.enabled


# --- faces ----------------------------------------------------------------------------------------------


def test_an_edit_that_keeps_the_face_is_edited_again_by_the_next_rung(samples, stage1):
    stage2 = _stage2(
        checks=["faces"],
        max_attempts=2,
        ladder=[{"editor": "blur", "settings": {"blur": {"regions": ["faces"]}}}],
    )
    astronaut, scene = samples["people/astronaut.jpg"], samples["scenes/coffee.jpg"]
    face, no_face = _attempts(stage2, stage1, _flagged([astronaut, scene]))

    assert (face["status"], face["verified"], face["verify_attempts"]) == ("edited", True, 2)
    first, second = face["verify"]
    assert (first["attempt"], first["editor"], first["failed"]) == (1, "blur_image", ["faces"])
    assert first["face_distance"] < 0.6  # the slight blur left her recognisable
    assert (second["attempt"], second["editor"], second["failed"]) == (2, "blur", [])
    assert first["seed"] != second["seed"]  # each attempt draws a new seed
    published = load_rgb(face["image"]["bytes"])
    assert published.size == load_rgb(astronaut).size and FaceDetector()(published) == []
    assert (face["editor"], face["seed"], face["candidate"]) == ("blur", second["seed"], None)
    assert face["timings"]["verify"] > 0 and face["timings"]["edit"] > 0

    # No face in the original: nothing to recognise, the first edit passes.
    assert (no_face["status"], no_face["verify_attempts"], no_face["verified"]) == ("edited", 1, True)
    assert no_face["verify"][0]["failed"] == [] and no_face["verify"][0]["face_distance"] is None


def test_a_row_no_attempt_makes_safe_is_an_error_row_that_publishes_nothing(samples, stage1):
    stage2 = _stage2(checks=["faces"], max_attempts=3)  # no ladder: the same editor, a new seed each time
    (row,) = _attempts(stage2, stage1, _flagged([samples["people/astronaut.jpg"]]))
    assert (row["status"], row["error"], row["verified"], row["verify_attempts"]) == (
        "error", "verify: still private", False, 3
    )  # fmt: skip
    assert [entry["failed"] for entry in row["verify"]] == [["faces"]] * 3
    assert row["editor"] is None and row["seed"] is None and row["candidate"] is None
    safe = safe_projection(rows_to_table([row]), SAFE_SCHEMA).to_pylist()[0]
    assert safe["image"] is None and safe["public_caption"] is None
    assert (safe["verify_attempts"], safe["verified"]) == (3, False) and "verify" not in safe
    sensitive = rows_to_table([row]).select(SENSITIVE_SCHEMA.names).cast(SENSITIVE_SCHEMA).to_pylist()[0]
    assert [entry["attempt"] for entry in sensitive["verify"]] == [1, 2, 3]


def test_an_unchanged_output_is_a_failed_attempt_the_ladder_retries(stage1):
    # The mask baseline finds no face in noise and, with on_nothing_found: error, returns it unchanged.
    stage2 = Stage2Config(editor="mask", mask={"regions": ["faces"], "on_nothing_found": "error"},
                          verify={"checks": ["faces"], "max_attempts": 2,
                                  "ladder": [{"editor": "blur_image"}]})  # fmt: skip
    image = noise_image(96, 64, seed=3)
    (row,) = _attempts(stage2, stage1, _flagged([_png(image)]))
    assert (row["status"], row["verify_attempts"]) == ("edited", 2)
    assert [(e["editor"], e["failed"]) for e in row["verify"]] == [
        ("mask", ["unchanged"]),
        ("blur_image", []),
    ]
    assert not np.array_equal(np.asarray(load_rgb(row["image"]["bytes"])), np.asarray(image))


def test_without_verify_the_editor_publishes_at_once_as_before(samples):
    stage2 = Stage2Config(editor="blur_image", blur_image=SLIGHT)
    (row,) = run_stage(EditStage(stage2), _flagged([samples["people/astronaut.jpg"]]))
    assert row["status"] == "edited" and row["candidate"] is None
    assert row["verify_attempts"] is None and row["verified"] is None and row["verify"] is None


def test_rows_outside_the_attempt_pass_through_untouched(samples, stage1):
    stage2 = _stage2(checks=["faces"], max_attempts=2)
    rows = _flagged([samples["people/astronaut.jpg"], samples["scenes/coffee.jpg"]])
    rows[1].update(privacy_flag=False, status="kept")
    edited = run_stage(EditStage(stage2), rows)
    assert edited[0]["candidate"] is not None and edited[0]["status"] is None
    assert edited[0]["image"] == rows[0]["image"]  # the original waits beside its candidate
    table = rows_to_table(edited)
    # Attempt 2's stages want nothing yet (attempt 1 is not verified): the batch comes back as it went.
    for stage in (EditStage(stage2, attempt=2), VerifyStage(stage2, stage1, 2, 112)):
        assert stage(table).equals(table)
    assert edited[1] == {**rows[1]}


# --- reinspect ------------------------------------------------------------------------------------------


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("answer", "ignore", "passes"),
    [
        ({"privacy_flag": False, "categories": []}, [], True),
        ({"privacy_flag": True, "categories": ["people"]}, [], False),
        ({"privacy_flag": True, "categories": ["personal_interactions"]}, ["personal_interactions"], True),
        ({"privacy_flag": True, "categories": ["people", "personal_interactions"]}, ["personal_interactions"],
         False),
        ({"privacy_flag": True, "categories": []}, ["personal_interactions"], False),  # names nothing: fails
    ],
)  # fmt: skip
def test_reinspect_runs_call_a_on_the_edit_and_fails_a_re_flag(answer, ignore, passes):
    seen: list[ChatRequest] = []
    lock = threading.Lock()

    def oracle(request: ChatRequest) -> dict:
        with lock:
            seen.append(request)
        return answer

    image = noise_image(120, 80, seed=7)
    with OracleChatServer(oracle) as url:
        cfg = load_config(preset="cpu-tiny", overrides=[
            "stage1.engine=http", f"stage1.http={{base_url: '{url}', api_key_env: null}}",
            "stage2.editor=blur_image",
            f"stage2.verify={{checks: [reinspect], max_attempts: 1, reinspect_ignore: {ignore}}}",
        ])  # fmt: skip
        rows = run_stage(EditStage(cfg.stage2), _flagged([_png(image)]))
        candidate = load_rgb(rows[0]["candidate"]["bytes"])
        (row,) = run_stage(VerifyStage(cfg.stage2, cfg.stage1, 1, 112), rows)
    (request,) = seen
    assert "privacy_flag" in request.fields and request.image is not None  # call A's schema, an image
    assert max(request.image.size) == 112  # the VLM's thumbnail
    # ... of the edit, not of the original: the whole-image blur flattened the noise.
    thumb = np.asarray(request.image, dtype=np.float64)
    assert thumb.std() < np.asarray(image, dtype=np.float64).std() / 2
    assert abs(thumb.mean() - np.asarray(candidate, dtype=np.float64).mean()) < 2
    entry = row["verify"][0]
    assert entry["categories"] == answer["categories"]
    if passes:
        assert (row["status"], row["verified"], entry["failed"]) == ("edited", True, [])
    else:
        assert (row["status"], row["error"], entry["failed"]) == (
            "error",
            "verify: still private",
            ["reinspect"],
        )
        assert row["image"] == rows[0]["image"]  # only the original, which the safe table drops
