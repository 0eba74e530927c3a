"""Temporal vs per-frame evaluation on held-out clips: PSNR/SSIM on Y and a flicker measure, one row per model.

    python -m srbatch.video.evaluate --models /tmp/efvsr-r1,/tmp/efvsr-frame,bicubic --clips /tmp/clips/val --scale 4

Protocol. Each clip (a video file or a folder of frames, see :func:`srbatch.train.clips.list_clips`) is the ground
truth; its frames are cropped to a multiple of the scale (top-left kept) and their LR made by MATLAB-exact bicubic
``imresize`` rounded to uint8 (the benchmark convention; ``--max-frames`` keeps the middle frames). Every model
upscales every frame ``t`` through :meth:`srbatch.inference.Upscaler.upscale_frames` with the window
``t - r .. t + r`` (indices clamped to the clip, as the video upscale path does; image models use frame ``t``
alone). Then, with ``Y`` the MATLAB ``rgb2ycbcr`` luma (float, 0..255, not rounded) and a border of ``scale`` pixels
shaved:

- ``psnr_y`` / ``ssim_y``: :func:`srbatch.metrics.quality.measure` per frame (paper convention), averaged over all
  frames of all clips;
- ``tde`` (flicker, lower is better): the temporal-difference error
  ``mean_t mean_px |(Y_sr[t+1] - Y_sr[t]) - (Y_gt[t+1] - Y_gt[t])|``, averaged over the consecutive pairs of all
  clips: how much the output's frame-to-frame change departs from the true one (0 for a perfect video);
- ``mad_sr`` and ``mad_gt``: ``mean |Y[t+1] - Y[t]|`` of the output and of the ground truth, and their ratio
  ``mad_ratio = mad_sr / mad_gt`` (1 means the output changes as much as the truth; above 1, extra flicker).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["ClipScores", "evaluate_clips", "format_table", "main"]


@dataclass(frozen=True)
class ClipScores:
    """One model's figures over all clips (see the module docs for the definitions)."""

    model: str
    temporal_radius: int
    clips: int
    frames: int
    psnr_y: float
    ssim_y: float
    tde: float
    mad_sr: float
    mad_gt: float
    mad_ratio: float
    seconds: float


def _y(img: np.ndarray, border: int) -> np.ndarray:
    from srbatch.metrics.color import rgb_to_y

    y = rgb_to_y(img, round_output=False) if img.ndim == 3 and img.shape[2] == 3 else img[..., 0].astype(np.float64)
    y = np.asarray(y, dtype=np.float64)
    return y[border:-border, border:-border] if border else y


def flicker(sr: Sequence[np.ndarray], gt: Sequence[np.ndarray], border: int) -> tuple[list[float], list[float],
                                                                                        list[float]]:  # fmt: skip
    """Per consecutive pair: (temporal-difference error, mean |dY| of the output, mean |dY| of the ground truth)."""
    ys, yg = [_y(f, border) for f in sr], [_y(f, border) for f in gt]
    tde, ms, mg = [], [], []
    for t in range(len(ys) - 1):
        ds, dg = ys[t + 1] - ys[t], yg[t + 1] - yg[t]
        tde.append(float(np.mean(np.abs(ds - dg))))
        ms.append(float(np.mean(np.abs(ds))))
        mg.append(float(np.mean(np.abs(dg))))
    return tde, ms, mg


def _lr_clips(clips: str, scale: int, max_frames: int | None,
              storage_options: Mapping[str, Any] | None) -> list[tuple[str, np.ndarray, np.ndarray]]:  # fmt: skip
    from srbatch.metrics.resize import imresize_uint8
    from srbatch.train.clips import list_clips, read_clip

    out = []
    for uri in list_clips(clips, storage_options):
        hr = read_clip(uri, storage_options)
        if max_frames and hr.shape[0] > max_frames:
            a = (hr.shape[0] - max_frames) // 2
            hr = hr[a : a + max_frames]
        h, w = hr.shape[1] - hr.shape[1] % scale, hr.shape[2] - hr.shape[2] % scale
        hr = np.ascontiguousarray(hr[:, :h, :w])
        lr = np.stack([imresize_uint8(f, 1 / scale) for f in hr])
        out.append((uri, hr, lr))
    return out


def evaluate_clips(
    models: Sequence[str], clips: str, *, scale: int, max_frames: int | None = None, device: str = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> list[ClipScores]:
    """Score each model (a name or a checkpoint/export URI, loaded with :func:`srbatch.load_model`) on the clips."""
    from srbatch.inference import Upscaler
    from srbatch.metrics.quality import measure
    from srbatch.models.loader import load_model
    from srbatch.train.clips import windows

    data = _lr_clips(clips, scale, max_frames, storage_options)
    rows = []
    for name in models:
        desc = load_model(name, scale=scale, storage_options=storage_options)
        up = Upscaler(desc, device=device)
        r = int(desc.info.temporal_radius)
        ps, ss, tde, ms, mg, n = [], [], [], [], [], 0
        t0 = time.perf_counter()
        for _uri, hr, lr in data:
            srs = [up.upscale_frames(win) for win in windows(list(lr), r)]
            for sr, gt in zip(srs, hr):
                m = measure(sr, gt, crop_border=scale)
                ps.append(m.psnr_y)
                ss.append(m.ssim_y)
            a, b, c = flicker(srs, list(hr), scale)
            tde += a
            ms += b
            mg += c
            n += len(srs)
        rows.append(ClipScores(model=name, temporal_radius=r, clips=len(data), frames=n, psnr_y=float(np.mean(ps)),
                               ssim_y=float(np.mean(ss)), tde=float(np.mean(tde)), mad_sr=float(np.mean(ms)),
                               mad_gt=float(np.mean(mg)), mad_ratio=float(np.mean(ms) / max(np.mean(mg), 1e-12)),
                               seconds=time.perf_counter() - t0))  # fmt: skip
    return rows


def format_table(rows: Sequence[ClipScores]) -> str:
    """A Markdown table of the rows."""
    head = "| model | r | clips | frames | PSNR_Y dB | SSIM_Y | flicker TDE | MAD out | MAD gt | MAD ratio | s |"
    lines = [head, "|" + "---|" * 11]
    for x in rows:
        lines.append(f"| {x.model} | {x.temporal_radius} | {x.clips} | {x.frames} | {x.psnr_y:.2f} | {x.ssim_y:.4f} | "
                     f"{x.tde:.3f} | {x.mad_sr:.3f} | {x.mad_gt:.3f} | {x.mad_ratio:.3f} | {x.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import json

    p = argparse.ArgumentParser(prog="python -m srbatch.video.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="comma-separated model names or export folders/checkpoints")
    p.add_argument("--clips", required=True, help="folder/prefix of clips (videos, or one folder of frames per clip)")
    p.add_argument("--scale", type=int, required=True)
    p.add_argument("--max-frames", type=int, default=None, help="use at most this many middle frames per clip")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    from srbatch.errors import SrbatchError

    try:
        rows = evaluate_clips([m for m in a.models.split(",") if m], a.clips, scale=a.scale,
                              max_frames=a.max_frames, device=a.device)  # fmt: skip
    except SrbatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
