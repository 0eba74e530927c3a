"""The benchmark's printout: the machine it ran on and one table of both throughputs, their ratio and the stages."""

from __future__ import annotations

import os
import platform
from typing import Any

__all__ = ["GOAL_RATIO", "machine_info", "render"]

GOAL_RATIO = 0.9


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
