"""Ray job entrypoint: anonymize a dataset on the cluster this job was submitted to.

    ray job submit --working-dir . -- python jobs/anonymize.py --preset paper \
        --input s3://bucket/images --output s3://bucket/safe --sensitive-output s3://restricted/triplets

Thin on purpose: parse arguments, load and validate the config, call `u2s.pipeline.run`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from u2s.cli import io_overrides
from u2s.config import PRESETS, ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, help="bundled preset")
    parser.add_argument("--config", help="YAML job config, merged over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable)")  # fmt: skip
    parser.add_argument("--input", help="input URI")
    parser.add_argument("--input-format", help="image_folder, class_folders, coco or parquet")
    parser.add_argument("--output", help="safe dataset URI")
    parser.add_argument("--sensitive-output", help="sensitive triplets URI")
    args = parser.parse_args(argv)
    if not args.preset and not args.config:
        parser.error("give --preset and/or --config")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = (
        io_overrides(args.input, args.input_format, args.output, args.sensitive_output) + args.overrides
    )
    try:
        cfg = load_config(preset=args.preset, path=args.config, overrides=overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from u2s.pipeline import format_summary, run

    print(format_summary(run(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
