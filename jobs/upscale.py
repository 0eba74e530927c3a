"""Upscale a dataset. With no arguments: the bundled sample images, the bundled default model, written to
./srbatch-output/upscale (printed at the end).

Today this runs on this machine through the tiled engine (``srbatch upscale``); the distributed Ray version with
object storage, manifest and resume is the next step (see README, "Roadmap").
"""

from __future__ import annotations

import sys
from pathlib import Path

from srbatch.cli import main
from srbatch.local import sample_images_dir

DEFAULT_OUTPUT = str(Path.cwd() / "srbatch-output" / "upscale")


def run(argv: list[str]) -> int:
    """Run the job; with no arguments, the embedded default (bicubic x4 over the bundled samples)."""
    if not argv:
        print(f"srbatch: no arguments: upscaling the bundled samples in {sample_images_dir()} "
              f"with bicubic x4 into {DEFAULT_OUTPUT}")
        argv = [sample_images_dir(), "--output", DEFAULT_OUTPUT, "--model", "bicubic", "--scale", "4"]
    return main(["upscale", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
