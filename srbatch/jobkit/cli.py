"""The jobs' command line, written once: flags and YAML -> validated config -> the job -> an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

from srbatch.errors import SrbatchError

__all__ = ["ExitCode", "run_cli"]


class ExitCode(IntEnum):
    """Exit codes of every job: 0 done, 1 the job ran but failed (too many failed images, a failed training),
    2 configuration error (nothing was done), 130 interrupted (Ctrl-C, SIGTERM)."""

    OK = 0
    FAILED = 1
    CONFIG = 2
    INTERRUPTED = 130


def run_cli(
    argv: Sequence[str] | None,
    *,
    prog: str,
    parser: Callable[[str], argparse.ArgumentParser],
    make_config: Callable[[argparse.Namespace], Any],
    run: Callable[[Any], int],
    logger: str,
    default_argv: Callable[[], tuple[list[str], str]] | None = None,
    failed_errors: tuple[type[BaseException], ...] = (),
    interrupted_hint: str = "",
) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``parser(prog)``, build the config with ``make_config``, and
    return ``run(config)``'s exit code; configuration errors print ``<prog>: error: ...`` and return 2.

    ``default_argv`` gives ``(argv, notice)`` for a bare command (the job's embedded default); ``failed_errors`` are
    the :class:`SrbatchError` types that mean the job ran and failed (exit 1) rather than a configuration error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and default_argv is not None:
        argv, notice = default_argv()
        print(notice, file=sys.stderr)
    args = parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = make_config(args)
        if args.verbose:
            logging.getLogger(logger).info("configuration: %s", json.dumps(cfg.redacted(), default=str))
        return int(run(cfg))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted{interrupted_hint}", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except failed_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return ExitCode.FAILED
    except SrbatchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return ExitCode.CONFIG
