"""Command line of the upscale job: flags and YAML -> :class:`UpscaleConfig` -> :func:`run_job` -> exit code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from srbatch.jobkit.cli import run_cli
from srbatch.upscale.config import build_parser, config_from_args

DEFAULT_OUTPUT = "srbatch-output/upscale"


def default_argv() -> tuple[list[str], str]:
    """The embedded default: the bundled samples, the shipped default model x4, into ./srbatch-output/upscale; and
    the notice that says so."""
    from srbatch.local import sample_images_dir

    out = str(Path.cwd() / DEFAULT_OUTPUT)
    argv = [sample_images_dir(), "--output", out, "--model", "default", "--scale", "4"]
    return argv, (f"srbatch: no arguments: upscaling the bundled sample images x4 with the shipped default model into "
                  f"{out} on a local Ray cluster")  # fmt: skip


def main(argv: Sequence[str] | None = None, *, prog: str = "jobs/upscale.py") -> int:
    """Parse ``argv``, run the job, return its exit code (0 ok, 1 too many failures, 2 config error, 130 Ctrl-C)."""
    from srbatch.upscale.runner import run_job

    return run_cli(argv, prog=prog, parser=build_parser, make_config=config_from_args,
                   run=lambda cfg: run_job(cfg).exit_code, logger="srbatch.upscale", default_argv=default_argv)  # fmt: skip
