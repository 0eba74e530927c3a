"""The records the video modules pass around: what a probe found, and the segments a video is cut into."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from srbatch.errors import SrbatchError


class VideoError(SrbatchError):
    """A video could not be opened, probed, decoded, encoded or joined. Decode failures name the frame index (and its
    pts) where decoding broke."""


@dataclass(frozen=True)
class StreamInfo:
    """A non-video stream of a container (audio, subtitles, data), copied as packets by :func:`join_segments`."""

    index: int
    type: str
    """``audio``, ``subtitle``, ``data`` or ``attachment``."""
    codec: str | None
    time_base: Fraction | None
    language: str | None = None
    sample_rate: int | None = None
    channels: int | None = None


@dataclass(frozen=True)
class Colour:
    """Colour metadata as FFmpeg numbers them (``AVColorRange``, ``AVColorSpace``, ``AVColorPrimaries``,
    ``AVColorTransferCharacteristic``): range 1 = limited/TV (``mpeg``), 2 = full/PC (``jpeg``), 0 = unspecified;
    space 1 = BT.709, 5/6 = BT.601, 9 = BT.2020, 2 = unspecified (converted as BT.601, FFmpeg's swscale default)."""

    range: int = 0
    space: int = 2
    primaries: int = 2
    trc: int = 2

    @property
    def full_range(self) -> bool:
        return self.range == 2


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`srbatch.video.probe` found. Frame indices are in presentation order, 0-based."""

    uri: str
    container: str
    codec: str
    width: int
    height: int
    pix_fmt: str | None
    fps: Fraction
    """Nominal frame rate (the stream's average rate, else its base rate)."""
    time_base: Fraction
    frames: int
    """Frames counted from the packets (the container's own count, when it has one, is ``declared_frames``)."""
    declared_frames: int | None
    frame_pts: tuple[int, ...]
    """The pts of every frame in presentation order (``time_base`` units)."""
    frame_duration: int
    """The duration of one frame in ``time_base`` units (the last packet's, else 1/fps)."""
    keyframes: tuple[tuple[int, int], ...]
    """``(frame index, pts)`` of every keyframe, from the packet flags (no decoding)."""
    colour: Colour
    rotation: int
    """Counter-clockwise display rotation in degrees from the display matrix (0 when there is none)."""
    streams: tuple[StreamInfo, ...] = field(default_factory=tuple)
    """The other streams (audio, subtitles, ...)."""
    video_index: int = 0
    """Index of the video stream in the container."""
    gaps: tuple[tuple[int, int, int], ...] = ()
    """``(frame index, pts, about how many frames are missing before it)`` wherever two consecutive frames are more
    than 1.5 nominal frame durations apart: lost packets in a damaged file, or a variable frame rate. Not an error
    by itself (variable-rate phone videos have them); callers may refuse or report them."""

    @property
    def duration(self) -> float:
        """Seconds from the first frame's pts to the end of the last frame."""
        if not self.frame_pts:
            return 0.0
        return float((self.frame_pts[-1] + self.frame_duration - self.frame_pts[0]) * self.time_base)

    @property
    def keyframe_indices(self) -> tuple[int, ...]:
        return tuple(i for i, _ in self.keyframes)


@dataclass(frozen=True)
class Segment:
    """A piece of a video that one worker processes.

    It writes the frames ``[start, end)``; it reads ``[read_start, read_end)`` (``start - overlap`` .. ``end + overlap``,
    clamped to the video) so that a temporal window has its neighbours; decoding begins at the keyframe
    ``seek_index`` (pts ``seek_pts``), the last keyframe at or before ``read_start``.
    """

    id: str
    """Stable across reruns of the same plan: ``"s{number:04d}-{start:08d}-{end:08d}"``."""
    number: int
    start: int
    end: int
    read_start: int
    read_end: int
    seek_index: int
    seek_pts: int
    overlap: int

    @property
    def frames(self) -> int:
        return self.end - self.start
