"""Benchmark: bare model forward throughput vs end-to-end job throughput, same images, same device (see ``--help``).

    python jobs/benchmark.py                                   # edsr-baseline x4, 16 images 256x256, local S3 server
    python jobs/benchmark.py --model rrdbnet --images 32 --device cuda --dtype float16
    python jobs/benchmark.py --model path/to/model.safetensors --input 'photos/*.png' --storage local --json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit --working-dir .`

from srbatch.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="jobs/benchmark.py"))
