"""GPU check: what one GPU does with the upscale job's models, measured in one run of a few minutes.

    python -m srbatch.benchmark.gpu                 # on a CUDA machine (scripts/gpu-check.sh runs it there)
    python jobs/benchmark.py gpu --dry-run          # anywhere: tiny sizes on the CPU, every path that needs no CUDA

Printed, all measured in the same run:

- torch, CUDA, cuDNN and the device; the TF32 and cuDNN settings that decide the float32 figures;
- a bfloat16 matmul rate (8192^3, CUDA events, median of several timed runs): the reference TFLOP/s;
- model-only images/s of RRDBNet x4 (``esrgan``: 23 blocks, 64 features) and EDSR x4 (``edsr``: 32 blocks, 256
  features) on 512x512 inputs, bfloat16 and float32, through :meth:`Upscaler.upscale_tensor
  <srbatch.inference.Upscaler.upscale_tensor>` on inputs already on the device, best of batch sizes 1, 2, 4 (each a
  time-boxed loop between ``torch.cuda.synchronize`` calls, after a warm-up); the FLOPs of one forward counted by
  ``torch.utils.flop_counter.FlopCounterMode`` and the achieved TFLOP/s against the matmul rate (goal >= 40% for
  RRDBNet bfloat16);
- end-to-end images/s for RRDBNet x4 bfloat16 on 64 512x512 PNG files in a local folder, PNG out, without Ray:
  ``srbatch.upscale.stages.run_local`` (the stages pipeline) when it exists, and the fused actor class
  (:class:`~srbatch.upscale.worker.UpscaleWorker`, called as Ray Data calls it), each with its ratio to model-only
  (goal >= 0.8) and the GPU's utilisation while it ran (``nvidia-smi`` or pynvml, every 0.2 s);
- the ``channels_last=`` / ``compile=`` variants of the engine when :class:`~srbatch.inference.Upscaler` takes them.

Imports nothing of Ray, pydantic, s3fs or spandrel at module level: the device machine may lack them. Without
pydantic, ``srbatch.inference`` cannot be imported, so model-only calls the network directly (said in the output)
and the end-to-end part (it needs the job's config) is skipped. The Ray side (actors scheduled on GPUs) needs a Ray
cluster: ``jobs/benchmark.py --model rrdbnet --device cuda --dtype bfloat16`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["GOAL_E2E", "GOAL_MFU", "GpuPoller", "build_parser", "count_flops", "main", "matmul_rate", "model_only",
           "parse_smi"]  # fmt: skip

GOAL_MFU = 0.40
GOAL_E2E = 0.8
_SMI_QUERY = "--query-gpu=uuid,utilization.gpu,memory.used"


def build_parser(prog: str = "jobs/benchmark.py gpu") -> argparse.ArgumentParser:
    """The GPU check's argument parser."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Model-only and end-to-end images/s of RRDBNet x4 and EDSR x4 on one GPU, achieved TFLOP/s "
        "against a bf16 matmul measured in the same run, and GPU utilisation while the job's code runs (module docs).",
        epilog="Exit codes: 0 every part ran, 1 a part failed (the others still ran), 2 no CUDA device without "
        "--dry-run, or bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU (EDSR-baseline, 16x16, 4 images): every path that needs no CUDA")  # fmt: skip
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole check; parts that would start after it are skipped")  # fmt: skip
    p.add_argument("--measure-s", type=float, default=2.0, help="seconds of each timed loop")
    p.add_argument("--size", type=int, default=None, help="input side in pixels [512; dry run 16]")
    p.add_argument("--images", type=int, default=None, help="end-to-end images [64; dry run 4]")
    p.add_argument("--models", default=None, help="comma-separated models [esrgan,edsr; dry run edsr-baseline]")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated compute dtypes of model-only")
    p.add_argument("--e2e-model", default=None, help="end-to-end model [esrgan; dry run edsr-baseline]")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object (last line)")
    return p


# --------------------------------------------------------------------------------------------------- utilisation


def parse_smi(text: str, uuid: str | None = None) -> tuple[float, float] | None:
    """``(utilisation %, memory MiB)`` of the GPU ``uuid`` (any spelling, with or without ``GPU-``) in the output of
    ``nvidia-smi --query-gpu=uuid,utilization.gpu,memory.used --format=csv,noheader,nounits``; the first GPU when
    ``uuid`` is None or not listed; None when no line parses."""
    rows = []
    for line in text.strip().splitlines():
        parts = [v.strip() for v in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            rows.append((parts[0].lower().removeprefix("gpu-"), float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    if not rows:
        return None
    want = uuid.lower().removeprefix("gpu-") if uuid else None
    hit = next((r for r in rows if r[0] == want), rows[0])
    return hit[1], hit[2]


class GpuPoller:
    """Sample the GPU's utilisation and memory every ``interval`` s in a thread (pynvml when importable, else
    ``nvidia-smi``): ``start()``, then ``stop()`` returns the summary (``samples`` 0 when neither is there)."""

    def __init__(self, uuid: str | None = None, interval: float = 0.2) -> None:
        self.uuid, self.interval = uuid, interval
        self.samples: list[tuple[float, float]] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    def _reader(self) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            h = (pynvml.nvmlDeviceGetHandleByUUID("GPU-" + self.uuid.lower().removeprefix("gpu-")) if self.uuid
                 else pynvml.nvmlDeviceGetHandleByIndex(0))  # fmt: skip
            self.source = "pynvml"
            return lambda: (float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                            pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20)  # fmt: skip
        except Exception:  # noqa: BLE001 - no pynvml, or no driver: try nvidia-smi
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        self.source = "nvidia-smi"

        def read() -> tuple[float, float] | None:
            out = subprocess.run([smi, _SMI_QUERY, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=5, check=False)  # fmt: skip
            return parse_smi(out.stdout, self.uuid)

        return read

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                s = self._read()
            except Exception:  # noqa: BLE001 - a missed sample is not an error
                s = None
            if s is not None:
                self.samples.append(s)
            self._stop.wait(self.interval)

    def start(self) -> GpuPoller:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, name="gpu-poller", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        util = [u for u, _ in self.samples]
        return {
            "source": self.source,
            "samples": len(util),
            "util_mean": statistics.fmean(util) if util else None,
            "util_p50": statistics.median(util) if util else None,
            "memory_max_mib": max(m for _, m in self.samples) if self.samples else None,
        }


# --------------------------------------------------------------------------------------------------- measurements


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: Any, n: int, dtype: Any, seconds: float, reps: int = 5) -> dict[str, Any]:
    """TFLOP/s of ``n x n @ n x n`` in ``dtype``: warm-up, then ``reps`` timed runs of a calibrated number of
    matmuls (CUDA events on CUDA); the median and the best."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    _sync(device)
    t = time.perf_counter()
    torch.matmul(a, b, out=c)
    _sync(device)
    iters = max(1, min(10_000, int(seconds / reps / max(time.perf_counter() - t, 1e-7))))
    rates = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            secs = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            for _ in range(iters):
                torch.matmul(a, b, out=c)
            secs = time.perf_counter() - t
        rates.append(2 * n**3 * iters / secs / 1e12)
    del a, b, c
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "iters": iters, "reps": reps,
            "tflops": statistics.median(rates), "tflops_best": max(rates)}  # fmt: skip


def count_flops(module: Any, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward of ``module`` on an input of ``shape`` (FlopCounterMode: convolutions and matmuls, 2 per
    multiply-add), run on a copy on the meta device (no compute); on a CPU copy when a kernel has no meta version."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    for device in ("meta", "cpu"):
        try:
            m = copy.deepcopy(module).to(device, torch.float32).eval()
            x = torch.zeros(shape, device=device)
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                m(x)
            return int(fc.get_total_flops())
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def _engine(desc: Any, device: Any, dtype: str, batch: int, extra: dict[str, Any]) -> tuple[Any, str]:
    """A callable ``x -> y`` for model-only timing, and what it is."""
    try:
        from srbatch.inference import TilingConfig, Upscaler
    except ImportError as e:  # pydantic missing: srbatch.inference's TilingConfig is a pydantic model
        import torch

        dt = getattr(torch, dtype)
        module = desc.module.to(device, dt).eval()

        def direct(x: Any) -> Any:
            with torch.no_grad():
                return module(x.to(dt)).float()

        return direct, f"the network called directly ({e.name} is missing and srbatch.inference needs it)"
    up = Upscaler(desc, device=device, dtype=dtype, tiling=TilingConfig(tile=0, batch_size=batch), **extra)
    return up.upscale_tensor, "Upscaler.upscale_tensor"


def model_only(desc: Any, *, device: Any, dtype: str, size: int, batch_sizes: list[int], seconds: float,
               deadline: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Images/s of the engine on random inputs already on ``device``, for each batch size: one warm-up call, one
    timed call to calibrate, then a loop of about ``seconds`` between two synchronisations. The best batch wins."""
    import gc

    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", MemoryError)
    per: dict[int, dict[str, Any]] = {}
    how = None
    for b in batch_sizes:
        if time.perf_counter() > deadline:
            per[b] = {"skipped": "time budget"}
            continue
        fwd = x = y = None
        try:
            fwd, how = _engine(desc, device, dtype, b, dict(extra or {}))
            g = torch.Generator(device=device).manual_seed(b)
            x = torch.rand(b, desc.info.in_channels, size, size, device=device, generator=g)
            _sync(device)
            t = time.perf_counter()
            y = fwd(x)
            _sync(device)
            warmup_s = time.perf_counter() - t
            t = time.perf_counter()
            y = fwd(x)
            _sync(device)
            one = time.perf_counter() - t
            iters = max(1, min(100_000, int(seconds / max(one, 1e-7))))
            if one >= seconds or time.perf_counter() + iters * one > deadline:
                iters, secs = 1, one  # the calibration call is the measurement
            else:
                t = time.perf_counter()
                for _ in range(iters):
                    y = fwd(x)
                _sync(device)
                secs = time.perf_counter() - t
            per[b] = {"images_per_s": b * iters / secs, "iters": iters, "seconds": secs, "warmup_s": warmup_s,
                      "output_shape": list(y.shape), "finite": bool(torch.isfinite(y).all())}  # fmt: skip
        except oom as e:  # a result (this batch does not fit), not a failure
            per[b] = {"oom": str(e).splitlines()[0][:200]}
        except _Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - reported; the other batch sizes still run
            per[b] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            del fwd, x, y
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    done = {b: r for b, r in per.items() if "images_per_s" in r}
    best = max(done, key=lambda b: done[b]["images_per_s"]) if done else None
    return {"dtype": dtype, "size": size, "engine": how, "per_batch": per, "best_batch": best,
            "images_per_s": done[best]["images_per_s"] if best else None, "extra": dict(extra or {})}  # fmt: skip


# --------------------------------------------------------------------------------------------------- end to end


def _batch(inputs: list[str], outputs: list[str], run_id: str) -> dict[str, Any]:
    import numpy as np

    return {"input_uri": np.array(inputs), "output_uri": np.array(outputs), "run_id": np.array([run_id] * len(inputs))}


def _rows_summary(rows: list[dict[str, Any]], seconds: float, want: tuple[int, int]) -> dict[str, Any]:
    ok = [r for r in rows if r.get("status") == "ok"]
    stages = ("read_s", "decode_s", "infer_s", "encode_s", "write_s")
    return {
        "images": len(rows),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "failures": [f"{r.get('input_uri')}: {r.get('error_message')}" for r in rows if r.get("status") != "ok"][:3],
        "seconds": seconds,
        "images_per_s": len(ok) / seconds if seconds > 0 else None,
        "stage_means_s": {k: (statistics.fmean(r.get(k) or 0.0 for r in ok) if ok else None) for k in stages},
        "wrong_size": sum((r.get("output_width"), r.get("output_height")) != want for r in ok),
    }


def e2e_fused(cfg: Any, names: list[str], *, uuid: str | None, want: tuple[int, int]) -> dict[str, Any]:
    """Today's fused actor (:class:`~srbatch.upscale.worker.UpscaleWorker`) called as Ray Data calls it, batch after
    batch, in this process: read, decode, upscale, encode and write all in the actor; the model load and one warm-up
    image come before the clock."""
    from srbatch.io.storage import join_uri
    from srbatch.upscale.plan import output_key
    from srbatch.upscale.worker import UpscaleWorker

    t = time.perf_counter()
    w = UpscaleWorker(cfg.model_dump(), fingerprint="gpu-check")
    load_s = time.perf_counter() - t
    try:
        ins = [join_uri(cfg.input, n) for n in names]
        outs = [join_uri(cfg.output, output_key(n, cfg.format)) for n in names]
        w(_batch(ins[:1], [join_uri(cfg.output + "-warmup", output_key(names[0], cfg.format))], cfg.run_id))
        poller = GpuPoller(uuid).start()
        rows: list[dict[str, Any]] = []
        t = time.perf_counter()
        for i in range(0, len(ins), cfg.batch_size):
            rows += w(_batch(ins[i : i + cfg.batch_size], outs[i : i + cfg.batch_size], cfg.run_id)).to_pylist()
        seconds = time.perf_counter() - t
        util = poller.stop()
    finally:
        w.pool.shutdown(wait=True)
    return {**_rows_summary(rows, seconds, want), "load_s": load_s, "batch_size": cfg.batch_size, "gpu": util}


def e2e_local(cfg: Any, warm_cfg: Any, *, uuid: str | None, want: tuple[int, int]) -> dict[str, Any] | None:
    """``srbatch.upscale.stages.run_local`` (the stages pipeline without Ray), after one untimed run on one image;
    None when this srbatch has none."""
    try:
        from srbatch.upscale.stages import run_local
    except ImportError:
        return None
    t = time.perf_counter()
    warm = run_local(warm_cfg)
    warm_s = time.perf_counter() - t
    poller = GpuPoller(uuid).start()
    t = time.perf_counter()
    lr = run_local(cfg)
    wall = time.perf_counter() - t
    util = poller.stop()
    out = _rows_summary(lr.rows.to_pylist(), lr.seconds, want)
    out.update(images_per_s=lr.images_per_s, call_seconds=wall, gpu=util, warmup_call_s=warm_s,
               warmup_pipeline_s=warm.seconds, start_s=getattr(lr, "start_seconds", None))  # fmt: skip
    return out


def end_to_end(plan: dict[str, Any], device: Any, uuid: str | None) -> dict[str, Any]:
    """Both end-to-end measurements on ``plan["images"]`` PNGs of ``plan["size"]`` in a temporary local folder."""
    from srbatch.benchmark.prepare import Storage, prepare_model, synthetic_inputs
    from srbatch.io.storage import write_bytes
    from srbatch.upscale.config import UpscaleConfig

    store = Storage("local")
    try:
        inputs = synthetic_inputs(plan["images"], plan["size"])
        for name, data in inputs.files:
            write_bytes(store.uri("in", name), data)
        write_bytes(store.uri("warm", inputs.files[0][0]), inputs.files[0][1])
        model, note = prepare_model(plan["e2e_model"], 4, store)

        def cfg(inp: str, out: str) -> Any:
            return UpscaleConfig(input=store.uri(inp), output=store.uri(out), model=model, scale=4,
                                 device=device.type, dtype=plan["e2e_dtype"], format="PNG", force=True,
                                 progress=False, run_id=f"gpu-check-{out}")  # fmt: skip

        want = (4 * plan["size"], 4 * plan["size"])
        names = [n for n, _ in inputs.files]
        result: dict[str, Any] = {"model": plan["e2e_model"], "model_note": note, "dtype": plan["e2e_dtype"],
                                  "images": len(names), "size": plan["size"], "inputs": inputs.source}  # fmt: skip
        for key, run in (("fused", lambda: e2e_fused(cfg("in", "fused"), names, uuid=uuid, want=want)),
                         ("run_local", lambda: e2e_local(cfg("in", "local"), cfg("warm", "local-warmup"), uuid=uuid,
                                                         want=want))):  # fmt: skip
            try:
                result[key] = run()
                _say(f"end to end, {key}: " + ("not available" if result[key] is None else
                                               f"{_f(result[key]['images_per_s'])} images/s"))  # fmt: skip
            except _Stopped:
                raise
            except Exception as e:  # noqa: BLE001 - reported; the other measurement still runs
                result[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        return result
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------- the run


def _env(device: Any) -> dict[str, Any]:
    import platform

    import torch

    cudnn = torch.backends.cudnn
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": cudnn.version() if cudnn.is_available() else None, "device": str(device), "cpus": os.cpu_count(),
        "cudnn_benchmark": cudnn.benchmark, "cudnn_allow_tf32": _setting(lambda: cudnn.allow_tf32),
        "matmul_allow_tf32": _setting(lambda: torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": _setting(torch.get_float32_matmul_precision),
    }  # fmt: skip
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count, uuid=str(getattr(p, "uuid", "")) or None)  # fmt: skip
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()[:200]
    return info


def _setting(read: Any) -> Any:
    """A torch setting, or why it could not be read (newer torch moves some behind a new API)."""
    try:
        return read()
    except Exception as e:  # noqa: BLE001
        return f"unreadable ({type(e).__name__})"


def _plan(a: argparse.Namespace, dry: bool) -> dict[str, Any]:
    models = a.models.split(",") if a.models else (["edsr-baseline"] if dry else ["esrgan", "edsr"])
    return {
        "models": [m.strip() for m in models if m.strip()],
        "dtypes": [d.strip() for d in a.dtypes.split(",") if d.strip()],
        "batch_sizes": [1, 2] if dry else [1, 2, 4],
        "size": a.size or (16 if dry else 512),
        "images": a.images or (4 if dry else 64),
        "e2e_model": a.e2e_model or ("edsr-baseline" if dry else "esrgan"),
        "e2e_dtype": "float32" if dry else "bfloat16",  # bfloat16 convolutions crawl on most CPUs
        "matmul_n": 256 if dry else 8192,
        "measure_s": min(a.measure_s, 0.2) if dry else a.measure_s,
        "dry": dry,
    }


def _variants() -> list[dict[str, Any]]:
    """The engine options worth timing that this srbatch's Upscaler takes."""
    import inspect

    try:
        from srbatch.inference import Upscaler
    except ImportError:
        return []
    params = inspect.signature(Upscaler.__init__).parameters
    out = []
    if "channels_last" in params:
        out.append({"channels_last": True})
    if "compile" in params:
        out.append({"compile": True, **({"channels_last": True} if "channels_last" in params else {})})
    return out


def _measure_model(name: str, plan: dict[str, Any], device: Any, deadline: float, peak: float | None,
                   into: list[dict[str, Any]]) -> None:  # fmt: skip
    """Model-only figures of ``name`` x4 in every dtype of the plan, appended to ``into`` as they come."""
    import gc

    import torch

    from srbatch.models.loader import build_model

    torch.manual_seed(0)
    desc = build_model(name, scale=4)
    flops = count_flops(desc.module, (1, desc.info.in_channels, plan["size"], plan["size"]))
    entry = {"model": name, "architecture": desc.architecture, "parameters": desc.num_parameters(),
             "flops_per_image": flops, "runs": []}  # fmt: skip
    into.append(entry)
    for dtype in plan["dtypes"]:
        res = model_only(desc, device=device, dtype=dtype, size=plan["size"], batch_sizes=plan["batch_sizes"],
                         seconds=plan["measure_s"], deadline=deadline)  # fmt: skip
        _rates(res, flops, peak)
        entry["runs"].append(res)
        _say(f"{name} {dtype} model-only: {_f(res['images_per_s'])} images/s at batch {res['best_batch']}, "
             f"{_f(res['tflops'], '.3g')} TFLOP/s = {_f(res['fraction_of_matmul'], '.1%')} of the matmul")  # fmt: skip
    del desc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure_variants(entry: dict[str, Any], plan: dict[str, Any], device: Any, deadline: float,
                      peak: float | None) -> None:  # fmt: skip
    """The engine's ``channels_last`` / ``compile`` options (those it takes) on the first model in the first dtype,
    at the batch size that was best without them; appended to ``entry["runs"]``."""
    import torch

    from srbatch.models.loader import build_model

    dtype = "float32" if plan["dry"] else plan["dtypes"][0]  # bfloat16 convolutions crawl on most CPUs
    best = next((x for x in entry["runs"] if x["dtype"] == dtype and not x["extra"]), None)
    bs = [best["best_batch"]] if best and best["best_batch"] else plan["batch_sizes"][:1]
    for extra in _variants():
        if plan["dry"] and extra.get("compile"):
            entry["runs"].append({"dtype": dtype, "extra": extra, "skipped": "dry run (torch.compile on the CPU "
                                  "takes minutes)"})  # fmt: skip
            continue
        if time.perf_counter() > deadline - (120 if extra.get("compile") else 10):
            entry["runs"].append({"dtype": dtype, "extra": extra, "skipped": "time budget"})
            continue
        torch.manual_seed(0)
        desc = build_model(entry["model"], scale=4)
        res = model_only(desc, device=device, dtype=dtype, size=plan["size"], batch_sizes=bs,
                         seconds=plan["measure_s"], deadline=deadline, extra=extra)  # fmt: skip
        _rates(res, entry["flops_per_image"], peak)
        entry["runs"].append(res)
        _say(f"{entry['model']} {dtype} {extra}: {_f(res['images_per_s'])} images/s, "
             f"{_f(res['fraction_of_matmul'], '.1%')} of the matmul")  # fmt: skip


def _measure_e2e(plan: dict[str, Any], device: Any, deadline: float, uuid: str | None) -> dict[str, Any]:
    try:
        import pydantic  # noqa: F401
    except ImportError:
        return {"skipped": "pydantic is missing: the end-to-end part needs the job's config (UpscaleConfig); "
                "install it (scripts/gpu-check.sh carries the wheels)"}  # fmt: skip
    if time.perf_counter() > deadline:
        return {"skipped": "time budget"}
    try:
        return end_to_end(plan, device, uuid)
    except _Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - reported; the variants still run
        return {"error": f"{type(e).__name__}: {e}"}


class _Stopped(Exception):
    """SIGTERM (``timeout`` stopping the check): report what was measured so far."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped()


def run_check(a: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in order (matmul, model-only, end to end, engine variants), each skipped once the budget
    is spent; returns the results, also those measured before a SIGTERM when :func:`main` set the handler."""
    import torch

    t_start = time.perf_counter()
    deadline = t_start + a.budget
    dry = a.dry_run
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    plan = _plan(a, dry)
    r: dict[str, Any] = {"dry_run": dry, "plan": plan, "env": _env(device), "errors": [], "matmul": None,
                         "models": [], "e2e": None}  # fmt: skip
    try:
        try:
            r["matmul"] = matmul_rate(device, plan["matmul_n"], torch.bfloat16, 1.0 if not dry else 0.1)
        except _Stopped:
            raise
        except Exception as e:  # noqa: BLE001
            r["errors"].append(f"matmul: {type(e).__name__}: {e}")
        peak = r["matmul"]["tflops"] if r["matmul"] else None
        _say(f"bf16 matmul {plan['matmul_n']}^3: {_f(peak, '.3g')} TFLOP/s")
        for name in plan["models"]:
            _measure_model(name, plan, device, deadline, peak, into=r["models"])
        if not dry and time.perf_counter() > deadline - 60:
            r["e2e"] = {"skipped": "time budget (the end-to-end part needs about a minute)"}
        else:
            r["e2e"] = _measure_e2e(plan, device, deadline, r["env"].get("uuid"))
        if r["models"]:
            _measure_variants(r["models"][0], plan, device, deadline, peak)
    except _Stopped:
        r["errors"].append("stopped by SIGTERM (the time limit) before the end: the figures above are those "
                           "measured until then")  # fmt: skip
    _e2e_ratios(r)
    for m in r["models"]:
        for run in m["runs"]:
            for b, br in run.get("per_batch", {}).items():
                if "error" in br:
                    r["errors"].append(f"{m['model']} {run['dtype']} {run['extra']} batch {b}: {br['error']}")
    e2e = r["e2e"] or {}
    r["errors"] += [f"e2e: {e2e['error']}"] if "error" in e2e else []
    for key in ("fused", "run_local"):
        v = e2e.get(key)
        if isinstance(v, dict) and ("error" in v or v.get("failed") or v.get("wrong_size")):
            r["errors"].append(f"e2e {key}: {v.get('error') or v.get('failures') or 'outputs of the wrong size'}")
    r["seconds"] = time.perf_counter() - t_start
    return r


def _say(msg: str) -> None:
    """Progress on stderr, so that a check stopped by a timeout still shows what it measured."""
    print(f"gpu check: {msg}", file=sys.stderr, flush=True)


def _rates(res: dict[str, Any], flops: int, peak: float | None) -> None:
    ips = res.get("images_per_s")
    res["tflops"] = flops * ips / 1e12 if ips else None
    res["fraction_of_matmul"] = res["tflops"] / peak if res["tflops"] and peak else None


def _e2e_ratios(r: dict[str, Any]) -> None:
    e2e = r.get("e2e") or {}
    if "model" not in e2e:
        return
    base = None
    for m in r["models"]:
        if m["model"] == e2e["model"]:
            base = next((x.get("images_per_s") for x in m["runs"] if x["dtype"] == e2e["dtype"] and not x["extra"]),
                        None)  # fmt: skip
    e2e["model_only_images_per_s"] = base
    for key in ("fused", "run_local"):
        v = e2e.get(key)
        if isinstance(v, dict) and v.get("images_per_s") and base:
            v["ratio_to_model_only"] = v["images_per_s"] / base


# --------------------------------------------------------------------------------------------------- printout


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _util(g: dict[str, Any]) -> str:
    if not g or not g.get("samples"):
        why = "no nvidia-smi or pynvml" if not g or not g["source"] else "no samples"
        return f"GPU utilisation: not measured ({why})"
    return (f"GPU utilisation ({g['source']}, {g['samples']} samples every 0.2 s): mean {g['util_mean']:.0f}%, p50 "
            f"{g['util_p50']:.0f}%, memory up to {g['memory_max_mib']:.0f} MiB")  # fmt: skip


def render(r: dict[str, Any]) -> str:
    """The printout."""
    env, plan = r["env"], r["plan"]
    head = "srbatch GPU check" + (" -- DRY RUN on the CPU (tiny sizes; the figures mean nothing)" if r["dry_run"]
                                  else "")
    lines = [
        head,
        f"  python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, {env['cpus']} CPUs",
        f"  device {env['device']}" + (f": {env['gpu']} (sm {env['capability']}, {env['gpu_memory_gib']} GiB, "
                                       f"{env['sms']} SMs)" if env.get("gpu") else ""),
        f"  settings: cudnn.benchmark {env['cudnn_benchmark']}, cudnn.allow_tf32 {env['cudnn_allow_tf32']}, "
        f"matmul.allow_tf32 {env['matmul_allow_tf32']}, float32 matmul precision {env['float32_matmul_precision']}",
    ]  # fmt: skip
    if env.get("nvidia_smi"):
        lines.append(f"  nvidia-smi: {env['nvidia_smi']}")
    mm = r["matmul"]
    lines.append(f"  bf16 matmul {mm['n']}^3: {mm['tflops']:.3g} TFLOP/s median of {mm['reps']} x {mm['iters']} "
                 f"(best {mm['tflops_best']:.3g})" if mm else "  bf16 matmul: failed")  # fmt: skip
    for m in r["models"]:
        lines.append(f"  {m['model']} ({m['architecture']}, {m['parameters']:,} parameters) x4 on {plan['size']}x"
                     f"{plan['size']}: {m['flops_per_image'] / 1e9:.1f} GFLOP per image (FlopCounterMode)")  # fmt: skip
        for run in m["runs"]:
            extra = "".join(f", {k}" for k, v in run["extra"].items() if v)
            label = f"    model-only {run['dtype']}{extra}"
            if "skipped" in run:
                lines.append(f"{label}: skipped ({run['skipped']})")
                continue
            per = "; ".join(f"b{b} " + (_f(x.get("images_per_s")) if "images_per_s" in x else
                                        x.get("skipped") or ("OOM" if "oom" in x else "ERROR " + x.get("error", "")))
                            for b, x in run["per_batch"].items())  # fmt: skip
            goal = ""
            if m["model"] == "esrgan" and run["dtype"] == "bfloat16" and run["fraction_of_matmul"] is not None:
                goal = f" (goal >= {GOAL_MFU:.0%}: {'met' if run['fraction_of_matmul'] >= GOAL_MFU else 'NOT met'})"
            warm = max((x.get("warmup_s") or 0.0 for x in run["per_batch"].values()), default=0.0)
            frac = run["fraction_of_matmul"]
            lines.append(f"{label}: {_f(run['images_per_s'])} images/s at batch {run['best_batch']} [{per}] = "
                         f"{_f(run['tflops'], '.3g')} TFLOP/s, {_f(frac and 100 * frac, '.0f')}% of the bf16 "
                         f"matmul{goal}; longest warm-up {warm:.2f} s; via {run['engine']}")  # fmt: skip
    e = r["e2e"] or {}
    if "skipped" in e or "error" in e:
        lines.append(f"  end to end: {e.get('skipped') or 'ERROR ' + e['error']}")
    elif e:
        lines.append(f"  end to end: {e['model']} x4 {e['dtype']}, {e['images']} PNG {e['size']}x{e['size']} in a "
                     f"local folder -> PNG; model-only {_f(e['model_only_images_per_s'])} images/s")  # fmt: skip
        for key, what in (("fused", "fused actor class (today's job actor, no Ray)"),
                          ("run_local", "stages pipeline without Ray (run_local)")):
            v = e.get(key)
            if v is None:
                lines.append(f"    {what}: not available (no srbatch.upscale.stages.run_local yet)")
            elif "error" in v:
                lines.append(f"    {what}: ERROR {v['error']}")
            else:
                ratio = v.get("ratio_to_model_only")
                st = ", ".join(f"{k.removesuffix('_s')} {_f(s and s * 1e3, '.1f')} ms"
                               for k, s in v["stage_means_s"].items())
                lines += [
                    f"    {what}: {_f(v['images_per_s'])} images/s ({v['ok']} ok, {v['failed']} failed, "
                    f"{v['wrong_size']} of the wrong size, {v['seconds']:.2f} s); e2e/model-only {_f(ratio, '.3f')} "
                    f"(goal >= {GOAL_E2E}: {'met' if ratio and ratio >= GOAL_E2E else 'NOT met'})",
                    f"      per image: {st}",
                    *([f"      run_local: {v['start_s']:.2f} s to start its process pool and load the model, "
                       f"before its clock; an untimed run on 1 image first ({v['warmup_call_s']:.2f} s)"]
                      if v.get("start_s") is not None else []),
                    f"      {_util(v.get('gpu'))}",
                ]  # fmt: skip
    lines.append("  Ray: not used here (the device machine has none); the Ray side is the same actor class, scheduled "
                 "by Ray Data: run `jobs/benchmark.py --model rrdbnet --device cuda --dtype bfloat16` on a cluster")
    lines.append(f"  took {r['seconds']:.1f} s; " + (f"{len(r['errors'])} errors: " + " | ".join(r["errors"])
                                                    if r["errors"] else "no errors"))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py gpu") -> int:
    """Run the GPU check; returns the exit code (0 every part ran, 1 a part failed, 2 no CUDA without --dry-run)."""
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.budget <= 0 or a.measure_s <= 0:
        p.error("--budget and --measure-s must be positive")
    bad = [d for d in a.dtypes.split(",") if d.strip() not in ("bfloat16", "float16", "float32")]
    if bad or not a.dtypes.strip():
        p.error(f"--dtypes: expected a comma-separated list of bfloat16, float16, float32; got {a.dtypes!r}")
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print(f"{prog}: no CUDA device here (torch {torch.__version__}, CUDA {torch.version.cuda}); run on a GPU "
              "machine, or use --dry-run to try every path on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        r = run_check(a)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(render(r), flush=True)
    if a.json:
        print(json.dumps(r, default=str), flush=True)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m srbatch.benchmark.gpu"))
