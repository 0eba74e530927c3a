"""CPU ceiling benchmark: the upscale job with a near-zero-cost model against the machine's raw decode + encode
throughput on all cores, same images, same codec settings, same storage, one run.

    python jobs/benchmark.py ceiling                  # 48 x 256x256 PNG, x4 nearest, PNG out, every pipeline
    python jobs/benchmark.py ceiling --pipeline fused --storage s3 --format JPEG --quality 90 --json

With pixel replication as the model, what is left of the job is its own work (read, decode, encode, write) and its
overhead (Ray Data, actors, manifest). In one run:

(a) **raw**: a process pool of ``--workers`` (default: every CPU) processes, each doing per image: read the bytes
    (fsspec, the benchmark's storage) -> :func:`~srbatch.io.images.decode_image` -> ``np.repeat`` (the same pixel
    replication) -> :func:`~srbatch.io.images.encode_image` with the job's codec settings -> write. The pool is
    started and every process has run one image before the clock. Printed: images/s and the stage breakdown.
(b) **job**: :func:`srbatch.upscale.run_job` over the same folder (``force``), once per pipeline, on a local Ray
    cluster started once before any clock (one untimed 1-image job per pipeline first, unless ``--no-warmup``).
    Throughput = processed / pipeline seconds; its stage means come from the manifest rows, and its overhead is
    ``pipeline seconds x cluster CPUs - sum of the rows' stage seconds`` (CPU time not spent in a stage).
(c) the ratio job/raw per pipeline (goal >= 0.8).

Every job output is decoded with Pillow and compared with ``np.repeat`` of its input decoded with Pillow (for lossy
formats: with the raw pool's output of the same input). ``srbatch.upscale.stages.run_local`` (the stages pipeline
without Ray) is measured too when it exists.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import posixpath
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

__all__ = ["GOAL_RATIO", "build_parser", "check_outputs", "main", "raw_pool"]

STAGES = ("read_s", "decode_s", "infer_s", "encode_s", "write_s")
GOAL_RATIO = 0.8
_LOSSLESS = ("PNG", "TIFF")


def build_parser(prog: str = "jobs/benchmark.py ceiling") -> argparse.ArgumentParser:
    """The ceiling benchmark's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Measure, in one run on the same images and codec settings, (a) the raw read + decode + pixel "
        "replication + encode + write throughput of a process pool on every CPU and (b) the upscale job's throughput "
        "with the near-zero-cost 'nearest' model, once per pipeline, and print both with their stage breakdown and "
        f"ratio (goal >= {GOAL_RATIO}).",
        epilog="Exit codes: 0 done, 1 an image failed or an output is wrong, 2 bad arguments or setup.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", "-n", type=int, default=48, help="number of images")
    p.add_argument("--size", type=int, default=256, help="side of the square RGB PNG inputs (crops of real photos)")
    p.add_argument("--scale", type=int, default=4, help="upscaling factor")
    p.add_argument("--model", default="nearest",
                   help="nearest (pixel replication; bicubic until it is registered) or another weight-free model")  # fmt: skip
    p.add_argument("--format", default="PNG", choices=["PNG", "JPEG", "WEBP", "TIFF"], help="output format")
    p.add_argument("--png-compression", type=int, default=None,
                   help="zlib level of PNG outputs [the job's default]")  # fmt: skip
    p.add_argument("--quality", type=int, default=None, help="JPEG/WebP quality [the job's default]")
    p.add_argument("--webp-lossless", action="store_true", help="lossless WebP outputs")
    p.add_argument("--storage", choices=["local", "s3"], default="local",
                   help="local: a temporary folder; s3: a moto S3 server on 127.0.0.1 (needs moto[server])")  # fmt: skip
    p.add_argument("--pipeline", choices=["auto", "fused", "stages", "all"], default="all",
                   help="the job's pipeline; all: fused, then stages")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="processes of the raw pool [every CPU]")
    p.add_argument("--batch-size", type=int, default=None, help="the job's batch size [the job's default]")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="the job's torch threads per actor [the job's default: the CPUs / actors]")  # fmt: skip
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed 1-image job per pipeline (Ray Data's first pipeline pays one-off costs)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object (last line)")
    return p


# --------------------------------------------------------------------------------------------------- (a) raw pool

_CACHE: dict[Any, Any] = {}  # per pool process: filesystems and engines, made once


def _fs(root: str, options: dict[str, Any]) -> tuple[Any, str]:
    key = ("fs", root, json.dumps(options, sort_keys=True, default=str))
    if key not in _CACHE:
        from srbatch.io.storage import filesystem

        _CACHE[key] = filesystem(root, options)
    return _CACHE[key]


def _upscale(img: Any, model: str, scale: int) -> Any:
    """``nearest``: ``np.repeat`` along both axes (the pixels and the alpha); another model: the engine on the CPU
    with one torch thread (the fallback while ``nearest`` is not registered)."""
    from dataclasses import replace

    import numpy as np

    if model == "nearest":
        def rep(a: Any) -> Any:
            return None if a is None else np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)

        return replace(img, pixels=rep(img.pixels), alpha=rep(img.alpha))
    key = ("up", model, scale)
    if key not in _CACHE:
        import torch

        from srbatch.inference import TilingConfig, Upscaler
        from srbatch.models.loader import load_model

        torch.set_num_threads(1)
        desc = load_model(model, scale=scale)
        _CACHE[key] = Upscaler(desc, device="cpu", tiling=TilingConfig(tile=None, overlap=min(desc.info.receptive_halo
                                                                                              or 0, 32)))  # fmt: skip
    return _CACHE[key].upscale_image(img)


def _raw_one(name: str, out_name: str, in_root: str, out_root: str, options: dict[str, Any], model: str, scale: int,
             enc: dict[str, Any]) -> dict[str, float]:  # fmt: skip
    """One image in a pool process: read -> decode -> upscale -> encode -> write; seconds per stage."""
    from srbatch.io.images import decode_image, encode_image

    fs_in, p_in = _fs(in_root, options)
    fs_out, p_out = _fs(out_root, options)
    t0 = time.perf_counter()
    data = fs_in.cat_file(posixpath.join(p_in, name))
    t1 = time.perf_counter()
    img = decode_image(data, name=name)
    t2 = time.perf_counter()
    out = _upscale(img, model, scale)
    t3 = time.perf_counter()
    encoded = encode_image(out, **enc)
    t4 = time.perf_counter()
    fs_out.pipe_file(posixpath.join(p_out, out_name), encoded)
    t5 = time.perf_counter()
    return dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)))


def _raw_warm(*args: Any) -> int:
    """The warm-up task: one image (first-call costs of the codecs, the filesystem, the engine), then a pause, so
    that each process of the pool gets one of these."""
    _raw_one(*args)
    time.sleep(0.3)
    return os.getpid()


def raw_pool(files: list[tuple[str, str]], in_root: str, out_root: str, options: dict[str, Any], *, model: str,
             scale: int, enc: dict[str, Any], workers: int) -> dict[str, Any]:  # fmt: skip
    """Upscale ``files`` (pairs of input name under ``in_root``, output name under ``out_root``) on a pool of
    ``workers`` processes (spawned, started and warmed up before the clock). Returns images/s and stage means."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from srbatch.io.storage import filesystem

    fs, root = filesystem(out_root, options)
    fs.makedirs(root, exist_ok=True)
    warm_root = out_root.rstrip("/") + "-warmup"
    fs_w, root_w = filesystem(warm_root, options)
    fs_w.makedirs(root_w, exist_ok=True)
    common = (in_root, out_root, options, model, scale, enc)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        t = time.perf_counter()
        warm = [ex.submit(_raw_warm, files[0][0], files[0][1], in_root, warm_root, options, model, scale, enc)
                for _ in range(workers)]  # fmt: skip
        pids = {f.result() for f in warm}
        start_s = time.perf_counter() - t
        t0 = time.perf_counter()
        futures = [ex.submit(_raw_one, name, out_name, *common) for name, out_name in files]
        times = [f.result() for f in futures]
        seconds = time.perf_counter() - t0
    n = len(files)
    sums = {k: sum(r[k] for r in times) for k in STAGES}
    stage_sum = sum(sums.values())
    return {
        "workers": workers,
        "processes_warmed": len(pids),
        "start_s": start_s,
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else math.inf,
        "stage_means_s": {k: v / n for k, v in sums.items()},
        "stage_sum_s": stage_sum / n,
        "overhead_per_image_s": (seconds * workers - stage_sum) / n,
        "outputs": {name: out_root.rstrip("/") + "/" + out_name for name, out_name in files},
    }


# --------------------------------------------------------------------------------------------------- (b) the job


def _config(store: Any, run_id: str, model: str, a: argparse.Namespace, pipeline: str | None, inputs: str = "in",
            output: str = "job") -> Any:  # fmt: skip
    """The job's config: CPU actors, the codec flags (those the config has), ``pipeline`` when the config has it."""
    from srbatch.upscale import UpscaleConfig

    fields = UpscaleConfig.model_fields
    kw: dict[str, Any] = dict(input=store.uri(inputs), output=store.uri(output, run_id), model=model, scale=a.scale,
                              device="cpu", gpus_per_actor=0.0, format=a.format, quality=a.quality, force=True,
                              progress=False, run_id=run_id, endpoint_url=store.endpoint)  # fmt: skip
    if a.batch_size is not None:
        kw["batch_size"] = a.batch_size
    if a.torch_threads is not None:
        kw["torch_threads"] = a.torch_threads
    if a.png_compression is not None and "png_compression" in fields:
        kw["png_compression"] = a.png_compression
    if a.webp_lossless and "webp_lossless" in fields:
        kw["webp_lossless"] = True
    if pipeline is not None and "pipeline" in fields:
        kw["pipeline"] = pipeline
    return UpscaleConfig(**kw)


def encode_kwargs(cfg: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`~srbatch.io.images.encode_image` the job uses for ``cfg``."""
    if hasattr(cfg, "encode_options"):
        return dict(cfg.encode_options())
    return {"format": cfg.format, "quality": cfg.quality}


def _stage_figures(ok: list[dict[str, Any]], wall: float, cores: float) -> dict[str, Any]:
    n = len(ok)
    means = {k: (sum(r.get(k) or 0.0 for r in ok) / n if n else None) for k in STAGES}
    total = sum(sum(r.get(k) or 0.0 for k in STAGES) for r in ok)
    return {
        "stage_means_s": means,
        "stage_sum_s": total / n if n else None,
        "overhead_per_image_s": (wall * cores - total) / n if n else None,
        "overhead_fraction": 1 - total / (wall * cores) if wall > 0 and cores > 0 else None,
    }


def _job(cfg: Any, store: Any, stream: Any) -> dict[str, Any]:
    """Run the job once and read what its manifest says about the time."""
    import ray

    from srbatch.upscale import read_manifest, run_job

    from srbatch.benchmark.measure import steady_state

    cores = float(ray.cluster_resources().get("CPU", 0.0))
    wall0 = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    res = run_job(cfg, stream=stream)
    seconds = time.perf_counter() - t0
    stream.flush()
    table = read_manifest(cfg.output, store.options)
    rows = [r for r in (table.to_pylist() if table is not None else []) if r["run_id"] == cfg.run_id]
    ok = [r for r in rows if r["status"] == "ok"]
    wall = res.pipeline_seconds
    first = min((r["finished_at"] for r in ok), default=None)
    steady = steady_state(ok) if ok else {"images_per_s": None, "reason": "no ok rows"}
    return {
        "run_id": cfg.run_id,
        "exit_code": int(res.exit_code),
        "ok": res.ok,
        "failed": res.failed,
        "failures": res.failures[:10],
        "seconds": seconds,
        "pipeline_seconds": wall,
        "images_per_s": res.processed / wall if wall > 0 else 0.0,
        "call_images_per_s": res.processed / seconds if seconds > 0 else 0.0,
        "first_row_s": (first - wall0).total_seconds() if first is not None else None,
        "steady_images_per_s": steady["images_per_s"],
        "steady_note": steady.get("reason"),
        "cluster_cpus": cores,
        **_stage_figures(ok, wall, cores),
        "outputs": {r["input_uri"]: r["output_uri"] for r in ok},
    }


def _run_local(cfg: Any, store: Any, workers: int) -> dict[str, Any] | None:
    """``srbatch.upscale.stages.run_local`` (the stages pipeline without Ray), when it exists."""
    try:
        from srbatch.upscale.stages import run_local
    except ImportError:
        return None
    lr = run_local(cfg, cpu_workers=workers)
    rows = lr.rows.to_pylist()
    ok = [r for r in rows if r.get("status") == "ok"]
    return {
        "images": len(rows),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "seconds": lr.seconds,
        "images_per_s": lr.images_per_s,
        "cpu_workers": workers,
        **_stage_figures(ok, lr.seconds, float(os.cpu_count() or 1)),
        "outputs": {r["input_uri"]: r["output_uri"] for r in ok},
    }


# --------------------------------------------------------------------------------------------------- checks


def _pillow(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.mode, np.asarray(im)


def check_outputs(outputs: dict[str, str], inputs: dict[str, bytes], in_root: str, *, scale: int, expect: str,
                  raw: dict[str, str], options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Compare each output (input URI -> output URI) with what it must be, both decoded by Pillow alone.

    ``expect="nearest"``: ``np.repeat`` of the input's pixels along both axes, and the same Pillow mode.
    ``expect="raw"``: the raw pool's output of the same input (``raw``: input name -> output URI).
    Inputs without an output count as differing."""
    import numpy as np

    from srbatch.io.storage import read_bytes

    same, differ = 0, []
    root = in_root.rstrip("/") + "/"
    for name, data in sorted(inputs.items()):
        uri = root + name
        out_uri = outputs.get(uri)
        if out_uri is None:
            differ.append(f"{name}: no output")
            continue
        mode, got = _pillow(read_bytes(out_uri, options))
        if expect == "nearest":
            want_mode, a = _pillow(data)
            want = np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)
        else:
            want_mode, want = _pillow(read_bytes(raw[name], options))
        if mode == want_mode and got.shape == want.shape and np.array_equal(got, want):
            same += 1
        else:
            differ.append(f"{name}: {mode} {got.shape} vs {want_mode} {want.shape}")
    how = ("np.repeat of the input (both decoded by Pillow)" if expect == "nearest" else
           "the raw pool's output of the same input (both decoded by Pillow)")  # fmt: skip
    return {"compared": len(inputs), "identical": same, "differ": differ[:10], "against": how}


# --------------------------------------------------------------------------------------------------- the run


def _registered(name: str) -> bool:
    from srbatch.models.registry import architectures, variants

    return name in architectures() or name in variants()


def _pipelines(choice: str) -> tuple[list[str | None], str | None]:
    """The pipelines to run (None: the config has no ``pipeline`` field, run its only one) and a note."""
    from srbatch.upscale import UpscaleConfig

    if "pipeline" not in UpscaleConfig.model_fields:
        if choice == "stages":
            raise _SetupError("--pipeline stages: this srbatch has no stages pipeline yet (UpscaleConfig has no "
                              "'pipeline' field); use --pipeline fused")  # fmt: skip
        return [None], "UpscaleConfig has no 'pipeline' field yet: the job's only pipeline (the fused actor) ran"
    return (["fused", "stages"] if choice == "all" else [choice]), None


class _SetupError(Exception):
    pass


def run_ceiling(store: Any, a: argparse.Namespace, *, stream: Any) -> dict[str, Any]:
    """The whole measurement on ``store`` (a :class:`~srbatch.benchmark.prepare.Storage`) with Ray connected."""
    from srbatch.benchmark.prepare import synthetic_inputs
    from srbatch.io.storage import filesystem, write_bytes
    from srbatch.upscale.plan import output_key

    notes: list[str] = []
    model = a.model
    if model == "nearest" and not _registered("nearest"):
        model = "bicubic"
        notes.append("model 'nearest' is not registered yet: bicubic instead, in the job and in the raw pool (the "
                     "engine's MATLAB bicubic on 1 torch thread per process), so the raw pool is not decode + encode "
                     "alone")  # fmt: skip
    pipelines, note = _pipelines(a.pipeline)
    if note:
        notes.append(note)
    if a.png_compression is not None or a.webp_lossless:
        from srbatch.upscale import UpscaleConfig

        for flag, field in (("png_compression", "png_compression"), ("webp_lossless", "webp_lossless")):
            if getattr(a, flag) not in (None, False) and field not in UpscaleConfig.model_fields:
                notes.append(f"--{flag.replace('_', '-')} ignored: UpscaleConfig has no '{field}' field yet (the "
                             "job and the raw pool use the default)")  # fmt: skip
    inputs = synthetic_inputs(a.images, a.size)
    fs, root = filesystem(store.uri("in"), store.options)
    fs.makedirs(root, exist_ok=True)
    for name, data in inputs.files:
        fs.pipe_file(posixpath.join(root, name), data)
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    probe = _config(store, f"probe-{stamp}", model, a, pipelines[0])
    enc = encode_kwargs(probe)
    workers = a.workers or os.cpu_count() or 1
    files = [(name, output_key(name, probe.format)) for name, _ in inputs.files]
    print(f"benchmark ceiling: (a) raw pool of {workers} processes over {len(files)} images ...", file=sys.stderr,
          flush=True)  # fmt: skip
    raw = raw_pool(files, store.uri("in"), store.uri("raw"), store.options, model=model, scale=a.scale, enc=enc,
                   workers=workers)  # fmt: skip
    raw_outputs = raw.pop("outputs")
    lossless = probe.format in _LOSSLESS or (probe.format == "WEBP" and bool(enc.get("lossless")))
    expect = "nearest" if model == "nearest" and lossless else "raw"
    by_name = dict(inputs.files)

    def check(outputs: dict[str, str]) -> dict[str, Any]:
        return check_outputs(outputs, by_name, store.uri("in"), scale=a.scale, expect=expect, raw=raw_outputs,
                             options=store.options)  # fmt: skip

    raw["check"] = (check({store.uri("in").rstrip("/") + "/" + k: v for k, v in raw_outputs.items()})
                    if expect == "nearest" else None)  # otherwise the raw pool's outputs are the reference
    if a.warmup:
        write_bytes(store.uri("warm", inputs.files[0][0]), inputs.files[0][1], store.options)
    jobs = []
    for p in pipelines:
        label = p or "fused"
        if a.warmup:
            print(f"benchmark ceiling: warm-up job ({label}) on 1 image ...", file=sys.stderr, flush=True)
            w = _job(_config(store, f"warm-{label}-{stamp}", model, a, p, inputs="warm", output="warmjob"), store,
                     stream)  # fmt: skip
            warm = {"seconds": w["seconds"], "ok": w["ok"]}
        print(f"benchmark ceiling: (b) the job, pipeline {label} ...", file=sys.stderr, flush=True)
        j = _job(_config(store, f"{label}-{stamp}", model, a, p), store, stream)
        j.update(pipeline=label, warmup=warm if a.warmup else None, check=check(j.pop("outputs")),
                 ratio=j["images_per_s"] / raw["images_per_s"])  # fmt: skip
        jobs.append(j)
    local = None
    try:
        local = _run_local(_config(store, f"local-{stamp}", model, a, "stages" if pipelines[0] else None,
                                   output="local"), store, workers)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported, the rest of the figures stand
        local = {"error": f"{type(e).__name__}: {e}"}
    if local is not None and "outputs" in local:
        local["check"] = check(local.pop("outputs"))
        local["ratio"] = local["images_per_s"] / raw["images_per_s"]
    sizes = sorted(set(inputs.sizes))
    return {
        "images": len(files),
        "image_size": f"{sizes[0][0]}x{sizes[0][1]}" if len(sizes) == 1 else f"{len(sizes)} sizes",
        "inputs": inputs.source,
        "model": model,
        "model_requested": a.model,
        "scale": a.scale,
        "codec": {k: v for k, v in enc.items() if v is not None},
        "notes": notes,
        "raw": raw,
        "jobs": jobs,
        "run_local": local,
    }


# --------------------------------------------------------------------------------------------------- printout


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:.1f} ms"


def _stages(st: dict[str, float | None], infer: str = "infer") -> str:
    return ", ".join(f"{infer if k == 'infer_s' else k.removesuffix('_s')} {_ms(st[k])}" for k in STAGES)


def render(r: dict[str, Any]) -> str:
    """The printout."""
    m, raw = r["machine"], r["raw"]
    codec = ", ".join(f"{k}={v}" for k, v in r["codec"].items())
    la0, la1 = r["load_avg_before"], r["load_avg_after"]
    lines = [
        f"benchmark ceiling: {r['images']} images {r['image_size']} RGB PNG, {r['model']} x{r['scale']}, codec "
        f"{codec}, {r['storage']}",
        f"  machine        {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, Python {m['python']}",
        f"  load avg       before {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}; after {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}"
        " (1, 5, 15 min)",
        f"  inputs         {r['inputs']}",
    ]
    lines += [f"  note           {n}" for n in r["notes"]]
    lines += [
        f"  (a) raw pool   {raw['images_per_s']:.2f} images/s  ({raw['workers']} processes, {raw['images']} images in "
        f"{raw['seconds']:.2f} s; pool start + warm-up {raw['start_s']:.2f} s before the clock)",
        f"      per image  {_stages(raw['stage_means_s'], 'upscale')} = {_ms(raw['stage_sum_s'])} of work",
        f"      overhead   {_ms(raw['overhead_per_image_s'])} per image (wall x processes - stages)",
        "      outputs checked: " + (f"{raw['check']['identical']} identical of {raw['check']['compared']} to "
                                     f"{raw['check']['against']}" if raw["check"] else
                                     "not checked (the reference of the job's outputs: lossy format or not nearest)"),
    ]
    for j in r["jobs"]:
        c = j["check"]
        lines += [
            f"  (b) job [{j['pipeline']}]  {j['images_per_s']:.2f} images/s  ({j['ok']} ok, {j['failed']} failed in "
            f"{j['pipeline_seconds']:.2f} s of pipeline; run_job {j['seconds']:.2f} s wall, "
            f"{j['call_images_per_s']:.2f} images/s)" + ("" if not j["warmup"] else
                                                         f"; warm-up job {j['warmup']['seconds']:.2f} s untimed"),
            f"      start-up   first row {_s(j['first_row_s'])} after run_job was called; steady state "
            + (f"{j['steady_images_per_s']:.2f} images/s after each actor's first batch (ratio to raw "
               f"{j['steady_images_per_s'] / raw['images_per_s']:.3f})" if j["steady_images_per_s"] else
               f"n/a ({j['steady_note']}; use more --images)"),
            f"      per image  {_stages(j['stage_means_s'])} = {_ms(j['stage_sum_s'])} of work (manifest means)",
            f"      overhead   {_ms(j['overhead_per_image_s'])} per image (pipeline s x {j['cluster_cpus']:g} CPUs - "
            f"stages): {_pct(j['overhead_fraction'])} of the cluster's CPU time (stage times are wall times; stages "
            "on threads overlap, so this can be negative)",
            f"      outputs checked: {c['identical']} identical of {c['compared']} to {c['against']}",
            f"  (c) ratio job/raw [{j['pipeline']}]  {j['ratio']:.3f}  (goal >= {GOAL_RATIO}: "
            f"{'met' if j['ratio'] >= GOAL_RATIO else 'NOT met'})",
        ]  # fmt: skip
    loc = r["run_local"]
    if loc is None:
        lines.append("  run_local      not available (no srbatch.upscale.stages.run_local yet): no end-to-end figure "
                     "without Ray")  # fmt: skip
    elif "error" in loc:
        lines.append(f"  run_local      failed: {loc['error']}")
    else:
        lines += [
            f"  run_local      {loc['images_per_s']:.2f} images/s without Ray ({loc['ok']} ok, {loc['failed']} "
            f"failed in {loc['seconds']:.2f} s, {loc['cpu_workers']} CPU workers); ratio to raw {loc['ratio']:.3f}",
            f"      per image  {_stages(loc['stage_means_s'])}",
            f"      outputs checked: {loc['check']['identical']} identical of {loc['check']['compared']}",
        ]
    return "\n".join(lines)


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py ceiling") -> int:
    """Run the ceiling benchmark; returns the exit code (0 done, 1 a failed image or a wrong output, 2 bad arguments
    or setup). Uses the Ray connection already made if there is one."""
    from srbatch.jobkit.cluster import ray_env_defaults

    ray_env_defaults()  # before Ray is imported: a new single-machine cluster binds every port to 127.0.0.1
    p = build_parser(prog)
    a = p.parse_args(argv)
    for name in ("images", "size", "scale", "workers", "batch_size", "torch_threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(a, name)}")
    if a.png_compression is not None and not 0 <= a.png_compression <= 9:
        p.error(f"--png-compression must be a zlib level 0..9; got {a.png_compression}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from srbatch.benchmark.prepare import BenchmarkError, Storage
    from srbatch.benchmark.report import machine_info
    from srbatch.benchmark.tiny import run_with_ray

    load_before = os.getloadavg()
    machine = machine_info("cpu")
    out = sys.stdout
    try:
        store = Storage(a.storage)
    except BenchmarkError as e:
        print(f"benchmark ceiling: {e}", file=sys.stderr)
        return 2
    done = run_with_ray("ceiling", store, lambda: run_ceiling(store, a, stream=sys.stderr if a.json else out),
                        errors=(_SetupError,))  # fmt: skip
    if done is None:
        return 2
    result, ray_info = done
    result.update(machine=machine, load_avg_before=load_before, load_avg_after=os.getloadavg(), ray=ray_info,
                  storage=store.label())  # fmt: skip
    print(render(result), file=out, flush=True)
    code = 0
    runs = [(f"job [{j['pipeline']}]", j) for j in result["jobs"]] + [("raw pool", result["raw"])]
    if result["run_local"] is not None:
        runs.append(("run_local", result["run_local"]))
    for label, run in runs:
        if "error" in run:
            code = 1
            continue
        c = run["check"]
        if c is not None and c["identical"] != c["compared"]:
            print(f"benchmark ceiling: {label}: {c['compared'] - c['identical']} outputs differ from "
                  f"{c['against']}, e.g. {c['differ'][:3]}", file=sys.stderr)  # fmt: skip
            code = 1
        if run.get("exit_code", 0) != 0 or run.get("failed", 0):
            print(f"benchmark ceiling: {label}: {run.get('failed')} images failed (exit code {run.get('exit_code')}); "
                  f"{run.get('failures', [])[:3]}", file=sys.stderr)  # fmt: skip
            code = 1
    if a.json:
        print(json.dumps(result, default=str), file=out, flush=True)
    return code
