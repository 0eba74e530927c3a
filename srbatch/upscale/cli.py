"""Command line of the upscale job: flags and YAML -> :class:`UpscaleConfig` -> :func:`run_job` -> exit code."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from srbatch.errors import SrbatchError
from srbatch.upscale.config import build_parser, config_from_args
from srbatch.upscale.runner import EXIT_CONFIG, EXIT_INTERRUPTED, run_job

DEFAULT_OUTPUT = "srbatch-output/upscale"


def default_argv() -> list[str]:
    """The embedded default: the bundled samples, the shipped default model x4, into ./srbatch-output/upscale."""
    from srbatch.local import sample_images_dir

    return [sample_images_dir(), "--output", str(Path.cwd() / DEFAULT_OUTPUT), "--model", "default", "--scale", "4"]


def main(argv: Sequence[str] | None = None, *, prog: str = "jobs/upscale.py") -> int:
    """Parse ``argv``, run the job, return its exit code (0 ok, 1 too many failures, 2 config error, 130 Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = default_argv()
        print(f"srbatch: no arguments: upscaling the bundled sample images x4 with the shipped default model into "
              f"{argv[2]} on a local Ray cluster", file=sys.stderr)  # fmt: skip
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(args)
        if args.verbose:
            logging.getLogger("srbatch.upscale").info("configuration: %s", json.dumps(cfg.redacted(), default=str))
        result = run_job(cfg)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SrbatchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return result.exit_code
