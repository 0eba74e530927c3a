"""The benchmark: bare model forward throughput vs end-to-end job throughput, same images, same device, one run.

(a) bare: the model loaded once, every image already decoded into a tensor in memory on the device (in the model's
    channel space), one warm-up forward, then ``Upscaler.upscale_tensor`` timed over all images, one at a time.
(b) end-to-end: :func:`srbatch.upscale.run_job` on the same image files through Ray Data and object storage (a local S3
    server by default): read, decode, upscale, encode, upload, manifest.

Both figures are printed with their ratio (end-to-end / bare). Nothing is hard-coded: every number is measured.

    python jobs/benchmark.py                                   # edsr-baseline x4, 16 images 256x256, local S3 server
    python jobs/benchmark.py --model rrdbnet --images 32 --device cuda --dtype float16
    python jobs/benchmark.py --model path/to/model.safetensors --input 'photos/*.png' --storage local --json

Ray is started (or joined, with ``$RAY_ADDRESS``) before anything is timed, so cluster start-up is never counted;
the job's pipeline time does include Ray Data's start, the actors' start and their model load (the printout says so),
and a steady-state figure read from the manifest leaves those out.

``python jobs/benchmark.py`` and :func:`main` are the same program. Its parts: :mod:`srbatch.benchmark.prepare`
(images, storage, model), :mod:`srbatch.benchmark.measure` (the two measurements), :mod:`srbatch.benchmark.report`
(the printout) and :mod:`srbatch.benchmark.cli` (the command line).
"""

from srbatch.benchmark.prepare import BenchmarkError

__all__ = ["BenchmarkError", "main"]


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py") -> int:
    """Command-line entry of the benchmark (used by ``jobs/benchmark.py``); returns the exit code."""
    from srbatch.benchmark.cli import main as _main

    return _main(argv, prog=prog)
