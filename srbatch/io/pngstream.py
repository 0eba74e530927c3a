"""A PNG written band by band, in memory O(band), to a file that only needs ``write`` (no seek).

One zlib stream runs across all bands and leaves in IDAT chunks of at most ``_IDAT_BYTES`` (1 MiB). Rows are filtered
with numpy, about 128 KiB of rows at a time: ``filter="adaptive"`` (default) picks per row, among
None/Sub/Up/Average/Paeth, the one with the smallest sum of absolute values of its bytes taken as signed (the heuristic
the PNG specification suggests); ``"up"``, ``"sub"``, ``"paeth"``, ``"average"`` and ``"none"`` force one filter. The
previous band's last row is kept, so Up/Average/Paeth cross band boundaries exactly as if the image were filtered
whole. zlib runs with the ``Z_FILTERED`` strategy, which suits filtered rows (38.4 MB against 42.8 MB with the default
strategy on the image below).

Measured (6000x4000 RGB uint8 gradient + noise, level 6, 2-core machine): adaptive 4.8-5.3 s / 38.4 MB, Pillow's
``save(compress_level=6)`` 5.1-5.3 s / 40.0 MB, ``filter="up"`` 3.3 s / 40.0 MB.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np

from srbatch.errors import ConfigError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IDAT_BYTES = 1 << 20
_FILTER_BYTES = 1 << 17
_COLOUR_TYPE = {(1, False): 0, (1, True): 4, (3, False): 2, (3, True): 6}
_FILTERS = ("none", "sub", "up", "average", "paeth")
_PNG_MAX_SIDE = 2**31 - 1


def checked_band(band: Any, i: int, *, width: int, samples: int, dtype: np.dtype, who: str) -> np.ndarray:
    """Band ``i`` of a streamed writer as ``(rows, width, samples)`` (a 2-D grey band gets its channel axis), or
    :class:`ConfigError` naming the writer, the band and what was expected. Shared by the PNG and TIFF writers."""
    band = np.asarray(band)
    if band.ndim == 2 and samples == 1:
        band = band[:, :, None]
    if band.ndim != 3 or band.shape[1:] != (width, samples) or band.dtype != dtype:
        raise ConfigError(f"{who}: band {i}: expected an array (rows, {width}, {samples}) of {dtype}, found "
                          f"{band.shape} of {band.dtype}")
    return band


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _filtered(raw: np.ndarray, prev: np.ndarray, bpp: int, mode: str) -> np.ndarray:
    """Rows ``raw`` (h, rowbytes) uint8 filtered, each prefixed with its filter byte: (h, 1 + rowbytes) uint8.

    ``prev`` is the row above ``raw[0]`` (zeros above the first image row).
    """
    h, n = raw.shape
    up = np.empty_like(raw)
    up[0] = prev
    up[1:] = raw[:-1]
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    out = np.empty((h, n + 1), np.uint8)
    if mode == "none":
        out[:, 0] = 0
        out[:, 1:] = raw
        return out
    candidates: dict[str, Any] = {}
    if mode in ("sub", "adaptive"):
        candidates["sub"] = raw - left
    if mode in ("up", "adaptive"):
        candidates["up"] = raw - up
    if mode in ("average", "adaptive"):
        avg = ((left.astype(np.uint16) + up) >> 1).astype(np.uint8)
        candidates["average"] = raw - avg
        del avg
    if mode in ("paeth", "adaptive"):
        upleft = np.zeros_like(raw)
        upleft[:, bpp:] = up[:, :-bpp]
        a, b, c = left.astype(np.int16), up.astype(np.int16), upleft.astype(np.int16)
        pa = np.abs(b - c)
        pb = np.abs(a - c)
        pc = np.abs(a + b - 2 * c)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        candidates["paeth"] = raw - pred
        del a, b, c, pa, pb, pc, pred, upleft
    if mode != "adaptive":
        out[:, 0] = _FILTERS.index(mode)
        out[:, 1:] = candidates[mode]
        return out
    candidates["none"] = raw
    names = list(_FILTERS)
    # sum over the row of |byte as int8|: the minimum-sum-of-absolute-differences heuristic
    scores = np.stack([np.abs(candidates[k].view(np.int8).astype(np.int16)).sum(axis=1, dtype=np.int64)
                       for k in names])
    best = np.argmin(scores, axis=0)  # ties -> the lower filter type, as libpng
    out[:, 0] = best
    for t, k in enumerate(names):
        rows = best == t
        if rows.any():
            out[rows, 1:] = candidates[k][rows]
    return out


def write_png_stream(fh: BinaryIO, bands: Iterable[np.ndarray], *, height: int, width: int, channels: int, dtype: Any,
                     has_alpha: bool = False, icc_profile: bytes | None = None, level: int = 6,
                     filter: str = "adaptive") -> None:
    """Write a PNG to ``fh`` (sequential writes only) from row bands, holding about one band in memory.

    ``bands`` yields arrays ``(h_i, width, channels + has_alpha)`` (a 2-D ``(h_i, width)`` is accepted for grey) of
    ``dtype`` (uint8 -> bit depth 8, uint16 -> 16, written big-endian), alpha last, in order, heights summing to
    ``height``. Colour type 0/4/2/6 for grey/grey+alpha/RGB/RGBA. ``icc_profile`` becomes an iCCP chunk. ``level`` is
    the zlib level (0-9).

    Raises :class:`ConfigError` on wrong arguments, a band of the wrong shape or dtype, or heights that do not add up;
    bytes already written then form an incomplete PNG (no IEND): the caller removes the output on any error.
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ConfigError(f"write_png_stream: dtype {dt} is not supported; expected uint8 or uint16")
    if (channels, bool(has_alpha)) not in _COLOUR_TYPE:
        raise ConfigError(f"write_png_stream: channels={channels}; expected 1 (grey) or 3 (RGB), alpha apart")
    if not (0 < height <= _PNG_MAX_SIDE and 0 < width <= _PNG_MAX_SIDE):
        raise ConfigError(f"write_png_stream: image size {height}x{width}: each side must be 1 .. 2**31-1")
    if not 0 <= level <= 9:
        raise ConfigError(f"write_png_stream: level={level}; expected 0..9")
    if filter not in (*_FILTERS, "adaptive"):
        raise ConfigError(f"write_png_stream: filter={filter!r}; expected 'adaptive' or one of {list(_FILTERS)}")
    samples = channels + int(has_alpha)
    depth = 8 * dt.itemsize
    bpp = samples * dt.itemsize
    rowbytes = width * bpp
    step = max(1, _FILTER_BYTES // rowbytes)

    fh.write(_SIGNATURE)
    fh.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, _COLOUR_TYPE[channels, bool(has_alpha)],
                                         0, 0, 0)))
    if icc_profile:
        fh.write(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile, 9)))

    z = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_FILTERED)
    pending = bytearray()

    def emit(data: bytes, final: bool = False) -> None:
        pending.extend(data)
        while len(pending) >= _IDAT_BYTES or (final and pending):
            piece = bytes(pending[:_IDAT_BYTES])
            del pending[:_IDAT_BYTES]
            fh.write(_chunk(b"IDAT", piece))

    prev = np.zeros(rowbytes, np.uint8)
    seen = 0
    big = dt.newbyteorder(">")
    for i, band in enumerate(bands):
        band = checked_band(band, i, width=width, samples=samples, dtype=dt, who="write_png_stream")
        h = band.shape[0]
        if h == 0:
            continue
        if seen + h > height:
            raise ConfigError(f"write_png_stream: band {i}: the bands hold more than height={height} rows")
        seen += h
        raw = np.ascontiguousarray(band, dtype=big).view(np.uint8).reshape(h, rowbytes)
        for r in range(0, h, step):  # filter ~128 KiB of rows at a time: the temporaries stay small
            emit(z.compress(_filtered(raw[r:r + step], prev, bpp, filter)))
            prev = raw[min(r + step, h) - 1]
        prev = prev.copy()
        del raw, band
    if seen != height:
        raise ConfigError(f"write_png_stream: the bands hold {seen} rows, expected height={height}")
    emit(z.flush(), final=True)
    fh.write(_chunk(b"IEND", b""))
