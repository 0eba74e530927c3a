"""Encode RGB frames into a segment file with the source's timestamps, colour tags and rotation.

Codecs and containers (the output container is chosen by the file extension):

======================  ==========================  =========================  =======================
codec                   quality knobs (defaults)    pixel format (default)     containers
======================  ==========================  =========================  =======================
``libx264``             crf 18, preset ``medium``   ``yuv420p``                .mp4 .mov .mkv
``libvpx-vp9``          crf 32 (constant quality),  ``yuv420p``                .webm .mkv .mp4
                        preset = ``cpu-used`` (4)
``libsvtav1``           crf 35, preset 8 (0-13)     ``yuv420p``                .mp4 .mkv .webm
``ffv1`` (lossless)     none                        ``yuv444p`` (``bgr0``:     .mkv
                                                    RGB kept bit for bit)
======================  ==========================  =========================  =======================

Every segment file starts with a keyframe (each is encoded on its own). Frames keep the source's pts in the source's
time base, so the segments' timestamps are continuous with the source's (:func:`join_segments` relies on frame counts,
not on these, and re-derives them from the source).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from srbatch.errors import ConfigError
from srbatch.video._avio import local_output
from srbatch.video._colour import rgb_to_frame
from srbatch.video._types import Colour, VideoError


@dataclass(frozen=True)
class CodecSpec:
    default_crf: int | None
    default_preset: str | None
    default_pix_fmt: str
    containers: tuple[str, ...]


CODECS: dict[str, CodecSpec] = {
    "libx264": CodecSpec(18, "medium", "yuv420p", (".mp4", ".mov", ".mkv")),
    "libvpx-vp9": CodecSpec(32, "4", "yuv420p", (".webm", ".mkv", ".mp4")),
    "libsvtav1": CodecSpec(35, "8", "yuv420p", (".mp4", ".mkv", ".webm")),
    "ffv1": CodecSpec(None, None, "yuv444p", (".mkv",)),
}
"""The encoders we support, with their defaults and the containers that hold them."""

DEFAULT_CONTAINER = {"libx264": ".mp4", "libvpx-vp9": ".webm", "libsvtav1": ".mp4", "ffv1": ".mkv"}

_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}


def check_codec(codec: str, uri: str, pix_fmt: str | None, width: int, height: int) -> str:
    """Validate codec / container / pixel format / size together; returns the pixel format to use."""
    if codec not in CODECS:
        raise ConfigError(f"codec: expected one of {sorted(CODECS)}, got {codec!r}")
    spec = CODECS[codec]
    ext = posixpath.splitext(uri)[1].lower()
    if ext not in spec.containers:
        raise ConfigError(
            f"{uri}: a {ext or 'extension-less'} file cannot hold {codec}; use one of {', '.join(spec.containers)}"
        )
    pix_fmt = pix_fmt or spec.default_pix_fmt
    try:
        supported = [f.name for f in av.codec.Codec(codec, "w").video_formats or []]
    except Exception:  # noqa: BLE001 - the encoder is missing from this FFmpeg build
        raise ConfigError(f"codec: this PyAV/FFmpeg build has no {codec} encoder; install av==18.1.0") from None
    if supported and pix_fmt not in supported:
        raise ConfigError(f"pix_fmt: {codec} cannot encode {pix_fmt!r}; it takes {', '.join(supported)}")
    if ("420" in pix_fmt or "422" in pix_fmt) and (width % 2 or (height % 2 and "420" in pix_fmt)):
        raise ConfigError(
            f"pix_fmt {pix_fmt!r} needs an even width and height, the frames are {width}x{height}: crop or pad them, "
            "or choose yuv444p"
        )
    return pix_fmt


class SegmentWriter:
    """Encode frames one by one into ``out_uri`` (local or fsspec; remote files are uploaded on close).

    Use as a context manager; :meth:`write` takes ``(H, W, 3)`` uint8 RGB and the frame's pts in ``time_base`` units.
    ``preset`` is x264's preset name, VP9's ``cpu-used`` or SVT-AV1's preset number; ``options`` are passed to the
    encoder as FFmpeg options (e.g. ``{"tune": "film"}``).
    """

    def __init__(
        self, out_uri: str, *, width: int, height: int, fps: Fraction, time_base: Fraction, codec: str = "libx264",
        crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None, colour: Colour = Colour(),
        rotation: int = 0, options: Mapping[str, str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.out_uri = out_uri
        self.width, self.height = width, height
        self.codec = codec
        self.pix_fmt = check_codec(codec, out_uri, pix_fmt, width, height)
        self.fps, self.time_base = Fraction(fps), Fraction(time_base)
        self.colour, self.rotation = colour, rotation
        spec = CODECS[codec]
        crf = spec.default_crf if crf is None else crf
        preset = spec.default_preset if preset is None else str(preset)
        opts: dict[str, str] = {}
        if codec == "libx264":
            opts = {"crf": str(crf), "preset": preset}
        elif codec == "libvpx-vp9":
            opts = {"crf": str(crf), "b": "0", "cpu-used": preset, "row-mt": "1"}
        elif codec == "libsvtav1":
            opts = {"crf": str(crf), "preset": preset}
        elif codec == "ffv1":
            opts = {"level": "3", "slicecrc": "1"}
        opts.update(options or {})
        self._options = opts
        self._storage_options = storage_options
        self.frames = 0
        self._last_pts: int | None = None
        self._out = None

    def __enter__(self) -> SegmentWriter:
        self._ctx = local_output(self.out_uri, self._storage_options)
        path = self._ctx.__enter__()
        ext = posixpath.splitext(self.out_uri)[1].lower()
        try:
            self._out = av.open(path, "w", format=_FORMATS[ext])
            s = self._out.add_stream(self.codec, rate=self.fps)
            s.width, s.height, s.pix_fmt = self.width, self.height, self.pix_fmt
            s.time_base = self.time_base
            s.codec_context.time_base = self.time_base
            cc = s.codec_context
            cc.color_range = 2 if self.colour.range == 2 else self.colour.range
            cc.colorspace, cc.color_primaries, cc.color_trc = self.colour.space, self.colour.primaries, self.colour.trc
            s.options = dict(self._options)
            if self.rotation % 360:
                s.set_display_rotation(self.rotation % 360)
            self._stream = s
        except av.error.FFmpegError as e:
            self._ctx.__exit__(type(e), e, None)
            raise VideoError(f"{self.out_uri}: could not set up the {self.codec} encoder: {e}") from e
        return self

    def write(self, rgb: np.ndarray, pts: int) -> None:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ConfigError(f"{self.out_uri}: frames must be (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
        if rgb.shape[:2] != (self.height, self.width):
            raise ConfigError(
                f"{self.out_uri}: frame {self.frames} is {rgb.shape[1]}x{rgb.shape[0]}, the writer was opened for "
                f"{self.width}x{self.height}"
            )
        if self._last_pts is not None and pts <= self._last_pts:
            raise VideoError(f"{self.out_uri}: frame {self.frames} has pts {pts}, not after {self._last_pts}")
        frame = rgb_to_frame(rgb, self.pix_fmt, self.colour)
        frame.pts = int(pts)
        frame.time_base = self.time_base
        try:
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        except av.error.FFmpegError as e:
            raise VideoError(f"{self.out_uri}: encoding frame {self.frames} (pts {pts}) failed: {e}") from e
        self.frames += 1
        self._last_pts = int(pts)

    def __exit__(self, exc_type, exc, tb) -> None:
        """Flush the encoder and finish the file; on an error (``exc`` or one raised here) nothing appears at
        ``out_uri``."""
        error = exc
        try:
            if exc is None:
                if self.frames == 0:
                    raise VideoError(f"{self.out_uri}: no frames were written")
                try:
                    for packet in self._stream.encode(None):
                        self._out.mux(packet)
                    self._out.close()
                except av.error.FFmpegError as e:
                    raise VideoError(f"{self.out_uri}: flushing the encoder failed: {e}") from e
        except BaseException as e:
            error = e
            raise
        finally:
            if error is not None and self._out is not None:
                self._out.close()
            self._ctx.__exit__(type(error) if error is not None else None, error, None)


def encode_segment(
    frames: Iterable[tuple[int, np.ndarray]], out_uri: str, *, fps: Fraction, time_base: Fraction,
    codec: str = "libx264", crf: int | None = None, preset: str | None = None, pix_fmt: str | None = None,
    colour: Colour = Colour(), rotation: int = 0, options: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Encode ``(pts, (H, W, 3) uint8 RGB)`` pairs into ``out_uri`` (see :class:`SegmentWriter`); returns the number
    of frames written. The size is taken from the first frame."""
    it = iter(frames)
    try:
        pts, first = next(it)
    except StopIteration:
        raise VideoError(f"{out_uri}: no frames to encode") from None
    with SegmentWriter(
        out_uri, width=first.shape[1], height=first.shape[0], fps=fps, time_base=time_base, codec=codec, crf=crf,
        preset=preset, pix_fmt=pix_fmt, colour=colour, rotation=rotation, options=options,
        storage_options=storage_options,
    ) as w:
        w.write(first, pts)
        for pts, rgb in it:
            w.write(rgb, pts)
    return w.frames
