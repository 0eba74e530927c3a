"""Probe a video: stream figures from the container, frame count and keyframes from a scan of the packets."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import av

from srbatch.video._avio import open_input
from srbatch.video._types import Colour, StreamInfo, VideoError, VideoInfo


def _stream_info(s: av.stream.Stream) -> StreamInfo:
    cc = getattr(s, "codec_context", None)
    codec = getattr(cc, "name", None) if cc is not None else None
    return StreamInfo(
        index=s.index,
        type=s.type,
        codec=codec,
        time_base=s.time_base,
        language=s.language,
        sample_rate=getattr(cc, "sample_rate", None) if s.type == "audio" else None,
        channels=getattr(cc, "channels", None) if s.type == "audio" else None,
    )


def _scan_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream, uri: str):
    """``(pts list in decode order, keyframe pts set, last packet duration)`` from the packets only."""
    pts: list[int] = []
    keys: set[int] = set()
    last_duration = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet the demuxer ends with
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:
                raise VideoError(
                    f"{uri}: video packet {len(pts)} has neither pts nor dts; remux the file (e.g. into .mkv) so that "
                    "it carries timestamps"
                )
            pts.append(t)
            if packet.is_keyframe:
                keys.add(t)
            last_duration = packet.duration or last_duration
    except av.error.FFmpegError as e:
        where = f"after frame {len(pts) - 1} (pts {pts[-1]})" if pts else "before the first frame"
        raise VideoError(f"{uri}: the container is corrupt or truncated: reading packets failed {where}: {e}") from e
    return pts, keys, last_duration


def _rotation(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Rotation from the display matrix, as FFmpeg attaches it to decoded frames (only the first frame is decoded)."""
    try:
        for frame in container.decode(stream):
            return int(frame.rotation) % 360
    except av.error.FFmpegError:
        return 0  # an undecodable first frame: read_frames reports it with its index
    return 0


def _declared_end(stream: av.video.stream.VideoStream) -> float | None:
    """Where the video stream ends, in seconds, as its container states it: MP4 gives the track's start and length,
    Matroska a DURATION tag that is the end time (the last frame's time plus its duration)."""
    if stream.duration and stream.time_base:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION") or (stream.metadata or {}).get("duration")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            return None
    return None


def probe(uri: str, storage_options: Mapping[str, Any] | None = None) -> VideoInfo:
    """Figures of the first video stream of ``uri`` (a local path or an fsspec URI such as ``s3://bucket/v.mp4``).

    The frame count, the pts of every frame and the keyframes come from a scan of the packets (no decoding), so a
    container whose header lies about the count is counted right (``declared_frames`` keeps its claim); rotation comes
    from the display matrix of the first decoded frame. Raises :class:`VideoError` when the file cannot be opened, has
    no video, or its packets cannot be read (naming the last frame read), or when it declares more frames, or a longer
    video stream, than its packets hold (a truncated file; the error names the last frame present).
    """
    with open_input(uri, storage_options) as container:
        v = container.streams.video[0]
        cc = v.codec_context
        tb = v.time_base or Fraction(1, 90000)
        fps = v.average_rate or v.base_rate or v.guessed_rate
        if not fps:
            raise VideoError(f"{uri}: the video stream declares no frame rate")
        info_streams = tuple(_stream_info(s) for s in container.streams if s.index != v.index)
        declared = v.frames or None
        declared_end = _declared_end(v)
        colour = Colour(
            range=int(cc.color_range or 0), space=int(cc.colorspace or 2), primaries=int(cc.color_primaries or 2),
            trc=int(cc.color_trc or 2),
        )
        container_name = container.format.name
        video_index = v.index
        header = dict(codec=cc.name, width=cc.width, height=cc.height, pix_fmt=cc.pix_fmt)
        decode_order, keys, last_duration = _scan_packets(container, v, uri)
    if not decode_order:
        raise VideoError(f"{uri}: the video stream holds no frames")
    frame_pts = sorted(decode_order)
    if len(set(frame_pts)) != len(frame_pts):
        raise VideoError(f"{uri}: several video packets share a pts; remux the file so that every frame has its own")
    if declared is not None and declared > len(frame_pts):
        raise VideoError(
            f"{uri}: truncated: the container declares {declared} frames but its packets end at frame "
            f"{len(frame_pts) - 1} (pts {frame_pts[-1]}); re-upload the whole file"
        )
    duration = int(last_duration or round(1 / (fps * tb)))
    seen_end = float((frame_pts[-1] + duration) * tb)
    if declared_end is not None and declared_end - seen_end > 1.5 * float(duration * tb):
        raise VideoError(
            f"{uri}: truncated or corrupt: the video stream is declared to end at {declared_end:.3f} s but its packets "
            f"end at frame {len(frame_pts) - 1} (pts {frame_pts[-1]}, {seen_end:.3f} s); re-upload the whole file"
        )
    keyframes = tuple((bisect.bisect_left(frame_pts, t), t) for t in sorted(keys))
    nominal = 1 / (fps * tb)
    gaps = tuple(
        (i, frame_pts[i], round((frame_pts[i] - frame_pts[i - 1]) / nominal) - 1)
        for i in range(1, len(frame_pts)) if frame_pts[i] - frame_pts[i - 1] > 1.5 * nominal
    )
    with open_input(uri, storage_options) as container:
        rotation = _rotation(container, container.streams.video[0])
    return VideoInfo(
        uri=uri, container=container_name, fps=Fraction(fps), time_base=Fraction(tb), frames=len(frame_pts),
        declared_frames=declared, frame_pts=tuple(frame_pts), frame_duration=duration,
        keyframes=keyframes, colour=colour, rotation=rotation, streams=info_streams, video_index=video_index, gaps=gaps,
        **header,
    )
