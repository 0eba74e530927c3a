"""Command line of the comparison job: flags and YAML -> :class:`CompareConfig` -> :func:`run_compare` -> exit code."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from srbatch.compare.config import build_parser, config_from_args
from srbatch.errors import SrbatchError

EXIT_CONFIG, EXIT_INTERRUPTED = 2, 130


def main(argv: Sequence[str] | None = None, *, prog: str = "jobs/compare.py") -> int:
    """Parse ``argv``, compare, print the table; exit 0 all ok, 1 some image x model failed, 2 config, 130 Ctrl-C."""
    from srbatch.compare.runner import run_compare

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = config_from_args(args)
        if args.verbose:
            logging.getLogger("srbatch.compare").info("configuration: %s", json.dumps(cfg.redacted(), default=str))
        result = run_compare(cfg)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SrbatchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return result.exit_code
