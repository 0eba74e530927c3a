"""Command line of the comparison job: flags and YAML -> :class:`CompareConfig` -> :func:`run_compare` -> exit code."""

from __future__ import annotations

from collections.abc import Sequence

from srbatch.compare.config import build_parser, config_from_args
from srbatch.jobkit.cli import run_cli


def main(argv: Sequence[str] | None = None, *, prog: str = "jobs/compare.py") -> int:
    """Parse ``argv``, compare, print the table; exit 0 all ok, 1 some image x model failed, 2 config, 130 Ctrl-C."""
    from srbatch.compare.runner import run_compare

    return run_cli(argv, prog=prog, parser=build_parser, make_config=config_from_args,
                   run=lambda cfg: run_compare(cfg).exit_code, logger="srbatch.compare")  # fmt: skip
