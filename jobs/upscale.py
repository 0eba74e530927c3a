"""Upscale a whole image dataset on a Ray cluster (see ``--help``).

    ray job submit --working-dir . -- python jobs/upscale.py --input 's3://photos/raw/**/*.jpg' \\
        --output s3://photos/x4/ --model <name|uri> [--config job.yaml]
    python jobs/upscale.py        # no arguments: the bundled samples, the shipped default model x4, local Ray
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit --working-dir .`

from srbatch.upscale import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="jobs/upscale.py"))
