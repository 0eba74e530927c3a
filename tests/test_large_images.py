"""Large images under a memory budget: regions equal the untiled result, the plan fits the budget, and the memory a
process really uses (peak RSS of a child process, not a mock) stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from srbatch.errors import ConfigError, InferenceError
from srbatch.inference import Upscaler
from srbatch.inference.memory import available_memory, format_bytes, measure_peak, parse_bytes, peak_rss, rss
from srbatch.inference.regions import plan_regions
from srbatch.io.images import DecodedImage
from srbatch.models.loader import build_model


def _forced(up: Upscaler, img: DecodedImage, core: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None, object]:
    """Run ``img`` through the region loop with cores of at most ``core`` (a plan forced by its ``fits``)."""
    pix, al = img.pixels, img.alpha
    h, w, c = pix.shape
    oh, ow = up.output_size(h, w)
    plan = plan_regions(
        height=h, width=w, out_height=oh, out_width=ow, halo=up.halo, multiple=max(up.info.size_multiple, 1),
        integer_scale=None if up.outscale is not None else up.info.scale,
        fits=lambda a, b: 1 if a <= core[0] and b <= core[1] else None, budget=1,
    )  # fmt: skip
    out = np.empty((oh, ow, c), pix.dtype)
    out_a = np.empty((oh, ow), pix.dtype) if al is not None else None

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        r = pix[y0:y1, x0:x1]
        return r if al is None else np.concatenate([r, al[y0:y1, x0:x1, None]], axis=2)

    bands = list(up.iter_bands(read, plan, channels=c, has_alpha=al is not None, dtype=pix.dtype, out=(out, out_a)))
    assert [b[0] for b in bands] == [a for a, _ in plan.out_rows]  # bands come in row order, one per row of regions
    return out, out_a, plan


def _image(h: int, w: int, c: int, dtype: type = np.uint8, alpha: bool = False, seed: int = 0) -> DecodedImage:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max
    # smooth content plus noise: random pixels alone would hide errors that only show on structure
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 0.5 + 0.3 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] + 0.1 * np.arange(c)
    noisy = np.clip(base + rng.normal(0, 0.05, (h, w, c)), 0, 1)
    pix = (noisy * hi + 0.5).astype(dtype)
    a = (rng.random((h, w)) * hi).astype(dtype) if alpha else None
    return DecodedImage(pixels=pix, alpha=a)


MODELS = {
    "bicubic-x3": lambda: build_model("bicubic", scale=3),
    "edsr-x2": lambda: build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16),
    "vdsr-x2-upsampled-input": lambda: build_model("vdsr", scale=2, num_layers=4, num_features=8),
    "rrdbnet-x2-multiple-of-2": lambda: build_model("rrdbnet", scale=2, num_block=1, num_feat=8, num_grow_ch=4),
    "fsrcnn-x2-y-model": lambda: build_model("fsrcnn", scale=2, d=16, s=8, m=2, channels=1),
}


def _net_rgb(desc, pix: np.ndarray) -> np.ndarray:
    """The RGB network alone on the float image, rounded like im2uint8."""
    return np.floor(np.clip(_net_rgb_float(desc, pix), 0, 1) * 255 + 0.5).astype(np.uint8)


def _net_rgb_float(desc, pix: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(pix.astype(np.float64) / 255).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return desc.module.float().cpu()(x)[0].permute(1, 2, 0).double().numpy()


def _matlab_bicubic(desc, pix: np.ndarray) -> np.ndarray:
    from srbatch.metrics.resize import imresize_uint8

    return imresize_uint8(pix, desc.info.scale)


INDEPENDENT = {
    "bicubic-x3": _matlab_bicubic,
    "edsr-x2": _net_rgb,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_regions_equal_the_untiled_image(name: str) -> None:
    torch.manual_seed(0)
    desc = MODELS[name]()
    assert desc.info.local is True
    up = Upscaler(desc, device="cpu")
    img = _image(61, 83, 3)  # odd sizes: the last core is not a multiple of anything
    whole = up.upscale_image(img).pixels
    assert up.last_plan is not None and not up.last_plan.tiled
    if name in INDEPENDENT:  # the untiled result itself against a path that does not go through the engine
        ref = INDEPENDENT[name](desc, img.pixels)
        assert np.abs(whole.astype(int) - ref.astype(int)).max() <= 1
    tiled, _, plan = _forced(up, img, (24, 30))
    assert plan.tiled and plan.regions >= 6, plan
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    print(f"{name}: {plan.regions} regions of {plan.tile}: max |diff| {diff.max()}, {int((diff > 0).sum())} samples")
    assert diff.max() <= 1  # float rounding only: the halo covers the receptive field
    assert (diff > 0).mean() < 0.01


def test_regions_16bit_grey_and_rgba() -> None:
    torch.manual_seed(0)
    up = Upscaler(build_model("edsr-baseline", scale=2, n_resblocks=2, n_feats=16), device="cpu")
    grey = _image(50, 70, 1, np.uint16)
    whole = up.upscale_image(grey)
    tiled, _, plan = _forced(up, grey, (20, 20))
    assert plan.tiled and whole.pixels.dtype == np.uint16
    assert np.abs(tiled.astype(int) - whole.pixels.astype(int)).max() <= 2  # 2 of 65535: float32 rounding
    rgba = _image(45, 52, 3, alpha=True)
    whole = up.upscale_image(rgba)
    tiled, tiled_a, plan = _forced(up, rgba, (16, 20))
    assert plan.tiled and tiled_a is not None and whole.alpha is not None
    assert np.abs(tiled.astype(int) - whole.pixels.astype(int)).max() <= 1
    assert np.abs(tiled_a.astype(int) - whole.alpha.astype(int)).max() <= 1  # alpha: MATLAB bicubic, exact rows
    from srbatch.metrics.resize import imresize_uint8

    assert np.abs(tiled_a.astype(int) - imresize_uint8(rgba.alpha, 2).astype(int)).max() <= 1


def test_regions_with_outscale() -> None:
    torch.manual_seed(0)
    up = Upscaler(build_model("edsr-baseline", scale=2, n_resblocks=1, n_feats=8), device="cpu", outscale=1.5)
    img = _image(40, 57, 3)
    whole = up.upscale_image(img).pixels
    assert whole.shape[:2] == (60, 86)
    from srbatch.metrics.resize import imresize  # the network at x2, then MATLAB bicubic to 60x86, in float64

    net = torch.from_numpy(_net_rgb_float(up.descriptor, img.pixels)).permute(2, 0, 1)
    ref = imresize(net, output_shape=(60, 86)).permute(1, 2, 0).numpy()
    assert np.abs(whole.astype(int) - np.floor(np.clip(ref, 0, 1) * 255 + 0.5).astype(int)).max() <= 1
    tiled, _, plan = _forced(up, img, (16, 16))
    assert plan.tiled
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


def test_a_global_model_is_marked_and_differs_when_tiled() -> None:
    """IMDN's channel attention pools over the whole image: a tiled run is not the untiled one (hence tile_exact)."""
    from srbatch.models.loader import load_model

    desc = load_model("default", scale=2)  # the shipped IMDN, trained weights
    assert desc.architecture == "imdn" and desc.info.local is False
    up = Upscaler(desc, device="cpu")
    img = _image(96, 96, 3)
    whole = up.upscale_image(img).pixels
    tiled, _, _ = _forced(up, img, (32, 32))
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    print(f"IMDN tiled vs untiled: max |diff| {diff.max()}, {(diff > 0).mean():.1%} of samples")
    assert diff.max() >= 1


def test_plan_follows_the_budget() -> None:
    desc = build_model("bicubic", scale=2)
    h, w = 1100, 1000  # above PROBE_PIXELS: planned from a measurement
    out_bytes = h * 2 * w * 2 * 3
    roomy = Upscaler(desc, device="cpu", max_memory="4GiB")
    plan = roomy.plan(h, w, channels=3, hold_input=True)
    assert not plan.tiled and plan.estimate is not None and plan.estimate <= 4 * 1024**3
    assert roomy.stats["probes"] == 1
    budget = out_bytes + h * w * 3 + 64 * 1024**2  # the held arrays plus 64 MiB of working memory
    tight = Upscaler(desc, device="cpu", max_memory=budget)
    plan = tight.plan(h, w, channels=3, hold_input=True)
    assert plan.tiled and plan.estimate is not None and plan.estimate <= budget
    assert plan.cols == ((0, w),)  # full-width bands first
    # streamed output: only a band is held, so the same budget allows taller bands
    streamed = tight.plan(h, w, channels=3, hold_input=True, hold_output=False)
    assert streamed.regions < plan.regions
    with pytest.raises(InferenceError, match="max-memory"):  # 108 MB of output held, 32 MiB allowed
        Upscaler(desc, device="cpu", max_memory="32MiB").plan(3000, 3000, channels=3)


def test_parse_bytes_and_memory_figures() -> None:
    assert parse_bytes("4GiB") == 4 * 1024**3
    assert parse_bytes("512MB") == 512 * 1000**2
    assert parse_bytes(" 2.5 g ") == int(2.5e9)
    assert parse_bytes("auto") is None and parse_bytes(None) is None
    for bad in ("lots", "4 parsecs", "1MB", True, "-3G"):
        with pytest.raises(ConfigError, match="max_memory"):
            parse_bytes(bad)
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert 0 < available_memory()
    before = rss()
    assert before is not None and before > 0
    grown = measure_peak(lambda: np.ones(200 * 1024**2, np.uint8), torch.device("cpu"))
    assert grown is not None and 190 * 1024**2 <= grown <= 260 * 1024**2
    # the peak before the reset is not forgotten
    assert peak_rss() >= before + 150 * 1024**2


def test_max_memory_in_the_job_config() -> None:
    from srbatch.upscale.config import load_config

    cfg = load_config(None, {"input": "in/", "output": "out/", "max_memory": "3GiB"})
    assert cfg.max_memory_bytes() == 3 * 1024**3
    assert load_config(None, {"input": "in/", "output": "out/"}).max_memory_bytes() is None
    with pytest.raises(ConfigError, match="max_memory.*4GiB"):
        load_config(None, {"input": "in/", "output": "out/", "max_memory": "plenty"})


_CHILD = textwrap.dedent(
    """
    import gc, json, sys, time
    import numpy as np
    from srbatch.inference import Upscaler
    from srbatch.inference.memory import peak_rss, rss
    from srbatch.io.images import DecodedImage
    from srbatch.models.loader import build_model
    h, w, s, budget = (int(v) for v in sys.argv[1:5])
    up = Upscaler(build_model("bicubic", scale=s), device="cpu", max_memory=budget)
    yy, xx = np.mgrid[0:h, 0:w]
    pix = np.stack([(xx * 7 + yy * 3) % 256, (xx * yy) % 256, (xx ^ yy) % 256], -1).astype(np.uint8)
    gc.collect()
    base = rss()
    out = up.upscale_image(DecodedImage(pixels=pix))
    peak = peak_rss()
    # an independent check of a few output pixels: MATLAB bicubic of the input at those rows, in float64
    from srbatch.metrics.resize import imresize_uint8
    ref = imresize_uint8(pix[:64, :64], s)
    diff = int(np.abs(out.pixels[:64 * s - 8, :64 * s - 8].astype(int) - ref[:64 * s - 8, :64 * s - 8].astype(int)).max())
    print(json.dumps({"base": base, "peak": peak, "tiled": up.last_plan.tiled, "regions": up.last_plan.regions,
                      "shape": list(out.pixels.shape), "diff": diff}))
    """
)


@pytest.mark.slow
def test_upscale_image_memory_stays_bounded_in_a_child_process() -> None:
    """A 2000x1500 RGB x4 (36 MP output, 108 MB as uint8) under a 256 MiB budget: the child's peak RSS over its
    baseline stays within the budget, about 2.5x the output at most (the old engine took ~30x)."""
    h, w, s = 1500, 2000, 4
    out_bytes = h * s * w * s * 3
    budget = 256 * 1024**2
    res = subprocess.run([sys.executable, "-c", _CHILD, str(h), str(w), str(s), str(budget)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    grew = r["peak"] - r["base"]
    print(f"peak over baseline {grew / 2**20:.0f} MiB for a {out_bytes / 2**20:.0f} MiB output "
          f"({grew / out_bytes:.2f}x), {r['regions']} regions")
    assert r["shape"] == [h * s, w * s, 3] and r["tiled"]
    assert r["diff"] <= 1
    assert grew <= budget * 1.1
    assert grew <= 2.5 * out_bytes


@pytest.mark.slow
def test_gigapixel_shaped_tiff_streams_with_bounded_memory(tmp_path) -> None:
    """The CI-sized case of the gigapixel benchmark: a 6000x6000 16-bit grey tiled TIFF, x2, through the job's actor
    code in a child process with a 96 MiB budget: regions are read tile by tile and the output written band by band
    as a tiled BigTIFF. The child's peak RSS over its baseline stays near the budget (the output alone is 275 MiB),
    the output opens in tifffile with the right shape and dtype, and a region crossing tile seams equals that region
    upscaled on its own."""
    res = subprocess.run(
        [sys.executable, "jobs/benchmark.py", "large", "tiff", "--size", "6000x6000", "--scale", "2",
         "--max-memory", "96MiB", "--workdir", str(tmp_path), "--keep-output", "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(res.stdout)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["status"] == "ok" and r["tile_height"] and r["tile_exact"] is True
    assert r["regions"] > 1
    c = r["check"]
    assert c["shape"] == [12000, 12000] and c["dtype"] == "uint16" and c["bigtiff"] and c["tiled"]
    assert c["max_diff"] <= 1  # float rounding only
    import tifffile

    from srbatch.metrics.resize import imresize_uint8

    # and against an independent path: tifffile's own reader and the float64 MATLAB bicubic, away from the crop edge
    grey = tifffile.imread(tmp_path / "grey16-6000x6000.tif", key=0)[2990:3110, 1490:1610]
    ref = imresize_uint8(grey, 2)[20:220, 20:220]
    out = tifffile.imread(tmp_path / "out-tiff-bicubic-x2-job.tif", key=0)[2 * 3000 : 2 * 3100, 2 * 1500 : 2 * 1600]
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    budget = 96 * 1024**2
    assert r["over_baseline"] <= 1.25 * budget, r["over_baseline"] / 2**20
    assert r["over_baseline"] < 0.5 * r["output_samples_bytes"]


def _tiff_bytes(arr: np.ndarray, tile: int = 256) -> bytes:
    import io

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, tile=(tile, tile), compression="zlib", bigtiff=True)
    return buf.getvalue()


@pytest.mark.slow
def test_job_on_s3_streams_a_large_tiff_and_fails_broken_ones(ray_cluster, s3_bucket) -> None:
    """Through the Ray job on the local S3 server with --max-memory 64MiB: a 3000x3000 16-bit TIFF is read region by
    region from S3 and written as a tiled BigTIFF equal to the engine's untiled output; a truncated and a corrupt TIFF
    are failed rows naming the file; a photo is tiled in memory and recorded as tiled."""
    import io

    import s3fs
    import tifffile
    from PIL import Image

    from srbatch.io.images import decode_image
    from srbatch.upscale import UpscaleConfig, run_job
    from srbatch.upscale.manifest import read_manifest

    fs = s3fs.S3FileSystem()
    yy, xx = np.mgrid[0:3000, 0:3000]
    grey = ((np.sin(xx / 37.0) * np.cos(yy / 23.0) + 1) * 30000 + (xx * 7 + yy) % 500).astype(np.uint16)
    big = _tiff_bytes(grey)
    fs.pipe_file(f"{s3_bucket}/in/slide.tif", big)
    fs.pipe_file(f"{s3_bucket}/in/cut.tif", big[: len(big) * 6 // 10])
    fs.pipe_file(f"{s3_bucket}/in/junk.tif", b"II*\x00" + b"\x07" * 5000)
    photo = _image(1000, 1200, 3).pixels
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    fs.pipe_file(f"{s3_bucket}/in/photo.png", buf.getvalue())
    cfg = UpscaleConfig(input=f"s3://{s3_bucket}/in/", output=f"s3://{s3_bucket}/out/", model="bicubic", scale=2,
                        format="TIFF", max_memory="64MiB", progress=False, max_failed_fraction=1.0)  # fmt: skip
    run_job(cfg)
    rows = {r["input_uri"].rsplit("/", 1)[1]: r for r in read_manifest(cfg.output, cfg.fs_options()).to_pylist()}
    slide = rows["slide.tif"]
    assert slide["status"] == "ok", slide
    assert slide["tile_height"] and slide["tile_exact"] is True and (slide["output_width"], slide["output_height"]) == (6000, 6000)
    with fs.open(f"{s3_bucket}/out/slide.tif", "rb") as f:
        data = f.read()
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        assert tf.is_bigtiff and tf.pages[0].is_tiled
        out = tf.asarray()
    ref = Upscaler(build_model("bicubic", scale=2), device="cpu").upscale_image(DecodedImage(pixels=grey[..., None]))
    assert out.shape == (6000, 6000) and out.dtype == np.uint16
    assert np.abs(out.astype(int) - ref.pixels[..., 0].astype(int)).max() <= 1
    from srbatch.metrics.resize import imresize_uint8  # and the float64 MATLAB bicubic of a crop, away from its edge

    matlab = imresize_uint8(grey[1000:1100, 2000:2100], 2)[20:180, 20:180]
    assert np.abs(out[2020:2180, 4020:4180].astype(int) - matlab.astype(int)).max() <= 1
    for name in ("cut.tif", "junk.tif"):
        assert rows[name]["status"] == "failed" and name in rows[name]["error_message"], rows[name]
        assert rows[name]["error_type"] == "ImageDecodeError"
        assert not fs.exists(f"{s3_bucket}/out/{name}")
    ph = rows["photo.png"]
    assert ph["status"] == "ok" and ph["tile_height"] is not None
    got = decode_image(fs.cat_file(f"{s3_bucket}/out/photo.tif")).pixels
    whole = Upscaler(build_model("bicubic", scale=2), device="cpu").upscale_image(DecodedImage(pixels=photo)).pixels
    assert np.abs(got.astype(int) - whole.astype(int)).max() <= 1
    assert not [p for p in fs.find(f"{s3_bucket}/out") if ".srbatch-tmp-" in p]


def test_streamed_tiff_output_with_a_pyramid_from_an_ome_tiff(tmp_path) -> None:
    """The actor code outside Ray: an OME-TIFF input above a quarter of the budget is streamed; --tiff-pyramid 2
    adds two half-size levels, each the 2x2 mean (half up) of the one above (checked with numpy), and the output
    stays OME; the fingerprint changes only when a pyramid is asked for."""
    import tifffile

    from srbatch.upscale.config import UpscaleConfig
    from srbatch.upscale.plan import fingerprint
    from srbatch.upscale.worker import UpscaleWorker

    yy, xx = np.mgrid[0:1200, 0:1000]
    grey = ((np.sin(xx / 17.0) + np.cos(yy / 11.0) + 2) * 16000).astype(np.uint16)
    src = tmp_path / "in" / "slide.ome.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, grey, tile=(256, 256), compression="zlib", ome=True, metadata={"axes": "YX"})
    out = tmp_path / "out" / "slide.ome.tif"
    cfg = UpscaleConfig(input=str(src.parent), output=str(out.parent), model="bicubic", scale=2, format="TIFF",
                        max_memory="48MiB", tiff_pyramid=2, progress=False)  # fmt: skip
    import srbatch.upscale.worker as worker_module

    old = worker_module.STREAM_OUTPUT_BYTES, worker_module.STREAM_INPUT_PIXELS
    # this 1.2 Mpx input and 9.6 MB output are streamed like large ones
    worker_module.STREAM_OUTPUT_BYTES, worker_module.STREAM_INPUT_PIXELS = 1024**2, 1024**2
    try:
        table = UpscaleWorker(cfg.model_dump(), fingerprint="fp")(
            {"input_uri": np.array([str(src)]), "output_uri": np.array([str(out)]), "run_id": np.array(["r"])})
    finally:
        worker_module.STREAM_OUTPUT_BYTES, worker_module.STREAM_INPUT_PIXELS = old
    row = table.to_pylist()[0]
    assert row["status"] == "ok", (row["error_type"], row["error_message"])
    assert row["tile_height"] is not None  # 48 MiB does not hold it whole
    with tifffile.TiffFile(out) as tf:
        assert tf.is_bigtiff and tf.is_ome
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(2400, 2000), (1200, 1000), (600, 500)]
        full, half, quarter = (lv.asarray() for lv in levels)
    from srbatch.metrics.resize import imresize_uint8

    assert np.abs(full.astype(int) - imresize_uint8(grey, 2).astype(int)).max() <= 1  # the float64 MATLAB bicubic
    for big, small in ((full, half), (half, quarter)):
        mean = big.astype(np.int64).reshape(small.shape[0], 2, small.shape[1], 2).sum(axis=(1, 3))
        np.testing.assert_array_equal(small, (mean + 2) // 4)  # 2x2 mean rounded half up
    base = cfg.model_copy(update={"tiff_pyramid": 0})
    ident = {"name": "bicubic"}
    assert fingerprint(base, ident) != fingerprint(cfg, ident)
    assert fingerprint(base, ident) == fingerprint(base.model_copy(update={"max_memory": "1GiB"}), ident)
