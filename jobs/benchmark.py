"""Benchmark: bare model forward throughput vs end-to-end job throughput, same images, same device, one run.

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
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import posixpath
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit --working-dir .`

from srbatch.upscale.runner import ray_env_defaults  # noqa: E402

ray_env_defaults()  # before Ray is imported: a new single-machine cluster binds every port to 127.0.0.1

log = logging.getLogger("srbatch.benchmark")

BUCKET = "srbatch-bench"
GOAL_RATIO = 0.9


class BenchmarkError(Exception):
    """A setup problem of the benchmark itself (exit code 2), with the fix in its message."""


# --------------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/benchmark.py",
        description="Measure, in one run on the same images and device, (a) the bare model forward throughput "
        "(images/s; model loaded, tensors already in memory on the device) and (b) the end-to-end throughput of the "
        "upscale job through Ray Data and object storage, and print both with their ratio (goal: >= 0.9 for a "
        "compute-bound model such as EDSR or RRDBNet at x4 on 256x256 inputs).",
        epilog="Models that need weights (edsr-baseline, rrdbnet, ...) are built with random weights (torch seed 0) "
        "and saved as a .safetensors file in the benchmark's storage, so the job's actors load them by URI; speed does "
        "not depend on the weights' values. Exit codes: 0 done, 1 an image failed in the job, 2 bad arguments or "
        "setup.",
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


# --------------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """The benchmark's images as file bytes, and how they were made."""

    files: list[tuple[str, bytes]]
    source: str
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height)


def synthetic_inputs(n: int, size: int) -> Inputs:
    """``n`` different ``size`` x ``size`` RGB PNGs: random square crops of the bundled samples, resized (Lanczos)."""
    import io

    import numpy as np
    from PIL import Image

    from srbatch.local import sample_images_dir

    root = Path(sample_images_dir())
    samples = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not samples:
        raise BenchmarkError(f"no sample images under {root}; give your own with --input")
    opened = []
    for s in samples:
        with Image.open(s) as im:
            opened.append(im.convert("RGB"))
    flips = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]
    files = []
    for i in range(n):
        im = opened[i % len(opened)]
        w, h = im.size
        short = min(w, h)
        rng = np.random.default_rng(i)
        # crops larger than --size are reduced; smaller samples give crops of half to all of their short side, enlarged
        side = int(rng.integers(size if size <= short else max(1, short // 2), short + 1))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = im.crop((x0, y0, x0 + side, y0 + side))
        flip = flips[(i // len(opened)) % len(flips)]
        if flip is not None:
            crop = crop.transpose(flip)
        if crop.size != (size, size):
            crop = crop.resize((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        files.append((f"bench_{i:03d}.png", buf.getvalue()))
    largest = max(opened, key=lambda im: im.size[0] * im.size[1]).size
    names = ", ".join(s.name for s in samples)
    note = (f"synthetic {size}x{size} RGB PNGs: random square crops of the bundled samples ({names}; the largest is "
            f"{largest[0]}x{largest[1]}), flipped and resized with Lanczos")  # fmt: skip
    return Inputs(files, note, [(size, size)] * n)


def user_inputs(spec: str, n: int) -> Inputs:
    """The first ``n`` images under ``spec`` (sorted), read once."""
    from srbatch.io.storage import list_images, read_bytes

    uris = list_images(spec)[:n]
    files = []
    for i, u in enumerate(uris):
        base = posixpath.basename(u.rstrip("/"))
        files.append((f"{i:03d}_{base}", read_bytes(u)))
    note = "" if len(uris) >= n else f" (only {len(uris)} found, fewer than --images {n})"
    return Inputs(files, f"{len(uris)} images from {spec}{note}")


# --------------------------------------------------------------------------------------------------- storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Storage:
    """Where the benchmark puts its inputs, model and outputs: a temporary folder, or a moto S3 server on loopback."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.tmp = tempfile.mkdtemp(prefix="srbatch-bench-")
        self.server: Any = None
        self.endpoint: str | None = None
        self.env: dict[str, str] = {}
        self._old_env: dict[str, str | None] = {}
        if kind == "local":
            self.root = os.path.join(self.tmp, "store")
            os.makedirs(self.root)
            return
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            self.close()
            raise BenchmarkError(
                "--storage s3 starts a local S3 server with moto, which is not installed; "
                "run with --storage local, or `pip install 'moto[server]'`"
            ) from None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        port = _free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        # Set before Ray starts, so that the job's actors inherit them (and passed as runtime_env when joining).
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._old_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint})
        fs.mkdir(BUCKET)
        fs.invalidate_cache()
        self.root = f"s3://{BUCKET}"

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options for this storage."""
        return {"client_kwargs": {"endpoint_url": self.endpoint}} if self.endpoint else {}

    def uri(self, *parts: str) -> str:
        from srbatch.io.storage import join_uri

        return join_uri(self.root, *parts)

    def describe(self) -> str:
        return f"s3 (moto server at {self.endpoint})" if self.kind == "s3" else f"local folder {self.root}"

    def close(self) -> None:
        if self.server is not None:
            try:
                self.server.stop()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                log.warning("could not stop the moto server: %s", e)
            self.server = None
        for k, v in self._old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._old_env = {}
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- model


def prepare_model(name: str, scale: int, store: Storage) -> tuple[str, str]:
    """The model reference both measurements load, and a note on where it came from.

    Registry names that need weights are built with random weights (seed 0) and saved into the benchmark's storage;
    weight-free names pass through; checkpoint paths pass through, remote checkpoint URIs are copied into the
    benchmark's storage (read before the S3 server's credentials are in the environment: see :func:`main`).
    """
    import torch

    from srbatch.errors import ConfigError
    from srbatch.models.loader import build_model, save_model
    from srbatch.models.registry import architectures, variants

    archs, var = architectures(), variants()
    if name in archs or name in var:
        arch = var[name][0] if name in var else name
        if not archs[arch].needs_weights:
            return name, "no weights"
        torch.manual_seed(0)
        try:
            desc = build_model(name, scale=scale)
        except ConfigError:
            desc = build_model(name)  # scale-agnostic architectures take no scale argument
        uri = store.uri("models", f"{name}_x{scale}_random.safetensors")
        save_model(desc, uri, storage_options=store.options)
        return uri, "random weights (torch seed 0)"
    return name, "checkpoint"


def _copy_remote_checkpoint(model: str) -> bytes | None:
    """The bytes of a checkpoint given as a remote URI (None for local paths and registry names)."""
    if "://" not in model or model.startswith("file://"):
        return None
    from srbatch.io.storage import read_bytes

    return read_bytes(model)


# --------------------------------------------------------------------------------------------------- (a) bare


def _model_input(x: Any, color_space: str) -> Any:
    """(1, 1|3, H, W) grey or RGB in [0, 1] -> what the network sees, exactly as ``Upscaler.upscale_image`` feeds it."""
    from srbatch.metrics.color import rgb2ycbcr

    c = int(x.shape[1])
    if color_space == "L":
        return x if c == 1 else x.transpose(0, 1)  # a colour image runs as 3 grey images
    if color_space == "Y":
        return x if c == 1 else rgb2ycbcr(x)[:, :1]
    rgb = x if c == 3 else x.expand(-1, 3, -1, -1)
    return rgb if color_space == "RGB" else rgb2ycbcr(rgb)


def bare_forward(model: str, scale: int, files: list[tuple[str, bytes]], args: argparse.Namespace,
                 storage_options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Time ``upscale_tensor`` over every image, already decoded to tensors on the device (after one warm-up)."""
    import torch

    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.io.images import decode_image, to_float
    from srbatch.models.loader import load_model

    desc = load_model(model, scale=scale, storage_options=storage_options)
    overlap = min(desc.info.receptive_halo or 0, 32)  # as the job's actors
    up = Upscaler(desc, device=args.device, dtype=args.dtype, tiling=TilingConfig(tile=args.tile, overlap=overlap))
    dev = up.device
    xs = []
    for name, data in files:
        img = decode_image(data, name=name)
        x = torch.from_numpy(to_float(img.pixels)).permute(2, 0, 1)[None]
        xs.append(_model_input(x, desc.info.color_space).contiguous().to(dev))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    t = time.perf_counter()
    up.upscale_tensor(xs[0])  # warm-up: allocator, kernels, cuDNN autotuning
    sync()
    warmup_s = time.perf_counter() - t
    per_image = []
    t = time.perf_counter()
    for x in xs:
        t_i = time.perf_counter()
        y = up.upscale_tensor(x)
        if dev.type != "cuda":  # on CUDA a per-image sync would serialise the host: only the total is timed there
            per_image.append(time.perf_counter() - t_i)
    sync()
    seconds = time.perf_counter() - t
    out_shape = tuple(int(v) for v in y.shape)
    result = {
        "model_name": desc.name or desc.architecture,
        "architecture": desc.architecture,
        "parameters": desc.num_parameters(),
        "model_scale": desc.scale,
        "color_space": desc.info.color_space,
        "device": str(dev),
        "dtype": str(up.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "warmup_s": warmup_s,
        "seconds": seconds,
        "images": len(xs),
        "images_per_s": len(xs) / seconds if seconds > 0 else math.inf,
        "s_per_image": seconds / len(xs),
        "per_image_s": per_image,
        "last_output_shape": out_shape,
    }
    del xs, y, up, desc
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the job's actor
    return result


# --------------------------------------------------------------------------------------------------- (b) end-to-end


def steady_state(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput after each actor's first batch, from the manifest's ``finished_at``.

    An actor stamps the rows of a batch together, at its end, so its rows fall in groups one per batch: a new group
    starts when the gap to the previous row exceeds half the shortest per-image work (decode + infer + encode) seen
    on that actor (no batch can finish sooner after the previous one). The actor's rate is (rows after its first
    group) / (its last stamp - the end of its first group); the figure is the sum over actors (they run side by side).
    None when some actor finished only one batch (too few images for a steady state).
    """
    by_actor: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_actor.setdefault(str(r.get("actor_id")), []).append(r)
    total, per_actor = 0.0, {}
    for actor, rs in by_actor.items():
        rs.sort(key=lambda r: r["finished_at"])
        work = [sum(r.get(k) or 0.0 for k in ("decode_s", "infer_s", "encode_s")) for r in rs]
        gap = 0.5 * min(work)
        groups = [[rs[0]]]
        for prev, r in zip(rs, rs[1:]):
            if (r["finished_at"] - prev["finished_at"]).total_seconds() > gap:
                groups.append([])
            groups[-1].append(r)
        if len(groups) < 2:
            return {"images_per_s": None, "per_actor": None, "reason": f"actor {actor[:12]} finished one batch only"}
        span = (groups[-1][-1]["finished_at"] - groups[0][-1]["finished_at"]).total_seconds()
        rate = (len(rs) - len(groups[0])) / span if span > 0 else math.inf
        per_actor[actor] = {"images": len(rs), "batches": len(groups), "images_per_s": rate}
        total += rate
    return {"images_per_s": total, "per_actor": per_actor, "reason": None}


def end_to_end(model: str, store: Storage, n_expected: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the upscale job on the benchmark's inputs and read its manifest."""
    import ray

    from srbatch.upscale import UpscaleConfig, read_manifest, run_job
    from srbatch.upscale.runner import resources_for

    run_id = f"bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    output = store.uri("out", run_id)
    extra: dict[str, Any] = {}
    if args.device == "cpu":
        extra["gpus_per_actor"] = 0.0  # a CPU model must not hold a GPU it does not use
    cfg = UpscaleConfig(
        input=store.uri("in"), output=output, model=model, scale=args.scale, tile=args.tile, dtype=args.dtype,
        device=args.device, batch_size=args.batch_size, actors=args.actors, force=True, progress=False, run_id=run_id,
        endpoint_url=store.endpoint, **extra,
    )  # fmt: skip
    pool = resources_for(cfg, ray.cluster_resources())
    stream = sys.stderr if args.json else sys.stdout
    wall0 = datetime.now(timezone.utc)
    res = run_job(cfg, stream=stream)
    stream.flush()
    table = read_manifest(output, store.options)
    rows = [r for r in (table.to_pylist() if table is not None else []) if r["run_id"] == run_id]
    ok = [r for r in rows if r["status"] == "ok"]
    stages = {}
    for k in ("read_s", "decode_s", "infer_s", "encode_s", "write_s", "total_s"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        stages[k] = sum(vals) / len(vals) if vals else None
    infer_sum = sum(r["infer_s"] or 0.0 for r in ok)
    first = min((r["finished_at"] for r in ok), default=None)
    return {
        "run_id": run_id,
        "output": output,
        "exit_code": res.exit_code,
        "total": res.total,
        "ok": res.ok,
        "failed": res.failed,
        "failures": res.failures[:10],
        "expected": n_expected,
        "pipeline_seconds": res.pipeline_seconds,
        "seconds": res.seconds,
        "images_per_s": res.throughput,
        "call_images_per_s": res.processed / res.seconds if res.seconds > 0 else 0.0,
        "steady": steady_state(ok) if ok else {"images_per_s": None, "per_actor": None, "reason": "no ok rows"},
        "first_result_s": (first - wall0).total_seconds() if first is not None else None,
        "stage_means_s": stages,
        "actor_infer_images_per_s": len(ok) / infer_sum if infer_sum > 0 else None,
        "per_image_infer_s": [r["infer_s"] for r in sorted(ok, key=lambda r: r["finished_at"])],
        "per_image_encode_s": [r["encode_s"] for r in sorted(ok, key=lambda r: r["finished_at"])],
        "devices": sorted({str(r.get("device")) for r in ok}),
        "dtypes": sorted({str(r.get("dtype")) for r in ok}),
        "actors": pool["actors"],
        "actor_torch_threads": pool["torch_threads"],
        "cpus_per_actor": pool["cpus_per_actor"],
        "gpus_per_actor": pool["gpus_per_actor"],
    }


# --------------------------------------------------------------------------------------------------- report


def machine_info(device: str) -> dict[str, Any]:
    import torch

    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info = {"cpu": cpu, "cpus": usable, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "gpu": None}  # fmt: skip
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        info["gpu"] = f"{torch.cuda.get_device_name(idx)} (CUDA {torch.version.cuda})"
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        info["load_avg_1m"] = None
    return info


def _fmt(v: float | None, unit: str = "", digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def render(r: dict[str, Any]) -> str:
    m, b, e = r["machine"], r["bare"], r["e2e"]
    st = e["stage_means_s"]
    dev = b["device"] + (f" = {m['gpu']}" if m.get("gpu") else "")
    steady = e["steady"]
    if steady["images_per_s"] is not None:
        steady_txt = f"{steady['images_per_s']:.3f} images/s   after each actor's first batch (manifest finished_at)"
    else:
        steady_txt = f"n/a ({steady['reason']}; use more --images)"
    ratio_steady = _ratio(r["ratio_steady"])
    rows = [
        ("machine", f"{m['cpu']}, {m['cpus']} CPUs, load avg {_fmt(m.get('load_avg_1m'), digits=2)} at start; "
                    f"torch {m['torch']}, Python {m['python']}"),
        ("device", f"{dev}, {b['dtype']}; torch threads: bare {b['torch_threads']}, job actor "
                   f"{e['actor_torch_threads'] if e['actor_torch_threads'] else 'torch default'}"),
        ("model", f"{b['model_name']} ({b['architecture']}, {b['color_space']}), {b['parameters']:,} parameters, "
                  f"{r['model_note']}"),
        ("scale", f"x{b['model_scale']}"),
        ("images", f"{r['n_images']} x {r['image_size']}, {r['inputs']}"),
        ("storage", r["storage"] + (" (temporary, removed at the end)" if r["storage"].startswith("local") else "")),
        ("tiling", "whole image (tile 0)" if r["tile"] == 0 else f"tile {r['tile']} px"),
        ("job pool", f"{e['actors']} actor(s), {e['gpus_per_actor']:g} GPU + {e['cpus_per_actor']:g} CPU each, "
                     f"batch size {r['batch_size']}"),
        ("", ""),
        ("(a) bare forward", f"{b['images_per_s']:.3f} images/s   ({b['s_per_image']:.3f} s/image, "
                             f"{b['images']} images in {b['seconds']:.2f} s after a {b['warmup_s']:.2f} s warm-up)"),
        ("(b) end-to-end", f"{e['images_per_s']:.3f} images/s   {e['ok']} images in {e['pipeline_seconds']:.2f} s of "
                           "pipeline (includes Ray Data start, actor start and model load)"),
        ("    whole call", f"{e['call_images_per_s']:.3f} images/s   run_job {e['seconds']:.2f} s (plus driver "
                           "model check, planning and manifest)"),
        ("    steady state", steady_txt),
        ("    first result", f"{_fmt(e['first_result_s'], ' s')} after run_job was called"),
        ("ratio e2e/bare", f"{_ratio(r['ratio'])} (pipeline), {ratio_steady} (steady state); goal >= {GOAL_RATIO}"),
        ("", ""),
        ("actor stages", "mean s/image: " + ", ".join(f"{k[:-2]} {_fmt(st[k])}" for k in
                                                     ("read_s", "decode_s", "infer_s", "encode_s", "write_s"))),
        ("actor infer only", f"{_fmt(e['actor_infer_images_per_s'], ' images/s')} (images / sum of infer_s: "
                             "forward + colour conversion + quantisation in the actor)"),
        ("per-image forward", f"min / median s: bare {_min_med(b['per_image_s'])}, actor infer "
                              f"{_min_med(e['per_image_infer_s'])} (less sensitive to other processes' load)"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = ["srbatch benchmark: bare model forward vs end-to-end job (same images, same device)"]
    lines += [f"  {k:<{width}}  {v}".rstrip() for k, v in rows]
    load = m.get("load_avg_1m")
    if b["device"] == "cpu" and load is not None and load >= 0.5 * m["cpus"]:
        lines.append(
            f"  WARNING: the 1-minute load average was {load:.2f} on {m['cpus']} CPUs before the benchmark started: "
            "other processes competed for the CPUs, so the throughputs and their ratio are not reliable; rerun on an "
            "idle machine, or compare the minimum per-image times"
        )
    return "\n".join(lines)


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.2f}" if v >= 0.1 else f"{v:.2g}")


def _min_med(xs: list[float]) -> str:
    import statistics

    return f"{min(xs):.3f} / {statistics.median(xs):.3f}" if xs else "n/a"


# --------------------------------------------------------------------------------------------------- main


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    out = sys.stdout

    from srbatch.errors import SrbatchError

    try:
        # Everything read from the user's own storage is read first, before the S3 server's variables are set.
        inputs = user_inputs(args.input, args.images) if args.input else synthetic_inputs(args.images, args.size)
        remote_ckpt = _copy_remote_checkpoint(args.model)
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
        "storage": store.describe() if args.storage == "local" else "s3 (moto server on 127.0.0.1, for this run)",
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
