"""The distributed upscale job: configuration, planning, the Ray Data actor and the driver.

``python jobs/upscale.py``, ``srbatch upscale`` and :func:`run_job` are the same job.
"""

from srbatch.upscale.config import UpscaleConfig, build_parser, config_from_args, load_config
from srbatch.upscale.manifest import SCHEMA as MANIFEST_SCHEMA
from srbatch.upscale.manifest import read_manifest
from srbatch.upscale.runner import JobResult, run_job

__all__ = [
    "UpscaleConfig",
    "JobResult",
    "MANIFEST_SCHEMA",
    "build_parser",
    "config_from_args",
    "load_config",
    "read_manifest",
    "run_job",
    "main",
]


def main(argv: list[str] | None = None, *, prog: str = "jobs/upscale.py") -> int:
    """Command-line entry of the job (used by ``jobs/upscale.py`` and ``srbatch upscale``); returns the exit code."""
    from srbatch.upscale.cli import main as _main

    return _main(argv, prog=prog)
