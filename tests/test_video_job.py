"""Videos in the upscale job, on the session's local Ray cluster and local S3 server: tiny synthetic videos (64x48,
keyframe every 10 frames, a 440 Hz tone) made here with PyAV.

References independent of the job: the source decoded in one pass with PyAV directly (tests/test_video_io.py's
``decode_all``), each frame upscaled by the engine called here (:class:`srbatch.inference.Upscaler`), the source's
own audio packets, and the same video processed in one piece by :func:`srbatch.video.upscale_video_local`. Outputs
are FFV1 with ``bgr0`` pixels, so the model's RGB output is kept bit for bit and the comparisons are exact.
"""

from __future__ import annotations

import os
import shutil
from fractions import Fraction

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from srbatch.upscale import UpscaleConfig, read_manifest, run_job
from test_video_io import decode_all, make_video, packets

pytestmark = pytest.mark.slow

FFV1 = dict(video_codec="ffv1", video_pix_fmt="bgr0")


def _engine(model: str, scale: int):
    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.io.images import DecodedImage
    from srbatch.models.loader import load_model

    up = Upscaler(load_model(model, scale=scale), device="cpu", tiling=TilingConfig(tile=0))
    return lambda rgb: up.upscale_image(DecodedImage(pixels=rgb)).pixels


def _figures(path) -> tuple[int, Fraction, float]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        n = sum(1 for p in c.demux(v) if p.size)
        dur = float(c.duration / av.time_base) if c.duration else None
        return n, v.average_rate, dur


def _assert_engine_frames(out_path, src_path, fn, *, exact: bool = True) -> None:
    got, want = decode_all(out_path), [fn(f) for f in decode_all(src_path)]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        d = np.abs(g.astype(int) - w.astype(int))
        if exact:
            assert d.max() == 0, f"frame {i}: max diff {d.max()}"
        else:  # the actor's torch thread count: rounding-boundary samples may move by one level (tests/_expect.py)
            assert d.max() <= 1 and (d > 0).mean() < 0.01, f"frame {i}: max diff {d.max()}, {(d > 0).mean():.4f}"


def test_s3_videos_and_images_end_to_end(ray_cluster, s3_bucket, tmp_path):
    import s3fs
    from PIL import Image

    from srbatch.upscale import main
    from srbatch.video import upscale_video_local

    src = tmp_path / "src"
    src.mkdir()
    clip = make_video(src / "clip.mp4", n=50, w=64, h=48, gop=10)  # x264 + AAC in MP4
    ffv1 = make_video(tmp_path / "whole.mkv", w=64, h=48, codec="ffv1", audio="libopus", pix_fmt="yuv444p",
                      subtitles=True)  # 60 frames, as tests/test_video_io.py damages it
    data = open(ffv1, "rb").read()
    zeroed = bytearray(data)
    zeroed[len(data) // 2: len(data) // 2 + 200] = bytes(200)  # probes fine, a frame in the middle cannot decode
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(src / "photo.png")
    fs = s3fs.S3FileSystem()
    fs.put_file(clip, f"{s3_bucket}/in/clip.mp4")
    fs.put_file(str(src / "photo.png"), f"{s3_bucket}/in/photo.png")
    fs.pipe_file(f"{s3_bucket}/in/bad/cut.mkv", data[: int(len(data) * 0.6)])
    fs.pipe_file(f"{s3_bucket}/in/bad/zeroed.mkv", bytes(zeroed))
    out = f"s3://{s3_bucket}/out"

    code = main([f"s3://{s3_bucket}/in/", "-o", out, "--model", "bicubic", "--scale", "2", "--video-codec", "ffv1",
                 "--video-pix-fmt", "bgr0", "--video-segment-frames", "12", "--no-progress", "--run-id", "v1",
                 "--batch-size", "2"])
    assert code == 1  # two broken videos
    t = read_manifest(out).to_pandas().set_index("input_uri")
    assert len(t) == 4
    row = t.loc[f"s3://{s3_bucket}/in/clip.mp4"]
    assert row.status == "ok" and row.output_uri == f"{out}/clip.mkv"  # .mp4 cannot hold ffv1: .mkv
    assert (row.video_frames, row.video_segments, row.video_segments_done) == (50, 5, 5)
    assert row.video_fps == 25 and row.video_codec == "ffv1" and row.media == "video"
    assert (row.input_width, row.input_height, row.output_width, row.output_height) == (64, 48, 128, 96)
    assert abs(row.video_duration_s - 2.0) < 1e-9 and row.output_bytes > 0
    assert all(row[k] >= 0 for k in ("probe_s", "decode_s", "infer_s", "encode_s", "join_s"))
    assert t.loc[f"s3://{s3_bucket}/in/photo.png"].status == "ok"
    cut = t.loc[f"s3://{s3_bucket}/in/bad/cut.mkv"]
    assert cut.status == "failed" and cut.error_type == "VideoError"
    assert "truncated" in cut.error_message and "frame" in cut.error_message
    bad = t.loc[f"s3://{s3_bucket}/in/bad/zeroed.mkv"]
    assert bad.status == "failed" and bad.error_type == "VideoError"
    assert "frame" in bad.error_message and bad.video_frames == 60
    import re

    assert re.search(r"frame \d+", bad.error_message), bad.error_message

    fs.invalidate_cache()
    got = tmp_path / "clip.mkv"
    fs.get_file(f"{s3_bucket}/out/clip.mkv", str(got))
    n, fps, dur = _figures(got)
    assert (n, fps) == (50, 25) and abs(dur - _figures(clip)[2]) < 0.05
    assert [p for p, _ in packets(got, "audio")] == [p for p, _ in packets(clip, "audio")]  # copied, not re-encoded
    bicubic = _engine("bicubic", 2)
    _assert_engine_frames(got, clip, bicubic)  # every frame is the engine's, in order: no black, shifted or doubled
    whole = upscale_video_local(clip, str(tmp_path / "one_piece.mkv"), bicubic, segment_frames=1000,
                                codec="ffv1", pix_fmt="bgr0")
    assert len(whole.segments) == 1
    for i, (a, b) in enumerate(zip(decode_all(got), decode_all(tmp_path / "one_piece.mkv"), strict=True)):
        assert np.array_equal(a, b), f"seam at frame {i}"
    # the segments' work folder is gone once joined; the per-segment detail names each segment
    assert not fs.exists(f"{s3_bucket}/out/_srbatch/video/clip.mkv")
    seg = pq.read_table(f"{s3_bucket}/out/_srbatch/video_segments/run=v1.parquet", filesystem=fs).to_pandas()
    mine = seg[seg.input_uri == f"s3://{s3_bucket}/in/clip.mp4"]
    assert list(mine.start) == [0, 10, 20, 30, 40] and list(mine.end) == [10, 20, 30, 40, 50]
    assert set(mine.status) == {"ok"} and not mine.reused.any()

    # a rerun skips what is done and retries the broken videos only
    code = main([f"s3://{s3_bucket}/in/", "-o", out, "--model", "bicubic", "--scale", "2", "--video-codec", "ffv1",
                 "--video-pix-fmt", "bgr0", "--video-segment-frames", "12", "--no-progress", "--run-id", "v2"])
    t2 = read_manifest(out).to_pandas()
    v2 = t2[t2.run_id == "v2"].set_index("input_uri")
    assert v2.loc[f"s3://{s3_bucket}/in/clip.mp4"].status == "skipped"
    assert v2.loc[f"s3://{s3_bucket}/in/bad/cut.mkv"].status == "failed"


def test_resume_redoes_only_missing_segments(ray_cluster, tmp_path):
    """Run 1 writes every segment but cannot join (a folder sits where the output goes); one segment file is then
    deleted. Run 2 upscales that segment alone, reuses the others and joins: every frame exactly once, each the
    engine's own output, with a real image model (the shipped default, IMDN x4)."""
    src = tmp_path / "in"
    src.mkdir()
    clip = make_video(src / "clip.mkv", n=40, w=64, h=48, gop=10, audio="libopus")
    out = tmp_path / "out"
    (out / "clip.mkv").mkdir(parents=True)  # the join cannot write its output
    base = dict(input=str(src), output=str(out), model="default", scale=4, progress=False,
                video_segment_frames=10, **FFV1)
    r1 = run_job(UpscaleConfig(**base, run_id="r1"))
    assert (r1.ok, r1.failed) == (0, 1)
    folders = list((out / "_srbatch" / "video" / "clip.mkv").iterdir())
    assert len(folders) == 1
    segs = sorted(p.name for p in folders[0].iterdir())
    assert segs == [f"s{k:04d}-{10 * k:08d}-{10 * k + 10:08d}.mkv" for k in range(4)]
    os.remove(folders[0] / segs[2])
    shutil.rmtree(out / "clip.mkv")

    r2 = run_job(UpscaleConfig(**base, run_id="r2"))
    assert (r2.ok, r2.failed) == (1, 0), r2.summary()
    row = read_manifest(str(out)).to_pandas().set_index("run_id").loc["r2"]
    assert (row.video_segments, row.video_segments_done) == (4, 1)  # only the deleted segment was upscaled again
    seg = pq.read_table(out / "_srbatch" / "video_segments" / "run=r2.parquet").to_pandas()
    assert list(seg.reused) == [True, True, False, True]
    n, fps, _ = _figures(out / "clip.mkv")
    assert (n, fps) == (40, 25)
    assert [p for p, _ in packets(out / "clip.mkv", "audio")] == [p for p, _ in packets(clip, "audio")]
    _assert_engine_frames(out / "clip.mkv", clip, _engine("default", 4), exact=False)


def test_actor_killed_mid_video_every_frame_once(ray_cluster, tmp_path):
    """SIGKILL the model actor once a segment of the video is written: Ray restarts it and retries its batch; the
    output still has every frame exactly once (the source's pts, in order), each the engine's own output."""
    import signal
    import threading
    import time

    from ray._private import state as ray_state

    src = tmp_path / "in"
    src.mkdir()
    clip = make_video(src / "clip.mkv", n=60, w=64, h=48, gop=10, audio=None)
    out = tmp_path / "out"
    cfg = UpscaleConfig(input=str(src), output=str(out), model="default", scale=4, progress=False, actors=1,
                        cpus_per_actor=1, torch_threads=1, batch_size=1, video_segment_frames=10, run_id="kill",
                        **FFV1)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("r", run_job(cfg)))
    t.start()
    killed = None
    deadline = time.monotonic() + 300
    work = out / "_srbatch" / "video" / "clip.mkv"
    while t.is_alive() and time.monotonic() < deadline:
        written = [p for p in work.rglob("s*.mkv")] if work.exists() else []
        actors = [a for a in ray_state.actors().values()
                  if a["State"] == "ALIVE" and "UpscaleWorker" in a["ActorClassName"]]
        if written and len(written) < 6 and actors:
            killed = actors[0]["Pid"]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.1)
    t.join(timeout=600)
    assert killed is not None, "the job finished before the actor could be killed"
    res = result["r"]
    assert (res.ok, res.failed) == (1, 0), res.summary()
    rows = read_manifest(str(out)).to_pandas()
    assert len(rows) == 1 and rows.video_frames[0] == 60
    with av.open(str(out / "clip.mkv")) as c:
        pts = sorted(p.pts for p in c.demux(c.streams.video[0]) if p.size)
    with av.open(clip) as c:
        src_pts = sorted(p.pts for p in c.demux(c.streams.video[0]) if p.size)
    assert len(pts) == 60 and pts == src_pts  # every frame once
    _assert_engine_frames(out / "clip.mkv", clip, _engine("default", 4), exact=False)
    print(f"CHAOS video: actor pid {killed} SIGKILLed after a segment was written; output {len(pts)} frames, "
          f"segments redone after the kill: {rows.video_segments_done[0]} of {rows.video_segments[0]}")


def test_temporal_model_gets_each_frames_window_across_segments(ray_cluster, tmp_path):
    """A temporal model (efvsr-r1: frames t-1, t, t+1) in the job: 3 segments, each reading one overlap frame on each
    side. Every written frame equals the engine's ``upscale_frames`` on that frame's window built here from a one-pass
    decode (clamped at the video's ends), so a segment that lost its overlap (a window clamped at a segment boundary
    instead of the video's), a shifted window or a per-frame fallback fails; and the output is not the per-frame
    model's (the neighbours are used)."""
    import torch

    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.models.loader import build_model, load_model, save_model

    src = tmp_path / "in"
    src.mkdir()
    clip = make_video(src / "clip.mkv", n=30, w=64, h=48, gop=10, audio="libopus")
    torch.manual_seed(0)
    weights = tmp_path / "efvsr.safetensors"
    save_model(build_model("efvsr-r1", scale=2), str(weights))
    out = tmp_path / "out"
    r = run_job(UpscaleConfig(input=str(src), output=str(out), model=str(weights), scale=2, progress=False,
                              video_segment_frames=10, run_id="t1", **FFV1))  # fmt: skip
    assert (r.ok, r.failed) == (1, 0), r.summary()
    row = read_manifest(str(out)).to_pandas().iloc[0]
    assert (row.video_frames, row.video_segments) == (30, 3)

    up = Upscaler(load_model(str(weights), scale=2), device="cpu", tiling=TilingConfig(tile=0))
    assert up.info.temporal_radius == 1
    frames = decode_all(clip)
    n = len(frames)
    want = [up.upscale_frames([frames[max(t - 1, 0)], frames[t], frames[min(t + 1, n - 1)]]) for t in range(n)]
    got = decode_all(out / "clip.mkv")
    assert len(got) == n
    for t, (g, w) in enumerate(zip(got, want)):
        d = np.abs(g.astype(int) - w.astype(int))
        # the actor's torch thread count: rounding-boundary samples may move by one level (tests/_expect.py)
        assert d.max() <= 1 and (d > 0).mean() < 0.01, f"frame {t}: max diff {d.max()}, {(d > 0).mean():.4f}"
    alone = up.upscale_frames([frames[10]] * 3)  # the frame without its neighbours (t = 10 starts segment 2)
    assert np.abs(alone.astype(int) - got[10].astype(int)).max() > 2
