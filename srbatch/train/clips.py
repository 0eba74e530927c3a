"""Training data for video models: clips (video files, or folders of frame images), windows of T consecutive frames
cropped at the same place, LR synthesised per frame with one set of degradation parameters per window, optional
H.264 re-encoding of the LR window, and held-out validation clips.

A clip is either a video file (``.mp4 .mkv .mov .webm``, decoded with :mod:`srbatch.video`) or a folder whose images
are the frames in file-name order. ``--data`` pointing at videos is a clip dataset; a dataset of frame folders is one
when ``--clips`` is set, or when the model is temporal (``temporal_radius > 0``).

Degradation of one window: the generator's state is saved before the first frame and restored before each of the
others, so every frame of the window gets the same blur kernel, downscale, noise level and JPEG quality (and, since
the draws repeat, the same noise pattern: fixed-pattern noise; a known simplification). With ``video_crf`` the LR
window (quantised to 8 bits) is then encoded with libx264 (yuv420p, preset ``veryfast``, CRF drawn uniformly in the
range, one CRF per window) and decoded back, so the model sees inter-frame compression artefacts.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from srbatch.errors import ConfigError
from srbatch.io.images import from_float, to_float
from srbatch.io.storage import VIDEO_EXTENSIONS, is_video
from srbatch.train.data import SeededSampler

log = logging.getLogger("srbatch.train")

__all__ = ["VAL_FRAMES", "ClipSampler", "ValClip", "build_val_clips", "list_clips", "read_clip", "x264_roundtrip"]

VAL_FRAMES = 8
"""Validation uses at most this many frames from the middle of each held-out clip."""

def list_clips(spec: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The clips of ``spec``: its video files, else one entry per folder of frame images (the folder URI), sorted.

    A :class:`ConfigError` when it holds neither."""
    from srbatch.errors import SrbatchError
    from srbatch.io.storage import list_images

    try:
        return list_images(spec, storage_options, extensions=VIDEO_EXTENSIONS)
    except SrbatchError:
        pass
    try:
        images = list_images(spec, storage_options)
    except SrbatchError:
        images = []
    folders = sorted({posixpath.dirname(u) for u in images})
    if not folders:
        raise ConfigError(
            f"--data {spec}: no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) and no folders of frame images found; point "
            "--data at videos, or at a folder holding one sub-folder of frames (PNG/JPEG...) per clip"
        )
    return folders


def read_clip(uri: str, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """All frames of a clip as ``(F, H, W, C)`` integer pixels (videos: uint8 RGB; frame folders: as decoded, alpha
    dropped). A :class:`ConfigError` names the clip when its frames differ in size or it has none."""
    if is_video(uri):
        from srbatch.video import plan_segments, probe, read_frames

        info = probe(uri, storage_options)
        seg = plan_segments(info, target_frames=max(1, info.frames) + 1)[0]
        frames = [rgb for _, rgb in read_frames(uri, seg, storage_options=storage_options)]
    else:
        from srbatch.io.storage import list_images
        from srbatch.train.data import read_image

        uris = sorted(u for u in list_images(uri, storage_options) if posixpath.dirname(u) == uri.rstrip("/"))
        frames = [read_image(u, storage_options).pixels for u in uris]
    if not frames:
        raise ConfigError(f"clip {uri}: no frames")
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise ConfigError(f"clip {uri}: frames of different sizes {sorted(shapes)[:3]}; a clip's frames must match")
    return np.stack(frames)


def _encode_roundtrip(frames: np.ndarray, crf: int) -> np.ndarray:
    import av

    buf = io.BytesIO()
    n, h, w, _ = frames.shape
    with av.open(buf, "w", format="matroska") as out:
        st = out.add_stream("libx264", rate=25, options={"crf": str(crf), "preset": "veryfast"})
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    buf.seek(0)
    with av.open(buf, "r") as inp:
        dec = [fr.to_ndarray(format="rgb24") for fr in inp.decode(video=0)]
    if len(dec) != n:
        raise RuntimeError(f"x264 round trip returned {len(dec)} frames for {n}")
    return np.stack(dec)


def x264_roundtrip(frames: np.ndarray, crf: int) -> np.ndarray:
    """``(T, h, w, 3)`` uint8 RGB -> the same frames after libx264 (yuv420p, CRF ``crf``, preset veryfast) and back.
    Odd sizes are edge-padded to even ones for the encoder and cropped back; grey frames go through as RGB."""
    t, h, w, c = frames.shape
    x = frames if c == 3 else np.repeat(frames, 3, axis=3)
    ph, pw = h % 2, w % 2
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    y = _encode_roundtrip(x, int(crf))[:, :h, :w]
    if c == 1:
        y = np.round(y.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
    return y


def degrade_window(
    hr: torch.Tensor, scale: int, degradation: Any, gen: torch.Generator, video_crf: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(T, C, H, W)`` HR frames -> ``(T, C, H/s, W/s)`` LR frames, one set of degradation parameters for all
    frames (see the module docs), then (with ``video_crf``) an x264 round trip of the 8-bit LR window."""
    from srbatch.train.degrade import degrade

    state = gen.get_state()
    out = []
    for f in hr:
        gen.set_state(state)
        out.append(degrade(f, scale, degradation, gen))
    lr = torch.stack(out)
    if video_crf is not None:
        lo, hi = video_crf
        crf = int(torch.randint(int(lo), int(hi) + 1, (), generator=gen).item())
        u8 = from_float(lr.clamp(0, 1).permute(0, 2, 3, 1).numpy(), np.uint8)
        lr = torch.from_numpy(to_float(x264_roundtrip(u8, crf)).transpose(0, 3, 1, 2).copy())
    return lr


class ClipSampler(SeededSampler):
    """Random training windows from in-memory clips.

    ``sample(n)`` returns LR ``(n, T, C, crop/s, crop/s)`` (``(n, C, crop/s, crop/s)`` when ``T == 1``) and the HR
    centre frames ``(n, C, crop, crop)``, float32 in [0, 1]. A window is ``T = 2 * radius + 1`` consecutive frames of
    one clip, cropped at the same place, with the same flips/transpose. Clips shorter than ``T`` frames or smaller
    than the crop are an error naming them.
    """

    def __init__(
        self,
        clips: Sequence[np.ndarray],
        *,
        radius: int,
        scale: int,
        crop_size: int,
        degradation: Any,
        seed: int,
        video_crf: tuple[int, int] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.radius, self.frames = int(radius), 2 * int(radius) + 1
        self.scale, self.crop = int(scale), int(crop_size)
        self.degradation, self.video_crf = degradation, video_crf
        self.gen = torch.Generator().manual_seed(int(seed))
        names = list(names or [f"clip {i}" for i in range(len(clips))])
        self.clips: list[torch.Tensor] = []
        for name, c in zip(names, clips):
            if c.shape[0] < self.frames:
                raise ConfigError(
                    f"clip {name} has {c.shape[0]} frame(s); the model's window needs {self.frames} (temporal radius "
                    f"{self.radius}): remove the clip or give longer ones"
                )
            if c.shape[1] < self.crop or c.shape[2] < self.crop:
                raise ConfigError(f"clip {name} is {c.shape[2]}x{c.shape[1]}, smaller than the {self.crop} px crop; "
                                  "lower --crop-size")  # fmt: skip
            self.clips.append(torch.from_numpy(np.ascontiguousarray(to_float(c).transpose(0, 3, 1, 2))))
        if not self.clips:
            raise ConfigError("no training clips")
        w = [float(c.shape[2] * c.shape[3] * (c.shape[0] - self.frames + 1)) for c in self.clips]
        self.weights = torch.tensor(w, dtype=torch.float64) / sum(w)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` augmented windows: (LR frames, HR centre frame)."""
        s, c, t = self.scale, self.crop, self.frames
        idx = torch.multinomial(self.weights, n, replacement=True, generator=self.gen).tolist()
        lrs, hrs = [], []
        for i in idx:
            clip = self.clips[i]
            f0 = self._randint(clip.shape[0] - t + 1)
            y, x = self._randint(clip.shape[2] - c + 1), self._randint(clip.shape[3] - c + 1)
            win = clip[f0 : f0 + t, :, y : y + c, x : x + c]
            flips = torch.randint(0, 2, (4,), generator=self.gen).tolist()
            if flips[0]:
                win = win.flip(-1)
            if flips[1]:
                win = win.flip(-2)
            if flips[2]:
                win = win.transpose(-1, -2)
            if flips[3]:  # time reversal: the centre frame stays the centre
                win = win.flip(0)
            win = win.contiguous()
            lrs.append(degrade_window(win, s, self.degradation, self.gen, self.video_crf))
            hrs.append(win[self.radius])
        lr = torch.stack(lrs).contiguous()
        return (lr[:, 0] if t == 1 else lr), torch.stack(hrs).contiguous()


@dataclass(frozen=True)
class ValClip:
    """One held-out clip: ``(F, H, W, C)`` integer HR frames and their LR frames (quantised like the data)."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


def build_val_clips(
    clips: Sequence[tuple[str, np.ndarray]],
    *,
    scale: int,
    degradation: Any,
    max_size: int,
    seed: int,
    max_frames: int = VAL_FRAMES,
    video_crf: tuple[int, int] | None = None,
) -> list[ValClip]:
    """Validation clips: at most ``max_frames`` frames from the middle of each clip, HR centre-cropped to at most
    ``max_size`` pixels (a multiple of the scale), LR by MATLAB ``imresize`` rounded to the integer type (bicubic),
    or by :func:`degrade_window` from a generator seeded per clip (other degradations; ``video_crf`` at its middle)."""
    from srbatch.metrics.resize import imresize_uint8
    from srbatch.train.data import _center_crop

    out = []
    for i, (name, px) in enumerate(clips):
        f = px.shape[0]
        k = min(f, max_frames)
        a = (f - k) // 2
        hr = np.stack([_center_crop(fr, max_size, scale) for fr in px[a : a + k]])
        if degradation.kind == "bicubic" and video_crf is None:
            lr = np.stack([imresize_uint8(fr, 1 / scale) if scale > 1 else fr for fr in hr])
        else:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            mid = None if video_crf is None else ((video_crf[0] + video_crf[1]) // 2,) * 2
            hr_t = torch.from_numpy(np.ascontiguousarray(to_float(hr).transpose(0, 3, 1, 2)))
            lr_f = degrade_window(hr_t, scale, degradation, gen, mid)
            lr = from_float(lr_f.numpy().transpose(0, 2, 3, 1), hr.dtype)
        out.append(ValClip(name, hr, lr))
    return out


def windows(frames: Sequence[np.ndarray], radius: int) -> list[list[np.ndarray]]:
    """The window of every frame: frames ``t - radius .. t + radius``, indices clamped to the clip (edge frames
    repeated), as the video upscale path does."""
    n = len(frames)
    return [[frames[min(max(t + d, 0), n - 1)] for d in range(-radius, radius + 1)] for t in range(n)]
