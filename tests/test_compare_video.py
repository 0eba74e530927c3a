"""Videos in the comparison job (`srbatch compare --images` listing videos beside images), end to end on the session's
local S3 server and Ray cluster, with a tiny synthetic video made here with PyAV (64x48, 30 frames, x264 in MP4).

References independent of the job: the video decoded in one pass with PyAV directly (tests/test_video_io.py's
``decode_all``), windows built here (indices clamped), LR made with MATLAB-exact ``imresize`` (srbatch.metrics.resize,
checked against MATLAB elsewhere), the engine (:meth:`Upscaler.upscale_frames`) called here, PSNR_Y / flicker TDE
recomputed here in numpy float64 (BT.601 Y of MATLAB ``rgb2ycbcr``, border = scale shaved).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_video_io import decode_all, make_video

pytestmark = pytest.mark.slow

SCALE = 2
N = 30
FRAMES = [7, 15, 22]  # floor((i + 1) * 29 / 4 + 1/2), i = 0, 1, 2
RUN = (11, 19)  # 8 consecutive frames: (30 - 8) // 2 = 11


def _y(rgb: np.ndarray, rounded: bool = False) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` Y of uint8 RGB, border shaved; ``rounded``: to uint8 as MATLAB returns it (the paper
    convention of PSNR_Y); unrounded for the flicker TDE (srbatch.video.evaluate's definition)."""
    x = rgb.astype(np.float64)
    y = 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0
    y = np.floor(y + 0.5) if rounded else y
    return y[SCALE:-SCALE, SCALE:-SCALE]


def _psnr_y(sr: np.ndarray, hr: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((_y(sr, True) - _y(hr, True)) ** 2))


def _window(frames: list[np.ndarray], t: int, r: int) -> list[np.ndarray]:
    return [frames[min(max(t + d, 0), len(frames) - 1)] for d in range(-r, r + 1)]


def test_compare_videos_and_image_on_s3(ray_cluster, s3_bucket, tmp_path, capsys):
    import s3fs
    import torch
    from PIL import Image

    from srbatch.cli import main
    from srbatch.evaluate import paper_model
    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.io.images import decode_image
    from srbatch.metrics.resize import imresize_uint8
    from srbatch.models.loader import build_model, load_model, save_model

    fs = s3fs.S3FileSystem()
    clip = make_video(tmp_path / "clip.mp4", n=N, w=64, h=48, gop=10)
    fs.put_file(str(clip), f"{s3_bucket}/in/clip.mp4")
    ffv1 = make_video(tmp_path / "whole.mkv", n=30, w=64, h=48, codec="ffv1", audio=None, pix_fmt="yuv444p")
    data = open(ffv1, "rb").read()
    fs.pipe_file(f"{s3_bucket}/in/cut.mkv", data[: int(len(data) * 0.6)])  # truncated
    long = open(make_video(tmp_path / "long.mkv", n=60, w=64, h=48, codec="ffv1", audio=None, pix_fmt="yuv444p"),
                "rb").read()
    zeroed = bytearray(long)
    zeroed[len(long) // 2 : len(long) // 2 + 200] = bytes(200)  # probes fine, frame 30 cannot decode
    fs.pipe_file(f"{s3_bucket}/in/zeroed.mkv", bytes(zeroed))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    fs.put_file(str(tmp_path / "photo.png"), f"{s3_bucket}/in/photo.png")
    specs = []
    for name in ("efvsr-r1", "efvsr-frame"):
        torch.manual_seed(1)
        local = tmp_path / f"{name}.safetensors"
        save_model(build_model(name, scale=SCALE), str(local))
        fs.put_file(str(local), f"{s3_bucket}/models/{name}.safetensors")
        specs.append(f"s3://{s3_bucket}/models/{name}.safetensors")
    out = f"s3://{s3_bucket}/out"

    code = main(["compare", "--images", f"s3://{s3_bucket}/in/", "--models", ",".join(["bicubic", *specs]),
                 "--scale", str(SCALE), "--mode", "reference", "--output", out, "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1  # the truncated and the damaged video
    with fs.open(f"{s3_bucket}/out/comparison.parquet", "rb") as f:
        rows = pq.read_table(f).to_pylist()
    labels = ["bicubic", "efvsr-r1", "efvsr-frame"]
    assert {r["model"] for r in rows} == set(labels)

    # the image: ok, no video columns
    photo = [r for r in rows if r["image"] == "photo"]
    assert len(photo) == 3 and all(r["status"] == "ok" and r["video_uri"] is None and r["frame_index"] is None
                                   for r in photo)  # fmt: skip
    # the truncated video: failed rows naming a frame
    cut = [r for r in rows if r["video_uri"] == f"s3://{s3_bucket}/in/cut.mkv"]
    assert len(cut) == 3 and all(r["status"] == "failed" and r["error_type"] == "VideoError" for r in cut)
    assert all(" frame " in r["error_message"] for r in cut), cut[0]["error_message"]
    # the damaged video: its frames are rows; those whose window (or flicker run) meets the broken frame fail, naming it
    zero = [r for r in rows if r["video_uri"] == f"s3://{s3_bucket}/in/zeroed.mkv"]
    assert sorted(r["frame_index"] for r in zero) == sorted([15, 30, 44] * 3)
    bad = [r for r in zero if r["status"] != "ok"]
    assert {r["frame_index"] for r in bad} >= {30}
    assert all(r["error_type"] == "VideoError" and re.search(r"frame \d+", r["error_message"]) for r in bad)

    # the good video: one row per frame x model, frames as the rule says, PSNR_Y = the engine's direct output
    vid = [r for r in rows if r["video_uri"] == f"s3://{s3_bucket}/in/clip.mp4"]
    assert sorted((r["model"], r["frame_index"]) for r in vid) == sorted((m, t) for m in labels for t in FRAMES)
    assert all(r["status"] == "ok" and r["image"] == f"clip#f{r['frame_index']}" for r in vid)
    hr_all = decode_all(clip)
    assert len(hr_all) == N
    lr_all = [imresize_uint8(f, 1 / SCALE) for f in hr_all]  # 64x48 is a multiple of 2: no crop
    engines = {lab: Upscaler(paper_model(load_model(s, scale=SCALE)), device="cpu", tiling=TilingConfig(tile=0))
               for lab, s in zip(labels, ["bicubic", *[str(tmp_path / f"{n}.safetensors") for n in labels[1:]]])}
    for r in vid:
        up = engines[r["model"]]
        rad = int(up.info.temporal_radius)
        t = r["frame_index"]
        sr = up.upscale_frames(_window(lr_all, t, rad))
        assert r["psnr_y"] == pytest.approx(_psnr_y(sr, hr_all[t]), abs=2e-3), (r["model"], t)
        with fs.open(r["output_uri"], "rb") as f:
            png = decode_image(f.read(), name=r["output_uri"]).pixels
        d = np.abs(png.astype(int) - sr.astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 0.01, (r["model"], t)  # the picture the report shows
        if rad:  # the temporal model used its neighbours: the centre frame alone gives another picture
            alone = up.upscale_frames([lr_all[t]] * (2 * rad + 1))
            assert np.abs(alone.astype(int) - sr.astype(int)).max() > 2
    assert {engines[lab].info.temporal_radius for lab in labels} == {0, 1}

    # flicker: TDE over frames 11..18 on the first frame's row, recomputed here
    for lab in labels:
        fr = [r for r in vid if r["model"] == lab and r["flicker_tde"] is not None]
        assert [r["frame_index"] for r in fr] == [FRAMES[0]] and fr[0]["flicker_frames"] == RUN[1] - RUN[0]
        up = engines[lab]
        srs = [_y(up.upscale_frames(_window(lr_all, t, int(up.info.temporal_radius)))) for t in range(*RUN)]
        gts = [_y(hr_all[t]) for t in range(*RUN)]
        tde = np.mean([np.mean(np.abs((srs[i + 1] - srs[i]) - (gts[i + 1] - gts[i]))) for i in range(len(srs) - 1)])
        assert fr[0]["flicker_tde"] == pytest.approx(tde, abs=2e-3), lab

    # the report lists the video frames; the printed summary has the video columns and the flicker line
    html = fs.cat_file(f"{s3_bucket}/out/index.html").decode()
    for t in FRAMES:
        assert f"clip#f{t}" in html
    assert "flicker TDE" in html and "video PSNR_Y" in html
    assert "vPSNR_Y" in printed and "TDE" in printed and "8 consecutive middle frames" in printed
    print(printed)


def test_sample_frames_rule():
    from srbatch.compare.video import flicker_run, sample_frames

    assert sample_frames(N, 3) == FRAMES
    assert sample_frames(101, 4) == [20, 40, 60, 80]
    assert sample_frames(5, 3) == [1, 2, 3]  # never the ends while n >= k + 2
    assert sample_frames(2, 3) == [0, 1] and sample_frames(0, 3) == []
    assert flicker_run(N, 8) == RUN and flicker_run(5, 8) == (0, 5)
