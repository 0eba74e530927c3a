"""Train or fine-tune a super-resolution model for a domain on a Ray cluster (see ``--help``).

    ray job submit --working-dir . -- python jobs/train.py --preset dogs --data 's3://pets/hr/**/*.jpg' \\
        --model srresnet --scale 4 --init <name|uri> --output s3://models/dogs-x4/ [--config train.yaml]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit --working-dir .`

from srbatch.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="jobs/train.py"))
