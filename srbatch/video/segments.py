"""Cut a video into segments that start at keyframes, each with the overlap frames a temporal window needs."""

from __future__ import annotations

import bisect

from srbatch.errors import ConfigError
from srbatch.video._types import Segment, VideoInfo


def plan_segments(info: VideoInfo, *, target_frames: int, overlap: int = 0) -> list[Segment]:
    """Segments of about ``target_frames`` frames covering every frame of ``info`` exactly once, in order.

    Boundaries are keyframes: each segment after the first starts at the keyframe nearest to ``target_frames`` after
    the previous start (never at the previous start itself), so that a video with too few keyframes becomes fewer,
    longer segments (one when it has a single keyframe); once fewer than 1.5 x ``target_frames`` frames remain, they
    are the last segment. Each segment also reads ``overlap`` frames before and after
    its range (clamped to the video), and decodes from the last keyframe at or before its first read frame. The plan
    depends only on the frame count, the keyframes and the two arguments, so a rerun gives the same ids.
    """
    if target_frames < 1:
        raise ConfigError(f"target_frames must be >= 1 (frames per segment), got {target_frames}")
    if overlap < 0:
        raise ConfigError(f"overlap must be >= 0 (frames read on each side of a segment), got {overlap}")
    n = info.frames
    keys = sorted({i for i, _ in info.keyframes if 0 <= i < n})
    if not keys or keys[0] != 0:
        keys = [0, *keys]  # a stream that does not start on a flagged keyframe still decodes from its first packet
    key_pts = {i: p for i, p in info.keyframes}
    key_pts.setdefault(0, info.frame_pts[0])

    starts = [0]
    while n - starts[-1] >= target_frames + (target_frames + 1) // 2:  # else the rest is the last segment
        cur = starts[-1]
        later = keys[bisect.bisect_right(keys, cur):]
        if not later:
            break
        want = cur + target_frames
        starts.append(min(later, key=lambda k: (abs(k - want), k)))

    segments = []
    bounds = [*starts, n]
    for number, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        read_start = max(0, start - overlap)
        read_end = min(n, end + overlap)
        seek_index = keys[bisect.bisect_right(keys, read_start) - 1]
        segments.append(Segment(
            id=f"s{number:04d}-{start:08d}-{end:08d}", number=number, start=start, end=end, read_start=read_start,
            read_end=read_end, seek_index=seek_index, seek_pts=key_pts[seek_index], overlap=overlap,
        ))
    return segments
