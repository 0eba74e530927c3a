"""Command line of the training job: flags, YAML and presets -> :class:`TrainConfig` -> :func:`run_training`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from srbatch.errors import ConfigError, SrbatchError
from srbatch.train.config import build_parser, train_config_from_args

EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130


def main(argv: Sequence[str] | None = None, *, prog: str = "jobs/train.py") -> int:
    """Parse ``argv``, train, print the domain gain report; exit code 0 ok, 1 training failed, 2 config, 130 Ctrl-C."""
    from srbatch.train.runner import TrainingError, run_training

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = train_config_from_args(args)
        if args.verbose:
            logging.getLogger("srbatch.train").info("configuration: %s", json.dumps(cfg.redacted(), default=str))
        result = run_training(cfg)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; continue later with the same --name and --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (ConfigError, SrbatchError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(result.report(), flush=True)
    return 0
