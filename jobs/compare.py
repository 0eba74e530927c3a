"""Compare models on your own images, with pictures (see ``--help``).

    ray job submit --working-dir . -- python jobs/compare.py --images 's3://bucket/samples/*.png' \\
        --models bicubic,default,s3://models/dogs-x4/ --scale 4 [--mode reference|real] --output s3://bucket/report/
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit --working-dir .`

from srbatch.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="jobs/compare.py"))
