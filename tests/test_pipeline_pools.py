"""`stage_pools`: every pool a config runs, in plan order, with the config's own resources."""

from __future__ import annotations

import pytest

from u2s.config import load_config
from u2s.pipeline import stage_pools

#: The paper preset's pools from the editor on: stage2.verify checks each of 3 edit attempts.
EDIT = ["edit", "verify", "edit.2", "verify.2", "edit.3", "verify.3", "write"]


@pytest.mark.parametrize(
    ("overrides", "pools"),
    [
        ([], ["decode", "inspect+describe", "instruct", *EDIT]),
        (["stage1.mode=fused"], ["decode", "inspect", "instruct", *EDIT]),
        (["stage1.combine=true"], ["decode", "inspect+describe", "instruct+combine", *EDIT]),
        (["stage2.editor=flowedit_sd3"], ["decode", "inspect+describe", "instruct+combine", *EDIT]),
        (
            ["stage1.calls.describe.resources={num_gpus: 1}"],
            ["decode", "inspect", "describe", "instruct", *EDIT],
        ),
        (["stage2.verify.checks=[]"], ["decode", "inspect+describe", "instruct", "edit", "write"]),
        (["stage2.verify.max_attempts=1"],
         ["decode", "inspect+describe", "instruct", "edit", "verify", "write"]),
    ],
    ids=["paper", "fused", "combine", "flowedit-turns-combine-on", "describe-on-its-own", "no-verify",
         "verify-once"],
)  # fmt: skip
def test_pools_follow_the_mode(overrides, pools):
    assert list(stage_pools(load_config(preset="paper", overrides=overrides))) == pools


def test_verify_pools_take_the_vlms_resources_and_the_ladders_editor_pools():
    cfg = load_config(preset="paper")
    pools = stage_pools(cfg)
    assert pools["verify"] is pools["verify.3"] is cfg.stage1.calls.inspect.resources  # call A's pool
    assert pools["edit.2"] is cfg.stage2.resources and pools["edit.2"].num_gpus == 1
    assert pools["edit.3"] is cfg.stage2.verify.ladder[-1].resources and pools["edit.3"].num_gpus == 0  # blur


def test_pools_carry_the_configured_requests():
    cfg = load_config(
        preset="paper",
        overrides=[
            "stage1.calls.inspect.resources.accelerator_type=H100",
            "stage2.resources.num_gpus=2",
            "ray.write_num_cpus=0.5",
        ],
    )
    pools = stage_pools(cfg)
    vlm = pools["inspect+describe"]
    assert vlm.accelerator_type == "H100" and vlm.num_gpus == 1 and vlm is cfg.stage1.calls.inspect.resources
    assert pools["edit"].num_gpus == 2 and pools["edit"].pool_bounds() == (1, 8)
    assert pools["decode"].num_cpus == cfg.ray.decode.num_cpus
    assert pools["write"].num_cpus == 0.5 and pools["write"].num_gpus == 0
