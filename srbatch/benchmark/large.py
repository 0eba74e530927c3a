"""Large-image benchmark: peak memory and time of upscaling one big photo or one gigapixel TIFF.

    python jobs/benchmark.py large photo --size 6000x4000 --scale 4 --model bicubic
    python jobs/benchmark.py large photo --size 1500x1000 --scale 4 --model default --sink engine
    python jobs/benchmark.py large tiff --size 20000x20000 --scale 2 --model bicubic

Each measurement runs in a fresh child process, so its peak RSS (``VmHWM``) is its own:

- ``--sink job`` (default): the upscale job's actor code (:class:`~srbatch.upscale.worker.UpscaleWorker`, outside Ray)
  handed a batch of one image: read, decode (or open the TIFF for region reads), upscale under the memory budget,
  encode and write, exactly as an actor does.
- ``--sink engine``: :func:`~srbatch.io.images.decode_image` -> :meth:`Upscaler.upscale_image
  <srbatch.inference.Upscaler.upscale_image>` -> :func:`~srbatch.io.images.encode_image` (PNG), the in-memory API.
  With ``--pythonpath DIR`` the child imports srbatch from another checkout (e.g. the commit before a change), so
  "before" and "after" are measured by the same command on the same machine.

The baseline is the child's RSS after the model is loaded and before the image is read; the figure of merit is
``(peak - baseline) / output bytes`` (the output as uint8/uint16 samples). ``photo`` inputs are a deterministic
synthetic RGB PNG (smooth gradients, edges and noise, so PNG compresses them like a photo, not like flat colour);
``tiff`` inputs a 16-bit grey tiled BigTIFF (512x512 tiles, deflate) of the same kind of content, written band by
band. For ``tiff`` the output is checked: it opens in tifffile with the expected shape and dtype, and a sampled
region equals upscaling that region (with its context) on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _size(text: str) -> tuple[int, int]:
    from srbatch.benchmark.measure import size_arg  # not at the top: the child imports srbatch from --pythonpath

    return size_arg(text, minimum=8)


def build_parser(prog: str = "jobs/benchmark.py large") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Peak memory and time of upscaling one large photo (PNG) or one gigapixel 16-bit grey tiled "
        "TIFF, in a fresh child process (see the module docs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("case", choices=("photo", "tiff"), help="photo: RGB PNG; tiff: 16-bit grey tiled BigTIFF")
    p.add_argument("--size", type=_size, default=None, help="input WIDTHxHEIGHT [photo 6000x4000, tiff 20000x20000]")
    p.add_argument("--scale", type=int, default=None, help="upscaling factor [photo 4, tiff 2]")
    p.add_argument("--model", default="bicubic", help="model name or checkpoint path")
    p.add_argument("--sink", choices=("job", "engine"), default="job", help="what the child runs (module docs)")
    p.add_argument("--format", default=None, help="output format of the job sink [photo PNG, tiff TIFF]")
    p.add_argument("--max-memory", default=None, help="the job's --max-memory [auto]")
    p.add_argument("--workdir", default="/tmp/srbatch-bench-large", help="inputs (kept, reused) and outputs")
    p.add_argument("--pythonpath", default=None, help="import srbatch from this checkout in the child (engine sink)")
    p.add_argument("--keep-output", action="store_true", help="keep the output file")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    return p


# ------------------------------------------------------------------------------------------------------- inputs


def _content(y0: int, y1: int, width: int, height: int, channels: int, seed: int = 0) -> Any:
    """Rows [y0, y1) of a deterministic test picture in [0, 1]: gradients, rings (edges at every angle) and noise."""
    import numpy as np

    yy = np.arange(y0, y1, dtype=np.float32)[:, None] / height
    xx = np.arange(width, dtype=np.float32)[None, :] / width
    planes = []
    for c in range(channels):
        r = np.sqrt((xx - 0.3 - 0.1 * c) ** 2 + (yy - 0.6) ** 2)
        v = 0.45 + 0.25 * np.sin(60 * r + c) * np.exp(-3 * r) + 0.2 * (xx * (1 - yy)) - 0.1 * c * yy
        v += 0.15 * (np.sin(400 * xx + 3 * c) > 0.7) * (yy > 0.5)
        planes.append(v)
    rng = np.random.default_rng([seed, y0])
    img = np.stack(planes, axis=-1) + rng.normal(0, 0.02, (y1 - y0, width, channels)).astype(np.float32)
    return np.clip(img, 0, 1)


def make_photo(path: Path, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image

    if path.exists():
        return
    pix = (_content(0, height, width, height, 3) * 255 + 0.5).astype(np.uint8)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(pix, "RGB").save(tmp, "PNG", compress_level=6)
    os.replace(tmp, path)


def make_tiff(path: Path, width: int, height: int) -> None:
    import numpy as np

    from srbatch.io.tiff import write_tiled_tiff

    if path.exists():
        return
    band = 512

    def bands() -> Any:
        for y0 in range(0, height, band):
            y1 = min(y0 + band, height)
            yield (_content(y0, y1, width, height, 1) * 65535 + 0.5).astype(np.uint16)

    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        write_tiled_tiff(fh, bands(), height=height, width=width, channels=1, dtype=np.uint16, tile=(512, 512),
                         level=1)  # fmt: skip
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ the child


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    import numpy as np

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def peak() -> int:
        try:
            from srbatch.inference.memory import peak_rss

            return int(peak_rss() or status("VmHWM"))
        except ImportError:  # an older checkout
            return status("VmHWM")

    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if spec["sink"] == "job":
        from srbatch.upscale.config import UpscaleConfig
        from srbatch.upscale.worker import UpscaleWorker

        cfg = UpscaleConfig(input=spec["input"], output=str(Path(spec["output"]).parent), model=spec["model"],
                            scale=spec["scale"], format=spec["format"], device="cpu", max_memory=spec["max_memory"],
                            progress=False)  # fmt: skip
        worker = UpscaleWorker(cfg.model_dump(), fingerprint="benchmark")
        gc.collect()
        base = status("VmRSS")
        t = time.perf_counter()
        table = worker({"input_uri": np.array([spec["input"]]), "output_uri": np.array([spec["output"]]),
                        "run_id": np.array(["benchmark"])})  # fmt: skip
        secs = time.perf_counter() - t
        row = table.to_pylist()[0]
        result.update(
            {k: row.get(k) for k in ("status", "error_type", "error_message", "output_width", "output_height",
                                     "output_bytes", "tile_height", "tile_width", "tile_exact", "read_s",
                                     "decode_s", "infer_s", "encode_s", "write_s")}  # fmt: skip
        )
        result["budget"] = worker.up.budget()
        result["probes"] = worker.up.stats.get("probes")
        result["regions"] = worker.up.stats.get("regions")
    else:
        from srbatch.inference import Upscaler
        from srbatch.io.images import decode_image, encode_image
        from srbatch.models.loader import load_model

        desc = load_model(spec["model"], scale=spec["scale"])
        up = Upscaler(desc, device="cpu")
        gc.collect()
        base = status("VmRSS")
        t = time.perf_counter()
        img = decode_image(Path(spec["input"]).read_bytes(), name=spec["input"])
        t1 = time.perf_counter()
        out = up.upscale_image(img)
        t2 = time.perf_counter()
        data = encode_image(out, format="PNG")
        t3 = time.perf_counter()
        Path(spec["output"]).write_bytes(data)
        secs = time.perf_counter() - t
        result.update(status="ok", output_width=out.width, output_height=out.height, output_bytes=len(data),
                      decode_s=t1 - t, infer_s=t2 - t1, encode_s=t3 - t2)  # fmt: skip
        plan = getattr(up, "last_plan", None)
        if plan is not None and plan.tile is not None:
            result.update(tile_height=plan.tile[0], tile_width=plan.tile[1])
    result.update(baseline=base, peak=peak(), seconds=secs)
    return result


# ------------------------------------------------------------------------------------------------------ checks


def check_tiff(inp: Path, out: Path, model: str, scale: int, *, side: int = 384, margin: int = 64) -> dict[str, Any]:
    """The output opens in tifffile with the expected shape and dtype, and the region at the centre of the image
    (crossing a 512-pixel tile seam) equals upscaling that region with ``margin`` pixels of context on its own."""
    import numpy as np
    import tifffile

    from srbatch.inference import Upscaler
    from srbatch.io.images import DecodedImage
    from srbatch.io.tiff import TiffSource
    from srbatch.models.loader import load_model

    with tifffile.TiffFile(out) as tf:
        page = tf.pages[0]
        info = {"shape": list(page.shape), "dtype": str(page.dtype), "bigtiff": tf.is_bigtiff,
                "tiled": page.is_tiled, "tile": list(page.tilelength and (page.tilelength, page.tilewidth) or [])}
    with open(inp, "rb") as f_in, open(out, "rb") as f_out:
        src, dst = TiffSource(f_in, name=str(inp)), TiffSource(f_out, name=str(out))
        h, w = src.height, src.width
        y0, x0 = h // 2 - side // 2 + 7, w // 2 - side // 2 + 13  # off the tile grid, crossing a seam
        ya, xa = max(y0 - margin, 0), max(x0 - margin, 0)
        crop = src.read_region(ya, y0 + side + margin, xa, x0 + side + margin)
        up = Upscaler(load_model(model, scale=scale), device="cpu")
        alone = up.upscale_image(DecodedImage(pixels=np.ascontiguousarray(crop))).pixels
        oy, ox = (y0 - ya) * scale, (x0 - xa) * scale
        alone = alone[oy : oy + side * scale, ox : ox + side * scale]
        tiled = dst.read_region(y0 * scale, (y0 + side) * scale, x0 * scale, (x0 + side) * scale)
        src.close()
        dst.close()
    diff = np.abs(alone.astype(np.int64) - tiled.astype(np.int64))
    info.update(region=[y0, x0, side], max_diff=int(diff.max()), differing=int((diff > 0).sum()),
                region_pixels=int(diff.size))  # fmt: skip
    return info


# ------------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None, *, prog: str = "jobs/benchmark.py large") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(json.loads(argv[1]))), flush=True)
        return 0
    a = build_parser(prog).parse_args(argv)
    photo = a.case == "photo"
    width, height = a.size or ((6000, 4000) if photo else (20000, 20000))
    scale = a.scale or (4 if photo else 2)
    fmt = (a.format or ("PNG" if photo else "TIFF")).upper()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inp = work / (f"photo-{width}x{height}.png" if photo else f"grey16-{width}x{height}.tif")
    t = time.perf_counter()
    (make_photo if photo else make_tiff)(inp, width, height)
    prep = time.perf_counter() - t
    ext = {"PNG": "png", "TIFF": "tif", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    out = work / f"out-{a.case}-{a.model.replace('/', '_')}-x{scale}-{a.sink}.{ext}"
    spec = {"sink": a.sink, "input": str(inp), "output": str(out), "model": a.model, "scale": scale, "format": fmt,
            "max_memory": a.max_memory}  # fmt: skip
    env = dict(os.environ)
    if a.pythonpath:
        env["PYTHONPATH"] = a.pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load = os.getloadavg()[0]
    # the child runs this file as a script, so with --pythonpath every srbatch import comes from the other checkout
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                           capture_output=True, text=True)  # fmt: skip
    if child.returncode != 0:
        print(child.stderr[-4000:], file=sys.stderr)
        print(f"benchmark large: the child failed with exit code {child.returncode}", file=sys.stderr)
        return 1
    r = json.loads(child.stdout.strip().splitlines()[-1])
    channels = 3 if photo else 1
    itemsize = 1 if photo else 2
    out_bytes = width * scale * height * scale * channels * itemsize
    r.update(case=a.case, model=a.model, sink=a.sink, width=width, height=height, scale=scale, format=fmt,
             output_samples_bytes=out_bytes, prepare_s=prep, load_avg_1m=load, pythonpath=a.pythonpath,
             input_file_bytes=inp.stat().st_size)  # fmt: skip
    r["over_baseline"] = r["peak"] - r["baseline"]
    r["ratio"] = r["over_baseline"] / out_bytes
    code = 0 if r.get("status") == "ok" else 1
    if a.case == "tiff" and code == 0 and fmt == "TIFF":
        r["check"] = check_tiff(inp, out, a.model, scale)
    from srbatch.benchmark.report import machine_info

    r["machine"] = machine_info("cpu")
    gib = 1024**3
    m = r["machine"]
    print(f"large {a.case}: {width}x{height} -> {width * scale}x{height * scale} x{scale}, model {a.model}, "
          f"sink {a.sink}, {fmt}{' (srbatch from ' + a.pythonpath + ')' if a.pythonpath else ''}; "
          f"{m.get('cpu')} x{m.get('cpus')}, torch {m.get('torch')}, load {load:.2f}, torch threads "
          f"{r['torch_threads']}")
    if r.get("status") != "ok":
        print(f"  FAILED: {r.get('error_type')}: {r.get('error_message')}")
    print(f"  time {r['seconds']:.1f} s (decode {r.get('decode_s') or 0:.1f}, infer {r.get('infer_s') or 0:.1f}, "
          f"encode {r.get('encode_s') or 0:.1f}, write {r.get('write_s') or 0:.1f})")
    print(f"  output samples {out_bytes / gib:.3f} GiB; baseline RSS {r['baseline'] / gib:.3f} GiB; peak RSS "
          f"{r['peak'] / gib:.3f} GiB; peak - baseline {r['over_baseline'] / gib:.3f} GiB = {r['ratio']:.2f}x the "
          f"output")
    tile = f"{r.get('tile_height')}x{r.get('tile_width')}" if r.get("tile_height") else "untiled"
    print(f"  tiling: {tile} (exact: {r.get('tile_exact')}), regions {r.get('regions')}, budget "
          f"{(r.get('budget') or 0) / gib:.2f} GiB; output file {r.get('output_bytes') or 0:,} bytes")
    if "check" in r:
        c = r["check"]
        print(f"  output: shape {c['shape']} {c['dtype']}, BigTIFF {c['bigtiff']}, tiled {c['tiled']} {c['tile']}; "
              f"region {c['region']} vs upscaled alone: max |diff| {c['max_diff']}, {c['differing']} of "
              f"{c['region_pixels']} samples differ")
    if a.json:
        print(json.dumps(r, default=str))
    if not a.keep_output:
        try:
            out.unlink()
        except OSError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
