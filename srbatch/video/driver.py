"""The reference path: plan segments, run a frame function over each, encode, join. One process, no Ray.

The upscale job distributes :func:`process_segment` over actors and calls :func:`join_segments`; this driver does the
same in a loop, so tests (and the job's own tests) can compare with it.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srbatch.errors import ConfigError
from srbatch.video._types import Segment, VideoError, VideoInfo
from srbatch.video.decode import read_frames
from srbatch.video.encode import DEFAULT_CONTAINER, SegmentWriter
from srbatch.video.join import JoinResult, join_segments
from srbatch.video.probe import probe
from srbatch.video.segments import plan_segments

FrameFn = Callable[[Any], np.ndarray]
"""``radius == 0``: ``(H, W, 3) uint8 -> (H', W', 3) uint8``; ``radius > 0``: a list of ``2 * radius + 1`` frames
(t - radius .. t + radius, edge frames repeated at the ends of the video) -> the output frame for t."""


def _windows(
    frames: Iterator[tuple[int, np.ndarray]], segment: Segment, radius: int
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """``(t, window)`` for every t in ``[segment.start, segment.end)``; the window's indices are clamped to the read
    range, which equals clamping to the video, since the read range is the segment +- overlap clamped to the video."""
    buf: deque[tuple[int, np.ndarray]] = deque()
    lo, hi = segment.read_start, segment.read_end

    def window(t: int) -> list[np.ndarray]:
        base = buf[0][0]
        return [buf[min(max(t + d, lo), hi - 1) - base][1] for d in range(-radius, radius + 1)]

    t = segment.start
    for index, rgb in frames:
        buf.append((index, rgb))
        while t < segment.end and (index >= min(t + radius, hi - 1)):
            yield t, window(t)
            t += 1
            while buf and buf[0][0] < max(t - radius, lo):
                buf.popleft()
    if t != segment.end:
        raise VideoError(f"segment {segment.id}: frames ended at {t}, expected up to {segment.end - 1}")


def process_segment(
    src: str, segment: Segment, info: VideoInfo, frame_fn: FrameFn, out_uri: str, *, radius: int = 0,
    codec: str = "libx264", crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None,
    options: Mapping[str, str] | None = None, storage_options: Mapping[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    """Decode ``segment`` of ``src``, apply ``frame_fn`` to each of its frames (with ``radius`` neighbours on each
    side), encode the results into ``out_uri`` with the source's pts, colour tags and rotation; returns the frames
    written (``segment.frames``). ``timings``, when given, gets the seconds spent reading+decoding (``decode``) and
    encoding+writing (``encode``) added to it."""
    if radius > segment.overlap:
        raise ConfigError(f"overlap: a temporal radius of {radius} needs segments planned with overlap >= {radius}, "
                          f"got {segment.overlap}")
    writer: SegmentWriter | None = None
    clock = timings if timings is not None else {}
    frames = _timed(read_frames(src, segment, storage_options=storage_options), clock)
    try:
        for t, win in _windows(frames, segment, radius):
            out = frame_fn(win if radius else win[0])
            out = np.asarray(out)
            if writer is None:
                writer = SegmentWriter(
                    out_uri, width=out.shape[1], height=out.shape[0], fps=info.fps, time_base=info.time_base,
                    codec=codec, crf=crf, preset=preset, pix_fmt=pix_fmt, colour=info.colour, rotation=info.rotation,
                    options=options, storage_options=storage_options,
                ).__enter__()
            t0 = time.perf_counter()
            writer.write(out, info.frame_pts[t])
            clock["encode"] = clock.get("encode", 0.0) + time.perf_counter() - t0
    except BaseException as e:
        if writer is not None:
            writer.__exit__(type(e), e, None)
        raise
    if writer is None:
        raise VideoError(f"{src}: segment {segment.id} produced no frames")
    t0 = time.perf_counter()
    writer.__exit__(None, None, None)
    clock["encode"] = clock.get("encode", 0.0) + time.perf_counter() - t0
    return writer.frames


def _timed(it: Iterator[Any], clock: dict[str, float]) -> Iterator[Any]:
    """``it``, with the seconds spent inside it added to ``clock["decode"]`` (closed with it)."""
    try:
        while True:
            t0 = time.perf_counter()
            try:
                x = next(it)
            except StopIteration:
                return
            finally:
                clock["decode"] = clock.get("decode", 0.0) + time.perf_counter() - t0
            yield x
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


@dataclass
class VideoResult:
    """What :func:`upscale_video_local` did."""

    src: str
    dst: str
    frames: int
    fps: Any
    segments: list[Segment] = field(default_factory=list)
    segment_uris: list[str] = field(default_factory=list)
    join: JoinResult | None = None


def upscale_video_local(
    src: str, dst: str, frame_fn: FrameFn, *, segment_frames: int = 250, overlap: int | None = None, radius: int = 0,
    codec: str = "libx264", crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None,
    options: Mapping[str, str] | None = None, work_dir: str | None = None,
    copy_streams: Sequence[str] = ("audio", "subtitle"), storage_options: Mapping[str, Any] | None = None,
) -> VideoResult:
    """Probe ``src``, cut it into segments of about ``segment_frames`` frames (``overlap`` defaults to ``radius``),
    run :func:`process_segment` on each into ``work_dir`` (a temporary folder by default; segment files are named
    ``{segment.id}{ext}``, ``ext`` being ``dst``'s), then :func:`join_segments` into ``dst`` with the source's audio and
    subtitles copied."""
    overlap = radius if overlap is None else overlap
    ext = posixpath.splitext(dst)[1].lower() or DEFAULT_CONTAINER.get(codec, ".mkv")
    info = probe(src, storage_options)
    segments = plan_segments(info, target_frames=segment_frames, overlap=overlap)
    with tempfile.TemporaryDirectory(prefix="srbatch-segments-") as tmp:
        base = work_dir or tmp
        uris = [f"{base.rstrip('/')}/{s.id}{ext}" if "://" in base else os.path.join(base, f"{s.id}{ext}")
                for s in segments]
        for segment, uri in zip(segments, uris):
            process_segment(src, segment, info, frame_fn, uri, radius=radius, codec=codec, crf=crf, preset=preset,
                            pix_fmt=pix_fmt, options=options, storage_options=storage_options)
        joined = join_segments(uris, src, dst, source_info=info, copy_streams=copy_streams,
                               storage_options=storage_options)
    return VideoResult(src=src, dst=dst, frames=info.frames, fps=info.fps, segments=segments, segment_uris=uris,
                       join=joined)
