"""Join encoded segments into one file by copying packets (no re-encoding), with the source's other streams.

Timestamps: segment ``k`` holds frames ``[start_k, start_k + frames_k)`` of the source, where ``start_k`` is the sum
of the frame counts before it. Each video packet gets, as its pts, the source's pts of the frame it shows (its rank
among the segment's pts gives the frame), in the source's time base; its dts keeps the segment's own pts-dts
distance (the codec's reordering delay). So the output has the source's frame count, timestamps, frame rate and
duration, whatever time base each segment container used. Audio, subtitle and data streams of the source are copied
packet for packet (bytes and timestamps unchanged), interleaved with the video by time.

The output container must hold the video codec and the source's audio (e.g. AAC in .mp4/.mov/.mkv, Opus in
.mkv/.webm/.mp4); when it cannot, a :class:`VideoError` says to write .mkv (which holds every codec). Subtitles the
container cannot hold (SubRip/ASS in .mp4 or .webm) are left out and listed in :attr:`JoinResult.skipped_streams`,
since copying them would need a conversion.

Matroska/WebM keep times in milliseconds and cannot start below zero: when the source has negative timestamps (the
priming packet of AAC in MP4), the muxer shifts every stream by the same amount, so audio and video stay in sync.
"""

from __future__ import annotations

import contextlib
import heapq
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from srbatch.video._avio import local_output, open_input
from srbatch.video._types import VideoError, VideoInfo
from srbatch.video.encode import _FORMATS
from srbatch.video.probe import probe


@dataclass(frozen=True)
class JoinResult:
    out_uri: str
    frames: int
    segments: int
    copied_packets: dict[int, int]
    """Source stream index -> packets copied, for the non-video streams."""
    skipped_streams: tuple[str, ...] = ()
    """Subtitle streams the output container cannot hold (e.g. SubRip in .mp4), as ``"index:codec"``; left out."""


def _video_packets(
    uris: Sequence[str], infos: Sequence[VideoInfo], source: VideoInfo, storage_options, out_stream
) -> Iterator[tuple[Fraction, int, av.Packet]]:
    start = 0
    order = 0
    last_dts: int | None = None
    for uri, info in zip(uris, infos):
        rank = {p: r for r, p in enumerate(info.frame_pts)}
        scale = info.time_base / source.time_base
        with open_input(uri, storage_options) as container:
            stream = container.streams.video[0]
            first = True
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if first and not packet.is_keyframe:
                    raise VideoError(f"{uri}: the segment does not start with a keyframe; encode it again")
                first = False
                seg_pts = packet.pts if packet.pts is not None else packet.dts
                pts = source.frame_pts[start + rank[seg_pts]]
                dts = None
                if packet.dts is not None:
                    dts = pts - round((seg_pts - packet.dts) * scale)
                    if last_dts is not None and dts <= last_dts:
                        dts = last_dts + 1
                    dts = min(dts, pts)
                    last_dts = dts
                packet.stream = out_stream
                packet.time_base = source.time_base
                packet.pts, packet.dts = pts, dts
                if packet.duration:
                    packet.duration = round(packet.duration * scale)
                key = (dts if dts is not None else pts) * source.time_base
                yield key, order, packet
                order += 1
        start += info.frames


def _other_packets(
    source_uri: str, storage_options, mapping: dict[int, av.stream.Stream], counts: dict[int, int]
) -> Iterator[tuple[Fraction, int, av.Packet]]:
    if not mapping:
        return
    with open_input(source_uri, storage_options) as container:
        streams = [s for s in container.streams if s.index in mapping]
        order = 0
        for packet in container.demux(*streams):
            if packet.size == 0:
                continue
            src_index = packet.stream.index
            t = packet.dts if packet.dts is not None else packet.pts
            key = (t * packet.time_base) if t is not None else Fraction(0)
            packet.stream = mapping[src_index]
            counts[src_index] += 1
            yield key, order, packet
            order += 1


def join_segments(
    segment_uris: Sequence[str], source_uri: str, out_uri: str, *, source_info: VideoInfo | None = None,
    copy_streams: Sequence[str] = ("audio", "subtitle"), storage_options: Mapping[str, Any] | None = None,
) -> JoinResult:
    """Remux the video packets of ``segment_uris`` (in order) and the source's ``copy_streams`` into ``out_uri``.

    Nothing is re-encoded. Checks that the segments add up to the source's frame count, that each starts with a
    keyframe and that they were encoded alike (same codec, size and codec extradata); keeps the source's rotation
    (display matrix) and the segments' colour tags. ``source_info`` saves a probe of the source when the caller has it.
    """
    if not segment_uris:
        raise VideoError(f"{out_uri}: no segments to join")
    ext = posixpath.splitext(out_uri)[1].lower()
    if ext not in _FORMATS:
        raise VideoError(f"{out_uri}: unsupported output container {ext!r}; use one of {', '.join(_FORMATS)}")
    source = source_info or probe(source_uri, storage_options)
    infos = [probe(u, storage_options) for u in segment_uris]
    total = sum(i.frames for i in infos)
    if total != source.frames:
        raise VideoError(
            f"{out_uri}: the segments hold {total} frames, the source {source_uri} has {source.frames}: a segment is "
            f"missing or incomplete ({', '.join(f'{u}: {i.frames}' for u, i in zip(segment_uris, infos))})"
        )
    first = infos[0]
    with contextlib.ExitStack() as stack:
        template_in = stack.enter_context(open_input(segment_uris[0], storage_options))
        template = template_in.streams.video[0]
        extradata = template.codec_context.extradata
        for uri, info in zip(segment_uris[1:], infos[1:]):
            if (info.codec, info.width, info.height) != (first.codec, first.width, first.height):
                raise VideoError(
                    f"{uri}: {info.codec} {info.width}x{info.height}, but {segment_uris[0]} is {first.codec} "
                    f"{first.width}x{first.height}: segments must be encoded with the same settings"
                )
            with open_input(uri, storage_options) as c:
                if c.streams.video[0].codec_context.extradata != extradata:
                    raise VideoError(
                        f"{uri}: its codec headers (extradata) differ from {segment_uris[0]}'s: segments must be "
                        "encoded with the same codec settings; encode it again"
                    )
        path = stack.enter_context(local_output(out_uri, storage_options))
        try:
            out = stack.enter_context(av.open(path, "w", format=_FORMATS[ext]))
            holds = out.supported_codecs
            if template.codec_context.name not in holds:
                raise VideoError(
                    f"{out_uri}: a {ext} file cannot hold {template.codec_context.name} video; write .mkv, or encode "
                    "the segments with a codec this container holds"
                )
            vout = out.add_stream_from_template(template)
            vout.time_base = source.time_base
            if source.rotation:
                vout.set_display_rotation(source.rotation)
            counts: dict[int, int] = {}
            mapping: dict[int, av.stream.Stream] = {}
            skipped: list[str] = []
            src_in = stack.enter_context(open_input(source_uri, storage_options))
            for s in src_in.streams:
                if s.type not in copy_streams or s.index == source.video_index:
                    continue
                name = s.codec_context.name if s.codec_context is not None else None
                if name not in holds:
                    if s.type == "subtitle":
                        skipped.append(f"{s.index}:{name}")
                        continue
                    raise VideoError(
                        f"{out_uri}: a {ext} file cannot hold the source's {s.type} stream {s.index} ({name}), which "
                        "is copied without re-encoding: write .mkv (it holds every codec), or leave the stream out "
                        f"(copy_streams without {s.type!r})"
                    )
                mapping[s.index] = out.add_stream_from_template(s)
                counts[s.index] = 0
            video = _video_packets(segment_uris, infos, source, storage_options, vout)
            others = _other_packets(source_uri, storage_options, mapping, counts)
            for _, _, packet in heapq.merge(video, others, key=lambda t: t[0]):
                out.mux(packet)
        except av.error.FFmpegError as e:
            raise VideoError(
                f"{out_uri}: muxing failed: {e}; either the {ext} container cannot hold {first.codec} or the source's "
                f"{', '.join(s.codec or s.type for s in source.streams if s.type in copy_streams)} (.mkv holds them "
                "all), or the segments' timestamps do not follow each other (segments of another plan or source)"
            ) from e
    return JoinResult(out_uri=out_uri, frames=total, segments=len(segment_uris), copied_packets=counts,
                      skipped_streams=tuple(skipped))
