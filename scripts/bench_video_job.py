"""Frames/s of the upscale job on one video: each model runs the job on the same synthetic x264 video.

    .venv/bin/python scripts/bench_video_job.py --models bicubic,out/efvsr-r1 [--scale 4] [--frames 150]
        [--width 320] [--height 180] [--segment-frames 50] [--cpus 2]

Makes a W x H, 25 fps x264 video (the moving pattern of tests/test_video_io.py, a keyframe every 25 frames, an AAC
tone) in a temporary folder, starts a local Ray cluster with ``--cpus`` CPUs, runs ``srbatch upscale`` on it once per
model (``--video-segment-frames`` segments, x264 CRF 18 medium output) and prints, per model, the manifest row's
timings as frames/s: the model alone (``infer_s``), decode + model + encode, and the whole job (wall time, Ray start-up
excluded, probe and join included).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bicubic")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=180)
    ap.add_argument("--segment-frames", type=int, default=50)
    ap.add_argument("--cpus", type=int, default=2)
    a = ap.parse_args()

    import ray

    from srbatch.upscale import main as upscale, read_manifest
    from test_video_io import make_video

    root = tempfile.mkdtemp(prefix="srbatch-bench-video-")
    os.makedirs(f"{root}/in")
    make_video(f"{root}/in/clip.mp4", n=a.frames, w=a.width, h=a.height, gop=25)
    ray.init(num_cpus=a.cpus, include_dashboard=False)
    print(f"{a.frames} frames {a.width}x{a.height} x264, x{a.scale}, segments of {a.segment_frames}, {a.cpus} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for i, model in enumerate(a.models.split(",")):
        out = f"{root}/out{i}"
        t = time.perf_counter()
        code = upscale([f"{root}/in", "-o", out, "--model", model, "--scale", str(a.scale), "--video-segment-frames",
                        str(a.segment_frames), "--no-progress", "--run-id", "bench"])  # fmt: skip
        wall = time.perf_counter() - t
        r = read_manifest(out).to_pandas().iloc[0]
        if code or r.status != "ok":
            print(f"{model}: exit {code}, {r.status}: {r.error_message}")
            continue
        pipe = r.decode_s + r.infer_s + r.encode_s
        print(f"{model}: {r.input_width}x{r.input_height} -> {r.output_width}x{r.output_height}, "
              f"{r.video_segments} segments; model {r.video_frames / r.infer_s:.2f} frames/s, decode+model+encode "
              f"{r.video_frames / pipe:.2f} frames/s, whole job {r.video_frames / wall:.2f} frames/s ({wall:.1f} s); "
              f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
