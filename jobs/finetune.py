"""Ray job entrypoint: fine-tune an editor on the pairs of earlier runs, on the cluster this job was
submitted to.

    ray job submit --working-dir . -- python jobs/finetune.py --config finetune.yaml

It is `u2s finetune` (same options, `--resume` included; same validation: a bad config exits with status
2 before Ray starts); inside a Ray job, Ray Train attaches to the job's cluster and places one worker
per GPU (``num_workers``, ``use_gpu: true``). Checkpoints and the validation report go to the config's
``storage_path``.
"""

from __future__ import annotations

import sys

from u2s.cli import run_command


def main(argv: list[str] | None = None) -> int:
    """Run `u2s finetune` with ``argv`` (default: the command line); returns its exit status."""
    return run_command("finetune", argv, prog_name="jobs/finetune.py")


if __name__ == "__main__":
    sys.exit(main())
