"""Frames/s of the video path on this machine: decode, bicubic x2, encode (x264 crf 18, FFV1), at 640x360.

    .venv/bin/python scripts/bench_video.py [--frames 100] [--threads 0]

Makes a synthetic 640x360 25 fps x264 source (a moving pattern, keyframe every 25 frames) in a temporary folder, then
times each stage on its own over all frames: decode (srbatch.video.read_frames, one segment, RGB out), bicubic x2
(torch F.interpolate on the RGB frames, 640x360 -> 1280x720), and encode (srbatch.video.encode_segment) of the 1280x720
results with libx264 crf 18 preset medium and with FFV1 (yuv444p), plus x264 at 640x360 for scale. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from fractions import Fraction

import av
import numpy as np
import torch
import torch.nn.functional as F

from srbatch.video import encode_segment, plan_segments, probe, read_frames


def _pattern(i: int, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    r = ((x + 2 * i) * 255 // w) % 256
    g = (y * 3 + i * 5) % 256
    b = ((x // 16 + y // 16 + i // 3) % 2) * 200 + 30
    return np.stack([r, g, b], -1).astype(np.uint8)


def _make_source(path: str, n: int, w: int = 640, h: int = 360) -> None:
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": "25", "crf": "18", "preset": "veryfast"}
        for i in range(n):
            f = av.VideoFrame.from_ndarray(_pattern(i, h, w), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _bicubic_x2(rgb: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    up = F.interpolate(t, scale_factor=2, mode="bicubic", align_corners=False)
    return up.round_().clamp_(0, 255)[0].permute(1, 2, 0).to(torch.uint8).contiguous().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"frames": args.frames, "source": "640x360 x264 25 fps", "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "src.mp4")
        _make_source(src, args.frames)
        info = probe(src)
        seg = plan_segments(info, target_frames=info.frames * 2)[0]

        t0 = time.perf_counter()
        frames = [rgb for _, rgb in read_frames(src, seg)]
        out["decode_fps"] = round(len(frames) / (time.perf_counter() - t0), 1)

        t0 = time.perf_counter()
        ups = [_bicubic_x2(f) for f in frames]
        out["bicubic_x2_fps"] = round(len(ups) / (time.perf_counter() - t0), 1)

        def enc(name: str, items: list[np.ndarray], codec: str, ext: str, **kw) -> None:
            t = time.perf_counter()
            encode_segment(((info.frame_pts[i], f) for i, f in enumerate(items)), os.path.join(d, name + ext),
                           fps=info.fps, time_base=info.time_base, codec=codec, **kw)
            out[f"{name}_fps"] = round(len(items) / (time.perf_counter() - t), 1)
            out[f"{name}_bytes"] = os.path.getsize(os.path.join(d, name + ext))

        enc("encode_x264_crf18_medium_1280x720", ups, "libx264", ".mp4", crf=18, preset="medium")
        enc("encode_ffv1_yuv444p_1280x720", ups, "ffv1", ".mkv")
        enc("encode_x264_crf18_medium_640x360", frames, "libx264", ".mp4", crf=18, preset="medium")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
