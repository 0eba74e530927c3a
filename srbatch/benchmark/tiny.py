"""Tiny-image benchmark: the upscale job's fixed cost per image, against a plain loop over the same files.

    python jobs/benchmark.py tiny --images 2000 --size 32 --scale 2 --model bicubic
    python jobs/benchmark.py tiny --images 2000 --batch-size 4,16,64 --storage s3 --json

On images this small the model's work is a fraction of a millisecond, so what the job adds per image (Ray Data's
blocks and batches, the actor's thread pool, the manifest rows, the driver's bookkeeping) is what is measured. In one
run on the same files:

(a) **loop**: one process, one image at a time: read the bytes -> :func:`~srbatch.io.images.decode_image` -> the
    engine's :class:`~srbatch.inference.Upscaler` (built as the job's actors build it, with the actors' torch threads)
    -> :func:`~srbatch.io.images.encode_image` with the job's codec settings -> write, through one fsspec filesystem.
(b) **job**: :func:`srbatch.upscale.run_job` over the same input folder (``force``, so nothing is skipped), once per
    ``--batch-size``, with Ray started (or joined) *before* the clock; ``ray.init`` is timed on its own. The job's
    start-up is the time from calling ``run_job`` to its first result row (the manifest's earliest ``finished_at``),
    its steady rate the rate after each actor's first batch (:func:`~srbatch.benchmark.measure.steady_state`).

Printed: images/s of both, their ratio (goal >= 0.5 once Ray is up), the fixed cost per image
(``(job s - loop s) / N``), the job's stage times per image from its manifest against its wall time per image (the
rest is Ray Data, actor and manifest overhead), and whether every job output equals the loop's, pixel for pixel.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import posixpath
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

__all__ = ["build_parser", "main", "plain_loop", "run_tiny"]

STAGES = ("read_s", "decode_s", "infer_s", "encode_s", "write_s")
GOAL_RATIO = 0.5


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size or a comma-separated list such as 4,16,64; got "
                                         f"{text!r}") from None  # fmt: skip
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1; got {text!r}")
    return sizes


def build_parser(prog: str = "jobs/benchmark.py tiny") -> argparse.ArgumentParser:
    """The tiny-image benchmark's argument parser."""
    from srbatch.jobkit.config import ActorPoolConfig

    default_batch = ActorPoolConfig.model_fields["batch_size"].default
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure, in one run on the same tiny images, (a) a plain loop in one process (read, decode, "
        "upscale with the engine, encode, write) and (b) the upscale job end to end through Ray Data with Ray already "
        "up, and print both throughputs, their ratio (goal >= 0.5), the job's fixed cost per image and where its time "
        "per image goes.",
        epilog="Exit codes: 0 done, 1 an image failed in the job or a job output differs from the loop's, 2 bad "
        "arguments or setup.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", "-n", type=int, default=2000, help="number of images")
    p.add_argument("--size", type=int, default=32, help="side in pixels of the synthetic square RGB PNG inputs")
    p.add_argument("--scale", type=int, default=2, help="upscaling factor")
    p.add_argument("--model", "-m", default="bicubic",
                   help="model name (random weights for those that need weights) or checkpoint path")  # fmt: skip
    p.add_argument("--storage", choices=["local", "s3"], default="local",
                   help="local: a temporary folder; s3: a moto S3 server on 127.0.0.1 (needs moto[server])")  # fmt: skip
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="device of both measurements")
    p.add_argument("--batch-size", type=_batch_sizes, default=[default_batch],
                   help="images handed to a job actor per call; a comma-separated list runs the job once per value "
                   "(the job's default is ActorPoolConfig.batch_size)")  # fmt: skip
    p.add_argument("--actors", type=int, default=None, help="job actors [the job's default: 1 on CPU]")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads of the job's actors and of the loop [the job's default: the cluster's CPUs "
                   "divided by the actors]")  # fmt: skip
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed warm-up job on 1 image (the first job of a driver process also pays Ray "
                   "Data's one-off start; without the warm-up the first --batch-size carries it)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object (last line)")
    return p


# --------------------------------------------------------------------------------------------------- (a) the loop


def plain_loop(files: list[str], in_root: str, out_root: str, model: str, *, scale: int, device: str,
               torch_threads: int | None, fmt: str = "PNG", quality: int | None = None,
               storage_options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Upscale ``files`` (names under ``in_root``) one at a time in this process, writing ``out_root/<name>``; the
    model is loaded (and one image run) before the clock. Returns seconds, images/s and seconds per stage."""
    import torch

    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.io.images import decode_image, encode_image
    from srbatch.io.storage import filesystem, join_uri
    from srbatch.models.loader import load_model

    previous_threads = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        desc = load_model(model, scale=scale, storage_options=storage_options)
        overlap = min(desc.info.receptive_halo or 0, 32)  # as the job's actors, with the job's default tile (unset)
        up = Upscaler(desc, device=device, dtype="float32", tiling=TilingConfig(tile=None, overlap=overlap))
        fs_in, p_in = filesystem(in_root, storage_options)
        fs_out, p_out = filesystem(out_root, storage_options)
        fs_out.makedirs(p_out, exist_ok=True)
        warm = decode_image(fs_in.cat_file(posixpath.join(p_in, files[0])), name=files[0])
        encode_image(up.upscale_image(warm), format=fmt, quality=quality)  # warm-up: first forward, codec
        stages = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        for name in files:
            t = time.perf_counter()
            data = fs_in.cat_file(posixpath.join(p_in, name))
            t1 = time.perf_counter()
            img = decode_image(data, name=name)
            t2 = time.perf_counter()
            out = up.upscale_image(img)
            t3 = time.perf_counter()
            encoded = encode_image(out, format=fmt, quality=quality)
            t4 = time.perf_counter()
            fs_out.pipe_file(posixpath.join(p_out, name), encoded)
            t5 = time.perf_counter()
            for k, a, b in zip(STAGES, (t, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                stages[k] += b - a
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    n = len(files)
    return {
        "output": join_uri(out_root),
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else math.inf,
        "s_per_image": seconds / n,
        "stage_means_s": {k: v / n for k, v in stages.items()},
        "torch_threads": torch_threads or previous_threads,
        "device": str(up.device),
    }


# --------------------------------------------------------------------------------------------------- (b) the job


def _job(model: str, store: Any, n: int, *, scale: int, device: str, batch_size: int, actors: int | None,
         torch_threads: int | None, stream: Any, inputs: str = "in") -> dict[str, Any]:  # fmt: skip
    """Run the upscale job once over the benchmark's inputs (``<storage>/<inputs>``) and read what its manifest says
    about the time."""
    import ray

    from srbatch.benchmark.measure import steady_state
    from srbatch.jobkit.resources import plan_actors
    from srbatch.upscale import UpscaleConfig, read_manifest, run_job

    run_id = f"tiny-b{batch_size}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    output = store.uri("job", run_id)
    extra: dict[str, Any] = {"gpus_per_actor": 0.0} if device == "cpu" else {}
    cfg = UpscaleConfig(
        input=store.uri(inputs), output=output, model=model, scale=scale, device=device, batch_size=batch_size,
        actors=actors, torch_threads=torch_threads, force=True, progress=False, run_id=run_id,
        endpoint_url=store.endpoint, **extra,
    )  # fmt: skip
    pool = plan_actors(cfg, ray.cluster_resources())
    wall0 = datetime.now(timezone.utc)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    res = run_job(cfg, stream=stream)
    seconds = time.perf_counter() - t0
    driver_cpu_s = _cpu_seconds() - cpu0
    stream.flush()
    table = read_manifest(output, store.options)
    rows = [r for r in (table.to_pylist() if table is not None else []) if r["run_id"] == run_id]
    ok = [r for r in rows if r["status"] == "ok"]
    stages = {k: (sum(r[k] or 0.0 for r in ok) / len(ok) if ok else None) for k in STAGES}
    first = min((r["finished_at"] for r in ok), default=None)
    last = max((r["finished_at"] for r in ok), default=None)
    steady = steady_state(ok) if ok else {"images_per_s": None, "per_actor": None, "reason": "no ok rows"}
    return {
        "run_id": run_id,
        "output": output,
        "batch_size": batch_size,
        "exit_code": int(res.exit_code),
        "ok": res.ok,
        "failed": res.failed,
        "failures": res.failures[:10],
        "expected": n,
        "seconds": seconds,
        "pipeline_seconds": res.pipeline_seconds,
        "planning_s": res.seconds - res.pipeline_seconds,
        "images_per_s": res.processed / seconds if seconds > 0 else 0.0,
        "startup_s": (first - wall0).total_seconds() if first is not None else None,
        "after_first_row_s": (last - first).total_seconds() if first is not None else None,
        "steady_images_per_s": steady["images_per_s"],
        "steady": steady,
        "stage_means_s": stages,
        "stage_sum_s": sum(v for v in stages.values() if v is not None) if ok else None,
        "driver_cpu_s": driver_cpu_s,
        "driver_cpu_per_image_s": driver_cpu_s / n,
        "outputs": {r["input_uri"]: r["output_uri"] for r in ok},
        "actors": pool.actors,
        "actor_torch_threads": pool.torch_threads,
    }


def _cpu_seconds() -> float:
    """CPU seconds of this process so far (user + system, every thread: Ray's own threads in the driver too)."""
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _same_pixels(job_outputs: dict[str, str], in_root: str, loop_root: str, options: dict[str, Any]) -> dict[str, Any]:
    """How many job outputs decode to exactly the loop's pixels (and alpha) for the same input."""
    import numpy as np

    from srbatch.io.images import decode_image
    from srbatch.io.storage import join_uri, read_bytes

    same, differ = 0, []
    root = in_root.rstrip("/") + "/"
    for in_uri, out_uri in sorted(job_outputs.items()):
        name = in_uri[len(root):] if in_uri.startswith(root) else posixpath.basename(in_uri)
        a = decode_image(read_bytes(out_uri, options), name=out_uri)
        b = decode_image(read_bytes(join_uri(loop_root, name), options), name=name)
        if np.array_equal(a.pixels, b.pixels) and (a.alpha is None) == (b.alpha is None) and (
            a.alpha is None or np.array_equal(a.alpha, b.alpha)
        ):
            same += 1
        else:
            differ.append(in_uri)
    return {"compared": same + len(differ), "identical": same, "differ": differ[:10]}


# --------------------------------------------------------------------------------------------------- the run


def _start_ray(store: Any) -> dict[str, Any]:
    """Start a local Ray cluster (or join ``$RAY_ADDRESS``, or use the connection already made), timed."""
    t = time.perf_counter()
    import ray

    import_s = time.perf_counter() - t
    if ray.is_initialized():
        return {"started": False, "how": "already connected", "import_s": import_s, "init_s": None,
                "first_task_s": None, "data_import_s": _import_ray_data()}  # fmt: skip
    address = os.environ.get("RAY_ADDRESS")
    t = time.perf_counter()
    if address:
        ray.init(address=address, runtime_env={"env_vars": dict(store.env)} if store.env else None)
        how = f"joined {address}"
    else:
        ray.init(address="local", include_dashboard=False, configure_logging=False)
        how = "started a local cluster"
    init_s = time.perf_counter() - t
    t = time.perf_counter()
    ray.get(ray.remote(num_cpus=0)(_ping).remote())  # a worker is up: the start-up burst is over before timing
    first_task_s = time.perf_counter() - t
    return {"started": not address, "how": how, "import_s": import_s, "init_s": init_s,
            "first_task_s": first_task_s, "data_import_s": _import_ray_data()}  # fmt: skip


def run_with_ray(name: str, store: Any, body: Callable[[], dict[str, Any]], *, close_store: bool = True,
                 errors: tuple[type[BaseException], ...] = ()) -> tuple[dict[str, Any], dict[str, Any]] | None:  # fmt: skip
    """``(body(), ray_info)`` with Ray started (or joined) first by :func:`_start_ray`, the cluster this started shut
    down and ``store`` closed after; a setup error (srbatch's, a :class:`BenchmarkError` or one of ``errors``) is
    printed as benchmark ``name``'s and gives None."""
    from srbatch.benchmark.prepare import BenchmarkError
    from srbatch.errors import SrbatchError

    started = False
    try:
        ray_info = _start_ray(store)
        started = ray_info["started"]
        return body(), ray_info
    except (SrbatchError, BenchmarkError, *errors) as e:
        print(f"benchmark {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    finally:
        if started:
            import ray

            ray.shutdown()
        if close_store:
            store.close()


def _import_ray_data() -> float:
    """Import Ray Data in the driver (seconds): once per driver process, so that every job run below is timed alike."""
    t = time.perf_counter()
    import ray.data  # noqa: F401

    return time.perf_counter() - t


def _ping() -> int:
    return 0


def run_tiny(store: Any, args: argparse.Namespace, *, stream: Any) -> dict[str, Any]:
    """The whole measurement on ``store`` (a :class:`~srbatch.benchmark.prepare.Storage`): make the inputs, run the
    loop, then the job once per batch size; Ray must already be connected. Returns the results (see :func:`main`)."""
    import ray

    from srbatch.benchmark.prepare import prepare_model, synthetic_inputs
    from srbatch.io.storage import filesystem, write_bytes
    from srbatch.jobkit.resources import plan_actors
    from srbatch.upscale import UpscaleConfig

    t = time.perf_counter()
    inputs = synthetic_inputs(args.images, args.size)
    fs, root = filesystem(store.uri("in"), store.options)
    fs.makedirs(root, exist_ok=True)
    for name, data in inputs.files:
        fs.pipe_file(posixpath.join(root, name), data)
    model, note = prepare_model(args.model, args.scale, store)
    make_s = time.perf_counter() - t
    names = [name for name, _ in inputs.files]
    probe = UpscaleConfig(input=store.uri("in"), output=store.uri("job"), model=model, scale=args.scale,
                          device=args.device, actors=args.actors, torch_threads=args.torch_threads,
                          **({"gpus_per_actor": 0.0} if args.device == "cpu" else {}))  # fmt: skip
    threads = plan_actors(probe, ray.cluster_resources()).torch_threads
    loop_root = store.uri("loop")
    print(f"benchmark tiny: (a) plain loop over {len(names)} images ...", file=sys.stderr, flush=True)
    loop = plain_loop(names, store.uri("in"), loop_root, model, scale=args.scale, device=args.device,
                      torch_threads=threads, storage_options=store.options)  # fmt: skip
    warmup = None
    if args.warmup:  # the first job of a driver process pays one-off costs (Ray Data's first pipeline): not timed
        print("benchmark tiny: warm-up job on 1 image ...", file=sys.stderr, flush=True)
        write_bytes(store.uri("warm", names[0]), inputs.files[0][1], store.options)
        w = _job(model, store, 1, scale=args.scale, device=args.device, batch_size=1, actors=args.actors,
                 torch_threads=args.torch_threads, stream=stream, inputs="warm")  # fmt: skip
        warmup = {"seconds": w["seconds"], "startup_s": w["startup_s"], "ok": w["ok"]}
    jobs = []
    for b in args.batch_size:
        print(f"benchmark tiny: (b) the job, batch size {b} ...", file=sys.stderr, flush=True)
        job = _job(model, store, len(names), scale=args.scale, device=args.device, batch_size=b, actors=args.actors,
                   torch_threads=args.torch_threads, stream=stream)  # fmt: skip
        job["same_as_loop"] = _same_pixels(job.pop("outputs"), store.uri("in"), loop_root, store.options)
        job["ratio"] = job["images_per_s"] / loop["images_per_s"]
        steady = job["steady_images_per_s"]
        job["ratio_steady"] = steady / loop["images_per_s"] if steady is not None else None
        job["fixed_cost_per_image_s"] = (job["seconds"] - loop["seconds"]) / len(names)
        job["wall_per_image_s"] = job["seconds"] / len(names)
        job["steady_per_image_s"] = 1.0 / steady if steady else None
        if job["steady_per_image_s"] is not None and job["stage_sum_s"] is not None:
            job["overhead_per_image_s"] = job["steady_per_image_s"] - job["stage_sum_s"]
        else:
            job["overhead_per_image_s"] = None
        jobs.append(job)
    return {"images": len(names), "image_size": f"{args.size}x{args.size}", "inputs": inputs.source,
            "model": args.model, "model_note": note, "scale": args.scale, "make_inputs_s": make_s, "loop": loop,
            "jobs": jobs, "warmup": warmup, "loop_output": loop_root, "input": store.uri("in")}  # fmt: skip


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:.3f} ms"


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def render(r: dict[str, Any]) -> str:
    """The printout: the setup, then one block per job run against the loop."""
    m, lp, ray_ = r["machine"], r["loop"], r["ray"]
    ls = lp["stage_means_s"]
    lines = [
        f"benchmark tiny: {r['images']} images {r['image_size']}, {r['model']} x{r['scale']} ({r['model_note']}), "
        f"{r['storage']}",
        f"  machine          {m['cpu']}, {m['cpus']} CPUs, load avg {r['load_avg_1m']:.2f} at start; torch {m['torch']}",
        f"  ray              {ray_['how']}: import {_s(ray_['import_s'])}, ray.init {_s(ray_['init_s'])}, first "
        f"task {_s(ray_['first_task_s'])}, import ray.data {_s(ray_['data_import_s'])} (before every clock below)",
        "  warm-up          " + ("none (--no-warmup)" if r["warmup"] is None else
                                  f"job on 1 image: {_s(r['warmup']['seconds'])}, {_s(r['warmup']['startup_s'])} to "
                                  "its row (the first job of a driver process; not in the figures below)"),
        f"  (a) loop         {lp['images_per_s']:.1f} images/s  ({_ms(lp['s_per_image'])}/image, {_s(lp['seconds'])};"
        f" {lp['device']}, {lp['torch_threads']} torch threads)",
        "      per image    " + ", ".join(f"{k.removesuffix('_s')} {_ms(ls[k])}" for k in STAGES),
    ]
    for j in r["jobs"]:
        st = j["stage_means_s"]
        same = j["same_as_loop"]
        lines += [
            f"  (b) job, batch size {j['batch_size']}: {j['ok']} ok, {j['failed']} failed; {j['actors']} actor(s), "
            f"{j['actor_torch_threads']} torch threads",
            f"      end to end   {j['images_per_s']:.1f} images/s  ({_ms(j['wall_per_image_s'])}/image, "
            f"{_s(j['seconds'])})   ratio job/loop {j['ratio']:.3f} (goal >= {GOAL_RATIO})",
            "      steady       " + ("n/a" if j["steady_images_per_s"] is None else
                                     f"{j['steady_images_per_s']:.1f} images/s after each actor's first batch   "
                                     f"ratio {j['ratio_steady']:.3f}"),
            f"      start-up     {_s(j['startup_s'])} from run_job to its first result row (planning "
            f"{_s(j['planning_s'])}, Ray Data + actor start + first batch the rest)",
            f"      fixed cost   {_ms(j['fixed_cost_per_image_s'])} per image ((job s - loop s) / N)",
            "      per image    " + ", ".join(f"{k.removesuffix('_s')} {_ms(st[k])}" for k in STAGES)
            + f" = {_ms(j['stage_sum_s'])} of actor work (reads and uploads on its thread pool)",
            f"      overhead     {_ms(j['overhead_per_image_s'])} per image: steady wall per image "
            f"{_ms(j['steady_per_image_s'])} - actor work (Ray Data, actor, manifest)",
            f"      driver CPU   {_ms(j['driver_cpu_per_image_s'])} per image ({_s(j['driver_cpu_s'])}: planning, Ray Data's "
            "scheduling, result rows, manifest; on the same CPUs as the actor)",
            f"      outputs      {same['identical']} of {same['compared']} equal the loop's pixel for pixel",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py tiny", storage: Any = None) -> int:
    """Run the tiny-image benchmark; returns the exit code (0 done, 1 a failed image or a differing output, 2 bad
    arguments or setup). Uses the Ray connection already made if there is one (its start-up is then not timed).

    ``storage``: a :class:`~srbatch.benchmark.prepare.Storage` to work in instead of a new one (``--storage`` is then
    ignored); it is left open, with the inputs, the loop's outputs (``loop/``) and the job's (``job/<run id>/``).
    """
    from srbatch.jobkit.cluster import ray_env_defaults

    ray_env_defaults()  # before Ray is imported: a new single-machine cluster binds every port to 127.0.0.1
    p = build_parser(prog)
    a = p.parse_args(argv)
    for name in ("images", "size", "scale"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1; got {getattr(a, name)}")
    for name in ("actors", "torch_threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(a, name)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from srbatch.benchmark.prepare import BenchmarkError, Storage
    from srbatch.benchmark.report import machine_info

    load = os.getloadavg()[0]
    out = sys.stdout
    try:
        store = storage if storage is not None else Storage(a.storage)
    except BenchmarkError as e:
        print(f"benchmark tiny: {e}", file=sys.stderr)
        return 2
    done = run_with_ray("tiny", store, lambda: run_tiny(store, a, stream=sys.stderr if a.json else out),
                        close_store=storage is None)  # fmt: skip
    if done is None:
        return 2
    result, ray_info = done
    result.update(machine=machine_info("cuda" if a.device == "cuda" else "cpu"), load_avg_1m=load, ray=ray_info,
                  storage=store.label())  # fmt: skip
    print(render(result), file=out, flush=True)
    code = 0
    for j in result["jobs"]:
        if j["ok"] != j["expected"] or j["exit_code"] != 0:
            print(f"benchmark tiny: batch size {j['batch_size']}: the job processed {j['ok']} of {j['expected']} "
                  f"images ok (exit code {j['exit_code']}); failures: {j['failures']}", file=sys.stderr)  # fmt: skip
            code = 1
        if j["same_as_loop"]["identical"] != j["expected"]:
            print(f"benchmark tiny: batch size {j['batch_size']}: {j['expected'] - j['same_as_loop']['identical']} "
                  f"job outputs differ from the loop's, e.g. {j['same_as_loop']['differ'][:3]}", file=sys.stderr)  # fmt: skip
            code = 1
    if a.json:
        print(json.dumps(result, default=str), file=out, flush=True)
    return code
