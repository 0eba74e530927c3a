"""The benchmark's two measurements: (a) the bare model forward on tensors already on the device, (b) the upscale job
end to end, with its steady-state throughput read from the manifest."""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from srbatch.benchmark.prepare import Storage

__all__ = ["bare_forward", "end_to_end", "size_arg", "steady_state"]


def size_arg(text: str, *, minimum: int = 1) -> tuple[int, int]:
    """``"6000x4000"`` -> ``(6000, 4000)`` for an argparse ``type=``; anything else is an argparse error."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 6000x4000; got {text!r}") from None
    if w < minimum or h < minimum:
        raise argparse.ArgumentTypeError(f"width and height must be at least {minimum}; got {text!r}")
    return w, h


def bare_forward(model: str, scale: int, files: list[tuple[str, bytes]], args: argparse.Namespace,
                 storage_options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Time ``upscale_tensor`` over every image, already decoded to tensors on the device (after one warm-up)."""
    import torch

    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.inference.colorspace import to_model_space
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
        xs.append(to_model_space(x, desc.info.color_space).contiguous().to(dev))  # as Upscaler.upscale_image feeds it

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
    from srbatch.jobkit.resources import plan_actors

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
    pool = plan_actors(cfg, ray.cluster_resources())
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
        "actors": pool.actors,
        "actor_torch_threads": pool.torch_threads,
        "cpus_per_actor": pool.cpus_per_actor,
        "gpus_per_actor": pool.gpus_per_actor,
    }
