"""``finetune`` on real Ray Train: 2 CPU workers on gloo, checkpoints on the S3 server, a worker killed
mid-training, the final checkpoint used by the editor through ``stage2.safe_attention.weights``."""

from __future__ import annotations

import os
import signal
import threading
import time

from finetune_helpers import finetune_config, tiny_editor

from u2s.testing.images import noise_image

MAX_STEPS = 4
CHECKPOINT_EVERY = 2


def _checkpoints(fs, path: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.glob(f"{path}/checkpoint_*/finetune.json"))


def _kill_a_worker_after_the_first_checkpoint(fs, path: str, done: threading.Event) -> list[int]:
    """SIGKILL one Ray Train worker process of this session's cluster (the GCS actor table: no dashboard
    needed) once Ray Train has registered a checkpoint; returns the killed pids."""
    import ray

    snapshot = f"{path}/checkpoint_manager_snapshot.json"  # Ray Train writes it once a checkpoint registers
    while not done.is_set():
        fs.invalidate_cache()
        if fs.exists(snapshot) and _checkpoints(fs, path):
            workers = [
                a for a in ray._private.state.actors().values()
                if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"]
            ]  # fmt: skip
            if workers:
                pid = int(workers[-1]["Pid"])
                os.kill(pid, signal.SIGKILL)
                return [pid]
        time.sleep(0.1)
    return []


def test_a_killed_worker_resumes_from_the_last_checkpoint_and_the_result_edits(
    ray_cluster, tiny_run, tiny_ip2p
):
    import torch

    from u2s.finetune.train_loop import STATE_NAME, read_meta
    from u2s.finetune.trainer import finetune
    from u2s.io.model_store import local_location
    from u2s.io.storage import filesystem
    from u2s.stage2.editors.base import EditPrompt

    cfg = finetune_config(
        tiny_run, tiny_ip2p, f"{tiny_run['bucket']}/checkpoints", name="kill", editor="safe_attention",
        method="full", num_workers=2, cpus_per_worker=0.5, max_steps=MAX_STEPS,
        checkpoint_every=CHECKPOINT_EVERY, validate_every=5, max_failures=2, num_to_keep=2,
        learning_rate=1e-3, validation={"edit": False},  # val loss only (test_validate.py edits)
    )  # fmt: skip
    fs, path = filesystem(cfg.experiment_uri, cfg.storage)
    done, outcome = threading.Event(), {}

    def train() -> None:
        try:
            outcome["result"] = finetune(cfg)
        finally:
            done.set()

    thread = threading.Thread(target=train)
    thread.start()
    killed = _kill_a_worker_after_the_first_checkpoint(fs, path, done)
    thread.join()
    result = outcome["result"]

    assert killed, "training ended before a worker could be killed"
    assert result.counts == {"rows": 12, "edited": 10, "missing_original": 0, "clip_filtered": 0,
                             "train": result.counts["train"], "val": 10 - result.counts["train"]}  # fmt: skip
    assert result.metrics["step"] == MAX_STEPS
    resumed = result.metrics["resumed_from_step"]  # the restarted workers' first step: a checkpoint's
    assert 0 < resumed < MAX_STEPS and resumed % CHECKPOINT_EVERY == 0
    assert "val_loss" not in result.metrics or result.metrics["val_loss"] > 0
    assert result.checkpoint and result.checkpoint.startswith("s3://")
    steps = [read_meta(local_location(f"s3://{p.rsplit('/', 1)[0]}", cfg.storage))["step"]
             for p in _checkpoints(fs, path)]  # fmt: skip
    assert max(steps) == MAX_STEPS and len(steps) <= cfg.num_to_keep

    final = local_location(result.checkpoint, cfg.storage)
    assert read_meta(final)["step"] == MAX_STEPS
    state = torch.load(f"{final}/{STATE_NAME}", weights_only=False)
    assert state["step"] == MAX_STEPS and state["optimizer"]["state"]

    # The next run's editor loads the checkpoint through the field users set, and edits differently.
    prompt = EditPrompt(edit_instruction="replace the face", public_caption="a photo")
    image = noise_image(64, 64, seed=11)
    untrained = tiny_editor(tiny_ip2p, "safe_attention").edit([image], [prompt], [1])[0]
    editor = tiny_editor(tiny_ip2p, "safe_attention", cfg.storage.endpoint_url, weights=result.checkpoint)
    assert editor.edit([image], [prompt], [1])[0].tobytes() != untrained.tobytes()

    # ... and the run record names those weights by the digest the model cache stages them by.
    from u2s.config import load_config
    from u2s.io.model_store import stage
    from u2s.run_record import weights_fingerprints

    job = load_config(preset="cpu-tiny", overrides=[
        "stage2.editor=safe_attention", f"stage2.safe_attention.weights={result.checkpoint}",
        f"storage.endpoint_url={cfg.storage.endpoint_url}",
    ])  # fmt: skip
    digest = stage(result.checkpoint, cfg.storage).digest
    assert weights_fingerprints(job) == {"stage2.safe_attention.weights": digest}
