"""Ray job entrypoint: anonymize a dataset on the cluster this job was submitted to.

    ray job submit --working-dir . -- python jobs/anonymize.py --preset paper \
        --input s3://bucket/images --output s3://bucket/safe --sensitive-output s3://restricted/sensitive

It is `u2s run` (same options, `--resume`, `--force` and `--retry-errors` included; same validation: a
bad config exits with status 2 before Ray starts);
inside a Ray job the pipeline attaches to the job's cluster. `u2s submit` and the KubeRay RayJob call it.
"""

from __future__ import annotations

import sys

from u2s.cli import run_command


def main(argv: list[str] | None = None) -> int:
    """Run `u2s run` with ``argv`` (default: the command line); returns its exit status."""
    return run_command("run", argv, prog_name="jobs/anonymize.py")


if __name__ == "__main__":
    sys.exit(main())
