"""RGB <-> YUV through swscale with the matrix and range the stream is tagged with, the same way in both directions.

An unspecified matrix converts as BT.601 (swscale's default, what FFmpeg's tools do); an unspecified range as limited.
"""

from __future__ import annotations

import av
import numpy as np

from srbatch.video._types import Colour

_SWS_SPACES = {1, 4, 5, 6, 7, 9, 10}  # AVColorSpace values swscale has coefficients for (the rest convert as 601)


def _space(space: int) -> int:
    return space if space in _SWS_SPACES else 5


def _range(rng: int) -> int:
    return 2 if rng == 2 else 1


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as ``(H, W, 3)`` uint8 RGB, converted with the frame's own colour tags."""
    if frame.format.name in ("rgb24",):
        return frame.to_ndarray()
    is_rgb = frame.format.name.startswith(("gbr", "rgb", "bgr"))
    kwargs = {} if is_rgb else dict(src_colorspace=_space(int(frame.colorspace)),
                                    src_color_range=_range(int(frame.color_range)))
    return frame.reformat(format="rgb24", **kwargs).to_ndarray()


def rgb_to_frame(rgb: np.ndarray, pix_fmt: str, colour: Colour) -> av.VideoFrame:
    """``(H, W, 3)`` uint8 RGB as a frame of ``pix_fmt``, converted with ``colour``'s matrix and range and tagged
    with them."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    if pix_fmt.startswith(("gbr", "rgb", "bgr")):
        return frame.reformat(format=pix_fmt)
    out = frame.reformat(format=pix_fmt, dst_colorspace=_space(colour.space), dst_color_range=_range(colour.range))
    out.colorspace = colour.space
    out.color_range = _range(colour.range) if colour.range else 0
    out.color_primaries = colour.primaries
    out.color_trc = colour.trc
    return out
