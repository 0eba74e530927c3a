"""Command line of the training job: flags, YAML and presets -> :class:`TrainConfig` -> :func:`run_training`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from srbatch.jobkit.cli import ExitCode, run_cli
from srbatch.train.config import build_parser, train_config_from_args


def main(argv: Sequence[str] | None = None, *, prog: str = "jobs/train.py") -> int:
    """Parse ``argv``, train, print the domain gain report; exit code 0 ok, 1 training failed, 2 config, 130 Ctrl-C."""
    from srbatch.train.runner import TrainingError, run_training

    def run(cfg: Any) -> int:
        print(run_training(cfg).report(), flush=True)
        return ExitCode.OK

    return run_cli(argv, prog=prog, parser=build_parser, make_config=train_config_from_args, run=run,
                   logger="srbatch.train", failed_errors=(TrainingError,),
                   interrupted_hint="; continue later with the same --name and --resume")  # fmt: skip
