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

from u2s.cli import app


def main(argv: list[str] | None = None) -> int:
    """Run `u2s finetune` with ``argv`` (default: the command line); returns its exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        app(["finetune", *args], prog_name="jobs/finetune.py")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
