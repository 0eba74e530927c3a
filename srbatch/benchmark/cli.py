"""The benchmark's command line (``python jobs/benchmark.py``): parse, prepare, measure, print; exit codes 0/1/2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys

from srbatch.benchmark.measure import bare_forward, end_to_end
from srbatch.benchmark.prepare import (
    BenchmarkError,
    Storage,
    copy_remote_checkpoint,
    prepare_model,
    synthetic_inputs,
    user_inputs,
)
from srbatch.benchmark.report import machine_info, render

__all__ = ["build_parser", "main", "SUBCOMMANDS"]

SUBCOMMANDS = {
    "planning": "srbatch.benchmark.planning",  # the driver's planning for N inputs x R past runs
    "handoff": "srbatch.benchmark.handoff",  # the driver's hand-off of N tasks to Ray Data
    "tiny": "srbatch.benchmark.tiny",  # tiny images: the job against a plain loop (per-image overhead)
    "listing": "srbatch.benchmark.listing",  # listing 100k objects on a local S3 server and a local folder
    "large": "srbatch.benchmark.large",  # peak memory of one 24 MP photo or one gigapixel TIFF
    "bicubic": "srbatch.benchmark.bicubic",  # the fast MATLAB bicubic against Pillow, and its accuracy
    "ceiling": "srbatch.benchmark.ceiling",  # the job with a near-free model against raw decode+encode on all cores
    "gpu": "srbatch.benchmark.gpu",  # model-only and end-to-end images/s, TFLOP/s and utilisation on a GPU
}
"""Benchmarks with their own flags: ``jobs/benchmark.py NAME --help``."""


def build_parser(prog: str = "jobs/benchmark.py") -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure, in one run on the same images and device, (a) the bare model forward throughput "
        "(images/s; model loaded, tensors already in memory on the device) and (b) the end-to-end throughput of the "
        "upscale job through Ray Data and object storage, and print both with their ratio (goal: >= 0.9 for a "
        "compute-bound model such as EDSR or RRDBNet at x4 on 256x256 inputs).",
        epilog="Models that need weights (edsr-baseline, rrdbnet, ...) are built with random weights (torch seed 0) "
        "and saved as a .safetensors file in the benchmark's storage, so the job's actors load them by URI; speed does "
        "not depend on the weights' values. Other benchmarks, each with its own flags: "
        f"{', '.join(SUBCOMMANDS)} (`{prog} NAME --help`). Exit codes: 0 done, 1 an image failed in the job, 2 bad "
        "arguments or setup.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", "-m", default="edsr-baseline",
                   help="architecture or variant name (see `srbatch models`; random weights), a weight-free model "
                   "(bicubic), or a checkpoint path/URI")  # fmt: skip
    p.add_argument("--scale", type=int, default=4, help="upscaling factor")
    p.add_argument("--images", "-n", type=int, default=16, help="number of images")
    p.add_argument("--size", type=int, default=256, help="side in pixels of the synthetic square inputs")
    p.add_argument("--input", "-i", default=None,
                   help="your own images instead (folder, glob or URI); the first --images of them are read once and "
                   "copied into the benchmark's storage, at their own size (--size is ignored). Default: RGB crops of "
                   "the bundled sample images, resized to --size x --size, as PNG")  # fmt: skip
    p.add_argument("--storage", choices=["s3", "local"], default="s3",
                   help="s3: a moto S3 server started on 127.0.0.1 for the run (needs `pip install 'moto[server]'`); "
                   "local: a temporary folder")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device of both measurements")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="compute dtype (float16 falls back to float32 on CPU, as in the job)")  # fmt: skip
    p.add_argument("--tile", type=int, default=0,
                   help="tile size in input pixels for both measurements; 0: whole image")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="images handed to a job actor per call")
    p.add_argument("--actors", type=int, default=None, help="job actors [the job's default: one per GPU, or 1 on CPU]")
    p.add_argument("--json", action="store_true",
                   help="also print the results as one JSON object (the last line of stdout)")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="log the job's decisions (INFO level)")
    return p


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("scale", "images", "size", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(a, name)}")
    if a.tile < 0:
        p.error(f"--tile must be 0 (whole image) or a positive size; got {a.tile}")
    if a.actors is not None and a.actors < 1:
        p.error(f"--actors must be at least 1; got {a.actors}")


def _start_ray(store: Storage) -> bool:
    """Start a local Ray cluster (or join ``$RAY_ADDRESS``) before anything is timed. True when this started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": dict(store.env)} if store.env else None)
        return False  # joined, not started: the cluster is someone else's
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    ray.get(ray.remote(num_cpus=0)(_ping).remote())  # a worker is up: the start-up burst is over before timing
    return True


def _ping() -> int:
    return 0


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py") -> int:
    """Run the benchmark as ``python jobs/benchmark.py`` does; returns the exit code (0 done, 1 an image failed in
    the job, 2 bad arguments or setup)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:  # `jobs/benchmark.py planning ...`: another benchmark, its own flags
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:], prog=f"{prog} {argv[0]}")
    from srbatch.jobkit.cluster import ray_env_defaults

    ray_env_defaults()  # before Ray is imported: a new single-machine cluster binds every port to 127.0.0.1
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    out = sys.stdout

    from srbatch.errors import SrbatchError

    try:
        # Everything read from the user's own storage is read first, before the S3 server's variables are set.
        inputs = user_inputs(args.input, args.images) if args.input else synthetic_inputs(args.images, args.size)
        remote_ckpt = copy_remote_checkpoint(args.model)
        store = Storage(args.storage)
    except (SrbatchError, BenchmarkError) as e:
        print(f"benchmark: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    started_ray = False
    try:
        from srbatch.io.storage import write_bytes

        for name, data in inputs.files:
            write_bytes(store.uri("in", name), data, store.options)
        model = args.model
        if remote_ckpt is not None:
            model = store.uri("models", posixpath.basename(args.model.rstrip("/")))
            write_bytes(model, remote_ckpt, store.options)
            note = f"checkpoint {args.model} (copied into the benchmark's storage)"
        else:
            model, note = prepare_model(args.model, args.scale, store)
            note = f"checkpoint {args.model}" if note == "checkpoint" else note
        if not inputs.sizes:
            from srbatch.io.images import decode_image

            inputs.sizes = [(im.width, im.height) for im in (decode_image(d, name=n) for n, d in inputs.files)]
        machine = machine_info("cpu" if args.device == "cpu" else ("cuda" if _cuda(args.device) else "cpu"))
        started_ray = _start_ray(store)

        print(f"benchmark: (a) bare forward on {len(inputs.files)} images ...", file=sys.stderr, flush=True)
        bare = bare_forward(model, args.scale, inputs.files, args, store.options)
        print("benchmark: (b) end-to-end job ...", file=sys.stderr, flush=True)
        e2e = end_to_end(model, store, len(inputs.files), args)
    except SrbatchError as e:
        print(f"benchmark: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        store.close()

    sizes = sorted(set(inputs.sizes))
    size_txt = f"{sizes[0][0]}x{sizes[0][1]}" if len(sizes) == 1 else f"{len(sizes)} sizes"
    steady = e2e["steady"]["images_per_s"]
    result = {
        "machine": machine,
        "model": args.model,
        "model_note": note,
        "scale": args.scale,
        "n_images": len(inputs.files),
        "image_size": size_txt,
        "inputs": inputs.source,
        "storage": store.label(),
        "tile": args.tile,
        "batch_size": args.batch_size,
        "bare": bare,
        "e2e": e2e,
        "bare_images_per_s": bare["images_per_s"],
        "e2e_images_per_s": e2e["images_per_s"],
        "e2e_call_images_per_s": e2e["call_images_per_s"],
        "steady_images_per_s": steady,
        "ratio": e2e["images_per_s"] / bare["images_per_s"],
        "ratio_steady": steady / bare["images_per_s"] if steady is not None else None,
    }
    print(render(result), file=out, flush=True)
    code = 0
    if e2e["ok"] != e2e["expected"] or e2e["exit_code"] != 0:
        print(f"benchmark: the job processed {e2e['ok']} of {e2e['expected']} images ok (exit code "
              f"{e2e['exit_code']}); failures: {e2e['failures']}", file=sys.stderr)  # fmt: skip
        code = 1
    if args.json:
        print(json.dumps(result, default=str), file=out, flush=True)
    return code


def _cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()
