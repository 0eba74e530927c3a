"""Decode the frames of one segment: seek to its keyframe, decode, keep the frames it reads."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import av
import numpy as np

from srbatch.video._avio import open_input
from srbatch.video._colour import frame_to_rgb
from srbatch.video._types import Segment, VideoError


def read_frames(
    uri: str, segment: Segment, *, storage_options: Mapping[str, Any] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(frame index, (H, W, 3) uint8 RGB)`` for every frame of ``[segment.read_start, segment.read_end)``, in order.

    Seeks to the keyframe ``segment.seek_pts`` (frame ``segment.seek_index``) and counts decoded frames from there, in
    presentation order. Raises :class:`VideoError` naming the frame index (and the pts) where decoding broke: a decoder
    or demuxer error, a seek that did not land on the planned keyframe, or a stream that ends before ``read_end``
    (a truncated file). Display rotation is not applied (pixels are as coded; the writer keeps the tag).
    """
    index = segment.seek_index - 1  # index of the last frame decoded
    last_pts: int | None = None

    def where() -> str:
        return f"frame {index + 1} (after pts {last_pts})" if last_pts is not None else (
            f"frame {segment.seek_index} (the keyframe at pts {segment.seek_pts})")

    with open_input(uri, storage_options) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            if segment.seek_index > 0:
                container.seek(segment.seek_pts, stream=stream, backward=True, any_frame=False)
            for packet in container.demux(stream):
                for frame in packet.decode():
                    pts = frame.pts if frame.pts is not None else frame.dts
                    if pts is None:
                        raise VideoError(f"{uri}: decoded a frame without a timestamp at {where()}")
                    if pts < segment.seek_pts:
                        continue  # an earlier keyframe's group, when the demuxer seeks short
                    if last_pts is None and pts != segment.seek_pts:
                        raise VideoError(
                            f"{uri}: seeking to the keyframe of frame {segment.seek_index} (pts {segment.seek_pts}) "
                            f"gave pts {pts} first; the file changed since it was probed, or its index is wrong: "
                            "probe it again, or remux it"
                        )
                    if last_pts is not None and pts <= last_pts:
                        raise VideoError(
                            f"{uri}: frame {index + 1} has pts {pts}, not after the previous frame's {last_pts}; "
                            "remux the file with increasing timestamps"
                        )
                    index += 1
                    last_pts = pts
                    if index >= segment.read_end:
                        return
                    if index >= segment.read_start:
                        yield index, frame_to_rgb(frame)
        except av.error.FFmpegError as e:
            raise VideoError(f"{uri}: decoding failed at {where()}: {e}") from e
    if last_pts is None:
        raise VideoError(
            f"{uri}: no frame could be decoded from frame {segment.seek_index} (the keyframe at pts "
            f"{segment.seek_pts}) on, which segment {segment.id} needs (frames {segment.read_start}.."
            f"{segment.read_end - 1}): the file is truncated or corrupt there; re-upload it"
        )
    if index < segment.read_end - 1:
        raise VideoError(
            f"{uri}: the stream ends at frame {index} (pts {last_pts}) but segment {segment.id} needs frames up to "
            f"{segment.read_end - 1}: the file is truncated or corrupt after frame {index}; re-upload it"
        )
