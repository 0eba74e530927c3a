"""Videos in the comparison job: which frames are compared, how each model's window is read, and the flicker run.

A video listed with ``--images`` becomes ``--video-frames`` comparison inputs named ``<stem>#f<index>``. Frame rule
(:func:`sample_frames`): of ``n`` frames, the ``k`` frames ``floor((i + 1) * (n - 1) / (k + 1) + 1/2)``, ``i < k``
(evenly spaced, never the first or last frame when ``n >= k + 2``, so a temporal window has real neighbours);
duplicates dropped. Every model gets frame ``t`` through :meth:`srbatch.inference.Upscaler.upscale_frames` with the
window ``t - r .. t + r`` its ``temporal_radius`` needs, indices clamped to the video (image models: ``t`` alone).
Reference mode: the HR is the decoded frame cropped to a multiple of the scale, the LR of every window frame is its
MATLAB-bicubic downscale rounded to uint8 (as for images); real mode: the decoded frames are the LR.

Flicker (reference mode, ``--video-flicker-frames L`` > 1): on the first sampled frame's row of each video, the
temporal-difference error of :func:`srbatch.video.evaluate.flicker` over the ``L`` consecutive frames
``[(n - L) // 2, (n - L) // 2 + L)`` (the middle of the video), each upscaled with its clamped window as above.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np

from srbatch.io.storage import VIDEO_EXTENSIONS, is_video

__all__ = ["VIDEO_EXTENSIONS", "is_video", "sample_frames", "flicker_run", "frame_name", "read_span",
           "video_items", "VideoFrames"]  # fmt: skip


def sample_frames(n: int, k: int) -> list[int]:
    """The frame indices compared of a video of ``n`` frames: ``floor((i + 1) * (n - 1) / (k + 1) + 1/2)`` for
    ``i < k``, in order, without duplicates (see the module docs)."""
    if n <= 0 or k <= 0:
        return []
    out: list[int] = []
    for i in range(k):
        t = (2 * (i + 1) * (n - 1) + k + 1) // (2 * (k + 1))
        if t not in out:
            out.append(t)
    return out


def flicker_run(n: int, length: int) -> tuple[int, int]:
    """``[start, end)``: ``length`` consecutive frames around the middle of a video of ``n`` frames (fewer when
    the video is shorter)."""
    length = min(length, n)
    start = max(0, (n - length) // 2)
    return start, start + length


def frame_name(uri: str, index: int) -> str:
    """``<video stem>#f<index>``: a video frame's name in the comparison."""
    return f"{posixpath.splitext(posixpath.basename(uri.rstrip('/')))[0]}#f{index}"


def read_span(uri: str, info: Any, start: int, end: int,
              storage_options: Mapping[str, Any] | None = None) -> dict[int, np.ndarray]:  # fmt: skip
    """Frames ``[start, end)`` of the probed video ``info`` as ``{index: (H, W, 3) uint8}``, decoded from the last
    keyframe at or before ``start``. Raises :class:`~srbatch.video.VideoError` naming the frame where decoding broke."""
    from srbatch.video import Segment, read_frames

    keys = sorted((i, p) for i, p in info.keyframes if i <= start) or [(0, info.frame_pts[0])]
    seek_index, seek_pts = keys[-1]
    seg = Segment(id=f"compare-{start}-{end}", number=0, start=start, end=end, read_start=start, read_end=end,
                  seek_index=seek_index, seek_pts=seek_pts, overlap=0)  # fmt: skip
    return dict(read_frames(uri, seg, storage_options=storage_options))


def video_items(uri: str, frames: int, flicker_frames: int, mode: str,
                storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The comparison items of one video (driver side): one per sampled frame. A video that cannot be probed is one
    item ``<stem>#f?`` with frame index -1; the worker probes it again and reports the error as a failed row."""
    from srbatch.video import VideoError, probe

    base = {"image_uri": uri, "lr_uri": "", "video_uri": uri, "flicker_frames": 0}
    try:
        info = probe(uri, storage_options)
    except VideoError:
        return [{**base, "image": f"{frame_name(uri, 0).rsplit('#', 1)[0]}#f?", "frame_index": -1}]
    idx = sample_frames(info.frames, frames)
    flick = flicker_frames if mode == "reference" and flicker_frames > 1 and info.frames > 1 else 0
    return [{**base, "image": frame_name(uri, t), "frame_index": t, "flicker_frames": flick if i == 0 else 0}
            for i, t in enumerate(idx)]  # fmt: skip


class VideoFrames:
    """One video opened for a worker: probe once, decode spans on demand (cached), make the windows a model needs."""

    def __init__(self, uri: str, scale: int, mode: str, storage_options: Mapping[str, Any] | None = None) -> None:
        from srbatch.video import probe

        self.uri, self.scale, self.mode, self.so = uri, scale, mode, storage_options
        self.info = probe(uri, storage_options)
        self.n = self.info.frames
        self._hr: dict[int, np.ndarray] = {}
        self._lr: dict[int, np.ndarray] = {}

    def _load(self, indices: list[int]) -> None:
        need = [t for t in indices if t not in self._hr]
        if not need:
            return
        for t, px in read_span(self.uri, self.info, min(need), max(need) + 1, self.so).items():
            if t in self._hr:
                continue
            if self.mode == "reference":
                from srbatch.metrics.resize import imresize_uint8

                s = self.scale
                h, w = (px.shape[0] // s) * s, (px.shape[1] // s) * s
                if h < s or w < s:
                    from srbatch.errors import ConfigError

                    raise ConfigError(f"{self.uri} is {px.shape[1]}x{px.shape[0]}: smaller than the scale {s}")
                hr = np.ascontiguousarray(px[:h, :w])
                self._hr[t], self._lr[t] = hr, (imresize_uint8(hr, 1.0 / s) if s > 1 else hr)
            else:
                self._hr[t] = self._lr[t] = px

    def window(self, t: int, radius: int) -> list[np.ndarray]:
        """LR frames ``t - radius .. t + radius``, indices clamped to the video."""
        idx = [min(max(t + d, 0), self.n - 1) for d in range(-radius, radius + 1)]
        self._load(idx)
        return [self._lr[i] for i in idx]

    def hr(self, t: int) -> np.ndarray | None:
        """The reference frame ``t`` (reference mode), None in real mode."""
        if self.mode != "reference":
            return None
        self._load([t])
        return self._hr[t]

    def lr(self, t: int) -> np.ndarray:
        self._load([t])
        return self._lr[t]
