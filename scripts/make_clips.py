"""Make synthetic video clips from still photos: a virtual camera pans across each photo at sub-pixel steps, with a
slight zoom and rotation, and every frame is written losslessly (FFV1 ``bgr0`` in .mkv: RGB kept bit for bit, or PNG
frame folders with ``--png``).

    python scripts/make_clips.py --src /work/shared/refs/train/cc0_pexels --out /tmp/clips/train \\
        --size 192 --frames 12 --per-image 2 --prescale 0.5 --seed 0
    python scripts/make_clips.py --src '/work/shared/refs/sets/Set5/image_SRF_4/*HR*.png' --out /tmp/clips/val \\
        --size 160 --frames 10 --per-image 1 --prescale 1 --seed 1

Procedure (per clip; all draws from ``numpy.random.default_rng(seed)``, so a rerun writes the same files):

1. the photo is converted to RGB and resized by ``--prescale`` with Lanczos (large photos: the clip's HR frames are
   then less blurred by the warp below than by the original's softness);
2. a start point is drawn so the whole path stays inside the photo; the camera velocity is a random direction with a
   speed uniform in ``--speed`` (HR pixels per frame: 0.4-2.5 by default, i.e. 0.1-0.6 LR pixels at x4, the
   sub-pixel motion a multi-frame model can exploit); the zoom changes by a factor uniform in +-``--zoom`` per frame
   and the rotation by an angle uniform in +-``--rotate`` degrees per frame;
3. frame t is the photo sampled (PIL bicubic affine warp) at ``start + t * velocity``, scaled by ``(1 + zoom)^t``
   and rotated by ``t * rotate`` around the frame centre: an ``--size`` x ``--size`` HR frame.

Frames are the ground truth (HR); training and evaluation synthesise the LR from them (bicubic x4 etc.).
A ``clips.json`` beside the clips records every clip's source, start, velocity, zoom and rotation.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _sources(spec: str) -> list[str]:
    if os.path.isdir(spec):
        return sorted(str(p) for p in Path(spec).iterdir() if p.suffix.lower() in _EXT)
    return sorted(glob.glob(spec))


def render(photo: Image.Image, *, size: int, frames: int, start: tuple[float, float], velocity: tuple[float, float],
           zoom: float, rotate_deg: float) -> list[np.ndarray]:  # fmt: skip
    """The ``frames`` HR frames of one camera path over ``photo`` (see the module docs)."""
    out = []
    c = (size - 1) / 2
    for t in range(frames):
        s = (1 + zoom) ** t
        a = math.radians(rotate_deg * t)
        cx, cy = start[0] + velocity[0] * t, start[1] + velocity[1] * t
        # output (u, v) -> source (x, y) = centre_t + R(a) (u - c, v - c) / s
        ca, sa = math.cos(a) / s, math.sin(a) / s
        coeffs = (ca, -sa, cx - ca * c + sa * c, sa, ca, cy - sa * c - ca * c)
        im = photo.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)
        out.append(np.asarray(im, dtype=np.uint8))
    return out


def make_clips(src: str, out: str, *, size: int, frames: int, per_image: int, prescale: float, seed: int,
               speed: tuple[float, float], zoom: float, rotate: float, png: bool) -> list[dict]:  # fmt: skip
    """Write the clips; returns their records (also written to ``<out>/clips.json``)."""
    from srbatch.video import encode_segment

    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    records = []
    paths = _sources(src)
    if not paths:
        raise SystemExit(f"make_clips: no images match {src!r}")
    for path in paths:
        photo = Image.open(path).convert("RGB")
        if prescale != 1:
            photo = photo.resize((round(photo.width * prescale), round(photo.height * prescale)),
                                 Image.Resampling.LANCZOS)  # fmt: skip
        for k in range(per_image):
            v = float(rng.uniform(*speed))
            ang = float(rng.uniform(0, 2 * math.pi))
            vel = (v * math.cos(ang), v * math.sin(ang))
            z = float(rng.uniform(-zoom, zoom))
            rot = float(rng.uniform(-rotate, rotate))
            # keep the whole path inside the photo (a margin for the rotation/zoom of the corners)
            reach = size / 2 * (1.05 + abs(math.radians(rot)) * frames) / min(1.0, (1 + z) ** frames)
            span = (abs(vel[0]) * frames, abs(vel[1]) * frames)
            lo_x, hi_x = reach + max(0.0, -vel[0] * frames), photo.width - reach - max(0.0, vel[0] * frames)
            lo_y, hi_y = reach + max(0.0, -vel[1] * frames), photo.height - reach - max(0.0, vel[1] * frames)
            if hi_x <= lo_x or hi_y <= lo_y:
                print(f"make_clips: skipping {path} ({photo.width}x{photo.height} after --prescale): too small for "
                      f"{size} px frames moving {span[0]:.0f}x{span[1]:.0f} px; lower --size or --frames")
                break
            start = (float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))
            fr = render(photo, size=size, frames=frames, start=start, velocity=vel, zoom=z, rotate_deg=rot)
            name = f"{Path(path).stem}_{k:02d}"
            if png:
                d = os.path.join(out, name)
                os.makedirs(d, exist_ok=True)
                for t, f in enumerate(fr):
                    Image.fromarray(f).save(os.path.join(d, f"{t:05d}.png"))
                target = d
            else:
                target = os.path.join(out, name + ".mkv")
                encode_segment(((t, f) for t, f in enumerate(fr)), target, fps=Fraction(25), time_base=Fraction(1, 25),
                               codec="ffv1", pix_fmt="bgr0")  # fmt: skip
            records.append({"clip": os.path.basename(target), "source": path, "frames": frames, "size": size,
                            "prescale": prescale, "start": start, "velocity_px_per_frame": vel, "zoom_per_frame": z,
                            "rotation_deg_per_frame": rot})  # fmt: skip
    with open(os.path.join(out, "clips.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", required=True, help="a folder of photos or a glob")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=192, help="HR frame side in pixels [192]")
    p.add_argument("--frames", type=int, default=12, help="frames per clip [12]")
    p.add_argument("--per-image", type=int, default=2, help="clips per photo [2]")
    p.add_argument("--prescale", type=float, default=0.5, help="resize photos by this factor first (Lanczos) [0.5]")
    p.add_argument("--speed", type=float, nargs=2, default=(0.4, 2.5), help="HR pixels per frame range [0.4 2.5]")
    p.add_argument("--zoom", type=float, default=0.003, help="max zoom change per frame (fraction) [0.003]")
    p.add_argument("--rotate", type=float, default=0.15, help="max rotation per frame in degrees [0.15]")
    p.add_argument("--png", action="store_true", help="write folders of PNG frames instead of FFV1 .mkv files")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    recs = make_clips(a.src, a.out, size=a.size, frames=a.frames, per_image=a.per_image, prescale=a.prescale,
                      seed=a.seed, speed=tuple(a.speed), zoom=a.zoom, rotate=a.rotate, png=a.png)  # fmt: skip
    print(f"make_clips: wrote {len(recs)} clip(s) of {a.frames} {a.size}x{a.size} frames to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
