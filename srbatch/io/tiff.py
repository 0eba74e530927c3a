"""Tiled / striped TIFF, BigTIFF and OME-TIFF, read region by region and written tile by tile, in bounded memory.

* **Reading** (:class:`TiffSource`): tifffile parses the header and the IFDs; the image is ``series[0]``, level 0.
  :meth:`TiffSource.read_region` reads and decodes only the tiles or strips a region touches (their offsets and
  byte counts from the IFD, one ``seek`` + ``read`` each), through a small LRU cache of decoded segments bounded in
  bytes, so the halos of neighbouring regions do not decode a segment twice. Memory: O(region + touched segments).
* **Codecs**: none, deflate and LZW (predictor none or horizontal) are decoded here, never past a segment's size
  (a deflate bomb in one tile cannot exhaust memory); LZW in pure Python when ``imagecodecs`` is missing (correct but
  slow, about 2 MB/s of pixels on noisy data; with ``imagecodecs`` installed, tifffile's fast LZW is used). Everything
  else goes through tifffile's ``TiffPage.decode`` (packbits, lzma, zstd on Python 3.14; JPEG & co. with the optional
  ``imagecodecs`` package -- the error says so when it is missing).
* **Writing** (:func:`write_tiled_tiff`): a tiled BigTIFF from an iterator of row bands of any heights, re-chunked
  into rows of tiles and handed to tifffile as an iterator of tiles: at most one row of tiles plus one band in memory.
  OME-TIFF metadata on request; an optional pyramid (sub-resolutions as SubIFDs), each level spooled to a temporary
  file while the level above is written, so memory stays bounded too.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import numpy as np
import tifffile

from srbatch.errors import ConfigError, ImageDecodeError
from srbatch.io.pngstream import checked_band

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 64 * 2**20
"""Default bound of a :class:`TiffSource`'s decoded-segment cache."""

_FIX = "re-export or re-upload the file"
_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_LZW = 5
_OWN_CODECS = {1, 8, 32946, _LZW}  # none, deflate (Adobe and old), LZW
_SPLIT_BYTES = 1 << 20  # uncompressed strips are read in row blocks of at most this many bytes
_PHOTOMETRIC_NAMES = {0: "miniswhite", 1: "minisblack", 2: "rgb", 3: "palette", 4: "mask", 5: "separated (CMYK)",
                      6: "ycbcr", 8: "cielab"}
_COMPRESSIONS = {"none": 1, "zlib": 8, "deflate": 8, "adobe_deflate": 8, "lzw": 5, "zstd": 50000, "lzma": 34925,
                 "packbits": 32773}


def is_tiff(head: bytes) -> bool:
    """Whether ``head`` (the first 4+ bytes of a file) starts like a classic TIFF or a BigTIFF, either byte order."""
    return bytes(head[:4]) in _MAGIC


def _lzw_decode(data: bytes, limit: int | None = None) -> bytes:
    """Decode TIFF LZW (codes of 9 to 12 bits, most significant bit first, "early change"), at most ``limit`` bytes."""
    out = bytearray()
    table: list[bytes] = [bytes((i,)) for i in range(256)] + [b"", b""]
    n = len(data)
    padded = bytes(data) + b"\x00\x00"
    total_bits = n * 8
    bitpos, nbits, prev = 0, 9, None
    while bitpos + nbits <= total_bits:
        byte = bitpos >> 3
        chunk = (padded[byte] << 16) | (padded[byte + 1] << 8) | padded[byte + 2]
        code = (chunk >> (24 - nbits - (bitpos & 7))) & ((1 << nbits) - 1)
        bitpos += nbits
        if code == 256:  # clear
            del table[258:]
            nbits, prev = 9, None
            continue
        if code == 257:  # end of information
            break
        if prev is None:
            if code > 255:
                raise ValueError(f"LZW code {code} after a clear code (expected a literal below 256)")
            entry = table[code]
        elif code < len(table):
            entry = table[code]
            table.append(prev + entry[:1])
        elif code == len(table):
            entry = prev + prev[:1]
            table.append(entry)
        else:
            raise ValueError(f"LZW code {code} beyond the table ({len(table)} entries)")
        out += entry
        if limit is not None and len(out) >= limit:
            break
        prev = entry
        size = len(table)
        nbits = 9 if size < 511 else 10 if size < 1023 else 11 if size < 2047 else 12
        if size > 4096:
            raise ValueError("LZW table overflow (more than 4096 entries without a clear code)")
    return bytes(out)


def _lzw_available_in_tifffile() -> bool:
    try:
        tifffile.TIFF.DECOMPRESSORS[_LZW]
    except KeyError:
        return False
    return True


class TiffSource:
    """Random access to the pixels of a (possibly huge) TIFF, region by region.

    ``fh`` is a binary, seekable file object (a local file or an fsspec file opened ``'rb'``); it is not closed here.
    ``name`` names the file in error messages. Attributes: ``height``, ``width``, ``channels`` (1 grey or 3 RGB, alpha
    not counted), ``has_alpha`` (a 4th -- or, for grey, 2nd -- sample: returned as the last channel of
    :meth:`read_region`), ``dtype`` (``np.uint8`` or ``np.uint16``), ``tiled``, ``segment_shape`` (rows, columns of a
    tile or strip -- an uncompressed strip is read in blocks of rows of at most 1 MiB, and this gives the block),
    ``bigtiff``, ``is_ome``, ``icc_profile`` (bytes or None), ``compression`` (tifffile's name, lower
    case, e.g. ``"adobe_deflate"``, ``"lzw"``, ``"none"``).

    Memory while reading: the region, the touched segments and the cache (``cache_bytes``, default 64 MB). A large
    *compressed* strip must be decoded whole (a striped deflate image written as one strip decodes whole once, then
    comes from the cache if it fits): such files are better re-exported tiled.

    Thread-safe: file reads and the cache are behind one lock.
    """

    def __init__(self, fh: BinaryIO, *, name: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.name = name
        self._fh = fh
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._cached = 0
        self.segments_decoded = 0
        """How many segments were decoded so far (cache misses), for tests and progress."""
        try:
            self._tif = tifffile.TiffFile(fh, name=name)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            raise ImageDecodeError(
                f"{name}: not a readable TIFF ({type(exc).__name__}: {exc}); expected a TIFF/BigTIFF header and "
                f"image directory; {_FIX}") from exc
        try:
            self._setup()
        except BaseException:
            self._tif.close()
            raise

    # ------------------------------------------------------------------ setup
    def _fail(self, what: str, fix: str = _FIX) -> ImageDecodeError:
        return ImageDecodeError(f"{self.name}: {what}; {fix}")

    def _setup(self) -> None:
        tif = self._tif
        if not tif.series:
            raise self._fail("the TIFF holds no image")
        series = tif.series[0]
        level = series.levels[0]
        if len(level.pages) != 1:
            raise self._fail(
                f"the first image series has {len(level.pages)} planes (axes {series.axes!r}, shape {series.shape}); "
                "only one 2-D grey or RGB plane is supported", "export one plane as a grey or RGB TIFF")
        page = level.keyframe
        first = level.pages[0]
        self._page = page
        self._offsets = tuple(int(v) for v in first.dataoffsets)
        self._counts = tuple(int(v) for v in first.databytecounts)
        if page.imagedepth != 1 or page.tiledepth != 1:
            raise self._fail(f"the image is a volume (depth {page.imagedepth})", "export one 2-D plane")
        dtype = np.dtype(page.dtype) if page.dtype is not None else None
        if dtype is None or dtype.kind != "u" or dtype.itemsize not in (1, 2) or page.bitspersample not in (8, 16):
            raise self._fail(
                f"samples are {page.bitspersample}-bit of type {dtype} (sample format {int(page.sampleformat)}); "
                "only 8- and 16-bit unsigned integer samples are supported",
                "convert the image to 8- or 16-bit unsigned integers (e.g. tifffile or ImageJ: Image > Type > 16-bit)")
        self.dtype = np.dtype(dtype.newbyteorder("="))
        photometric = int(page.photometric)
        samples = int(page.samplesperpixel)
        extra = len(page.extrasamples)
        colour = samples - extra
        if photometric in (0, 1) and colour == 1:
            self.channels = 1
        elif photometric == 2 and colour == 3:
            self.channels = 3
        else:
            kind = _PHOTOMETRIC_NAMES.get(photometric, str(photometric))
            raise self._fail(
                f"photometric {kind} with {samples} samples per pixel ({extra} extra) is not supported; expected grey "
                "(minisblack/miniswhite) or RGB, optionally with one alpha sample",
                "convert the image to grey or RGB")
        if extra > 1:
            raise self._fail(f"{extra} extra samples per pixel; at most one (alpha) is supported",
                             "keep one alpha channel or none")
        self.has_alpha = extra == 1
        self._samples = samples
        self._invert = photometric == 0
        self._planar_separate = int(page.planarconfig) == 2 and samples > 1
        if page.is_subsampled:
            raise self._fail("chroma-subsampled (YCbCr) data is not supported", "re-export as RGB")
        if int(page.fillorder) != 1:
            raise self._fail("fill order LSB-to-MSB is not supported", "re-export the file")
        self.height = int(page.imagelength)
        self.width = int(page.imagewidth)
        self.tiled = bool(page.is_tiled)
        if self.tiled:
            self.segment_shape = (int(page.tilelength), int(page.tilewidth))
        else:
            self.segment_shape = (min(int(page.rowsperstrip), self.height), self.width)
        rows, cols = self.segment_shape
        self._down = -(-self.height // rows)
        self._across = -(-self.width // cols) if self.tiled else 1
        per_plane = self._down * self._across
        expected = per_plane * (samples if self._planar_separate else 1)
        if len(self._offsets) < expected or len(self._counts) < expected:
            raise self._fail(f"the image directory lists {len(self._offsets)} segments, {expected} expected")
        self._per_plane = per_plane
        self.bigtiff = bool(tif.is_bigtiff)
        self.is_ome = bool(tif.is_ome)
        icc = page.tags.get(34675)
        self.icc_profile = bytes(icc.value) if icc is not None and icc.value else None
        comp = int(page.compression)
        try:
            self.compression = tifffile.COMPRESSION(comp).name.lower()
        except ValueError:
            self.compression = str(comp)
        predictor = int(page.predictor)
        self._lzw_in_tifffile = comp == _LZW and _lzw_available_in_tifffile()
        if comp in _OWN_CODECS and predictor in (1, 2) and not self._lzw_in_tifffile:
            # decoded here, with the output bounded by the segment's size (tifffile's pure-Python zlib fallback
            # inflates without a limit: a deflate bomb in one segment would exhaust memory)
            self._decode = None
            self._comp, self._predictor = comp, predictor
            self._filetype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
            if comp == _LZW:
                log.info("%s: LZW decoded in pure Python (slow); `pip install imagecodecs` makes it fast", self.name)
        else:
            self._decode = page.decode
        self._jpegtables = page.jpegtables
        # An uncompressed strip is read in row blocks ("virtual sub-strips") of at most _SPLIT_BYTES: tifffile and
        # Pillow write uncompressed images as ONE strip, which would otherwise be read whole for every region.
        self._split = 1
        self._rowbytes = self.width * (1 if self._planar_separate else samples) * self.dtype.itemsize
        strip_rows = self.segment_shape[0]
        if not self.tiled and self._decode is None and comp == 1 and strip_rows * self._rowbytes > _SPLIT_BYTES:
            k = max((d for d in range(1, strip_rows + 1)
                     if strip_rows % d == 0 and d * self._rowbytes <= _SPLIT_BYTES), default=1)
            self._split = strip_rows // k
            self._strips_per_plane = self._per_plane
            self.segment_shape = (k, self.width)
            self._down = -(-self.height // k)
            self._per_plane = self._down
        self._file_size = int(tif.filehandle.size)

    # --------------------------------------------------------------- context
    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0
        self._tif.close()

    def __enter__(self) -> TiffSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TiffSource({self.name!r}, {self.height}x{self.width}x{self.channels}"
                f"{'+alpha' if self.has_alpha else ''} {self.dtype}, {'tiles' if self.tiled else 'strips'} "
                f"{self.segment_shape}, {self.compression})")

    @property
    def out_channels(self) -> int:
        """Channels :meth:`read_region` returns: ``channels`` plus one if ``has_alpha``."""
        return self.channels + int(self.has_alpha)

    # ---------------------------------------------------------------- reading
    def read_region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` as ``(y1-y0, x1-x0, out_channels)`` of ``dtype`` (alpha last, if any)."""
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width):
            raise ConfigError(f"{self.name}: region [{y0}:{y1}, {x0}:{x1}] is empty or outside the image "
                              f"({self.height}x{self.width}); expected 0 <= y0 < y1 <= height, 0 <= x0 < x1 <= width")
        rows, cols = self.segment_shape
        out = np.empty((y1 - y0, x1 - x0, self._samples), dtype=self.dtype)
        planes = range(self._samples) if self._planar_separate else (None,)
        for ty in range(y0 // rows, (y1 - 1) // rows + 1):
            sy0 = ty * rows
            for tx in range(x0 // cols, (x1 - 1) // cols + 1) if self.tiled else (0,):
                sx0 = tx * cols
                ya, yb = max(y0, sy0), min(y1, sy0 + rows)
                xa, xb = max(x0, sx0), min(x1, sx0 + cols)
                for plane in planes:
                    index = ty * self._across + tx + (plane or 0) * self._per_plane
                    seg = self._segment(index)  # (rows', cols', samples in segment)
                    part = seg[ya - sy0:yb - sy0, xa - sx0:xb - sx0]
                    if plane is None:
                        out[ya - y0:yb - y0, xa - x0:xb - x0] = part
                    else:
                        out[ya - y0:yb - y0, xa - x0:xb - x0, plane] = part[..., 0]
        if self._invert:  # miniswhite: 0 is white
            top = np.iinfo(self.dtype).max
            np.subtract(top, out[..., 0], out=out[..., 0])
        return out

    def _segment(self, index: int) -> np.ndarray:
        with self._lock:
            seg = self._cache.get(index)
            if seg is not None:
                self._cache.move_to_end(index)
                return seg
            seg = self._load(index)
            self.segments_decoded += 1
            if seg.nbytes <= self._cache_bytes:
                self._cache[index] = seg
                self._cached += seg.nbytes
                while self._cached > self._cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
            return seg

    def _expected_shape(self, index: int) -> tuple[int, int, int]:
        rows, cols = self.segment_shape
        samples = 1 if self._planar_separate else self._samples
        if self.tiled:
            return rows, cols, samples
        start = (index % self._per_plane) * rows
        return min(rows, self.height - start), cols, samples

    def _locate(self, index: int, shape: tuple[int, int, int]) -> tuple[int, int, str]:
        """Byte offset, byte count and a description of segment ``index`` (a virtual sub-strip when split)."""
        if self._split == 1:
            offset, count = self._offsets[index], self._counts[index]
            kind = "tile" if self.tiled else "strip"
            return offset, count, f"segment {index} ({kind} at byte offset {offset}, {count} bytes)"
        plane, v = divmod(index, self._per_plane)
        strip, sub = divmod(v, self._split)
        real = plane * self._strips_per_plane + strip
        offset, count = self._offsets[real], self._counts[real]
        start = sub * self.segment_shape[0] * self._rowbytes
        need = shape[0] * self._rowbytes
        first = v * self.segment_shape[0]
        sample = f" of sample {plane}" if self._planar_separate else ""
        where = (f"segment {real} (strip at byte offset {offset}, {count} bytes), image rows "
                 f"{first}..{first + shape[0] - 1}{sample} at bytes {offset + start}..{offset + start + need - 1}")
        if count == 0 or offset == 0:
            return 0, 0, where
        if start + need > count:
            raise self._fail(f"{where} holds {count} bytes, {start + need} needed: the strip is short")
        return offset + start, need, where

    def _load(self, index: int) -> np.ndarray:
        shape = self._expected_shape(index)
        offset, count, where = self._locate(index, shape)
        if count == 0 or offset == 0:  # sparse file: a segment never written reads as zeros
            return np.zeros(shape, self.dtype)
        if offset + count > self._file_size:
            raise self._fail(f"{where} lies past the end of the file ({self._file_size} bytes): the file is truncated")
        try:
            self._fh.seek(offset)
            data = self._fh.read(count)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            raise self._fail(f"{where} could not be read ({type(exc).__name__}: {exc})") from exc
        if len(data) != count:
            raise self._fail(f"{where}: only {len(data)} bytes could be read: the file is truncated")
        try:
            if self._decode is None:
                arr = self._decode_own(data, shape)
            else:
                arr, _, _ = self._decode(data, index, jpegtables=self._jpegtables)
                arr = arr.reshape(arr.shape[-3:])
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            hint = ""
            if "imagecodecs" in str(exc):
                hint = " (this compression needs the optional 'imagecodecs' package: pip install imagecodecs)"
            raise self._fail(f"{where} could not be decoded ({type(exc).__name__}: {exc}){hint}") from exc
        if arr.shape[0] < shape[0] or arr.shape[1] < shape[1] or arr.shape[2] != shape[2]:
            raise self._fail(f"{where} decoded to shape {arr.shape}, expected {shape}")
        return np.ascontiguousarray(arr[: shape[0], : shape[1]], dtype=self.dtype)

    def _decode_own(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """Uncompressed, deflate or LZW, predictor none or horizontal; never inflates past the segment's size."""
        size = shape[0] * shape[1] * shape[2] * self._filetype.itemsize
        if self._comp == 1:
            raw = data
        elif self._comp == _LZW:
            raw = _lzw_decode(data, limit=size)
        else:
            raw = zlib.decompressobj().decompress(data, size)
        if len(raw) < size:
            raise ValueError(f"the data decompressed to {len(raw)} bytes, {size} expected")
        arr = np.frombuffer(raw, dtype=self._filetype, count=size // self._filetype.itemsize).reshape(shape)
        arr = arr.astype(self.dtype)  # native byte order, and a writable copy
        if self._predictor == 2:  # horizontal differencing: cumulative sum along the row, modulo 2**bits
            np.cumsum(arr, axis=1, dtype=self.dtype, out=arr)
        return arr


# ---------------------------------------------------------------------- writing
def _compression_arg(compression: str, level: int) -> tuple[Any, dict]:
    key = compression.lower()
    if key not in _COMPRESSIONS:
        raise ConfigError(f"TIFF compression {compression!r} is not supported; expected one of "
                          f"{sorted(_COMPRESSIONS)}")
    code = _COMPRESSIONS[key]
    if code == 1:
        return None, {}
    try:  # tifffile resolves some encoders lazily (zstd needs Python 3.14 or imagecodecs): probe one tile
        tifffile.TIFF.COMPRESSORS[code](np.zeros((16, 16, 1), np.uint8))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise ConfigError(f"TIFF compression {compression!r} is not available here ({type(exc).__name__}: {exc}); "
                          "it needs the optional 'imagecodecs' package (pip install imagecodecs), or choose 'zlib'"
                          ) from exc
    args = {"level": level} if code in (8, 34925, 50000) else {}
    return code, args


def _half(rows: np.ndarray) -> np.ndarray:
    """2x2 mean, rounded half up, of ``(h, w, c)``; an odd last row/column is repeated: ``(ceil(h/2), ceil(w/2))``."""
    h, w = rows.shape[:2]
    if h % 2 or w % 2:
        rows = np.pad(rows, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    acc = rows[0::2, 0::2].astype(np.uint32)
    acc += rows[1::2, 0::2]
    acc += rows[0::2, 1::2]
    acc += rows[1::2, 1::2]
    acc += 2
    acc >>= 2
    return acc.astype(rows.dtype)


def _spooled_bands(spool: BinaryIO, *, height: int, width: int, samples: int, dtype: np.dtype,
                   rows: int) -> Iterator[np.ndarray]:
    """Read back, band by band, what :func:`_tiles` wrote to ``spool`` (raw native samples, row after row)."""
    spool.seek(0)
    for y in range(0, height, rows):
        band = np.empty((min(rows, height - y), width, samples), dtype)
        view = memoryview(band).cast("B")
        got = spool.readinto(view)
        if got != band.nbytes:
            raise OSError(f"pyramid spool file: read {got} bytes, expected {band.nbytes}")
        yield band


def _tiles(bands: Iterable[np.ndarray], *, height: int, width: int, samples: int, dtype: np.dtype,
           tile: tuple[int, int], spool: BinaryIO | None = None) -> Iterator[np.ndarray]:
    """Yield tiles row by row, left to right, from row bands of any heights; edge tiles are cut (tifffile pads).

    With ``spool``, each finished row of tiles is also halved (:func:`_half`) and appended to it, raw.
    """
    th, tw = tile
    row = np.empty((min(th, height), width, samples), dtype)  # one row of tiles, reused
    have = 0
    seen = 0
    for i, band in enumerate(bands):
        band = checked_band(band, i, width=width, samples=samples, dtype=dtype, who="write_tiled_tiff")
        if seen + band.shape[0] > height:
            raise ConfigError(f"band {i}: the bands hold more than height={height} rows")
        seen += band.shape[0]
        start = 0
        while start < band.shape[0]:
            take = min(th - have, band.shape[0] - start)
            row[have:have + take] = band[start:start + take]
            have += take
            start += take
            if have == th or (seen == height and start == band.shape[0]):
                # copies: tifffile keeps the first item it peeks at, which must not pin a whole row
                if spool is not None:
                    spool.write(memoryview(_half(row[:have])).cast("B"))
                for x in range(0, width, tw):
                    yield np.ascontiguousarray(row[:have, x:x + tw])
                have = 0
        del band
    if seen != height or have:
        raise ConfigError(f"the bands hold {seen} rows, expected height={height}")


def write_tiled_tiff(fh: BinaryIO, bands: Iterable[np.ndarray], *, height: int, width: int, channels: int, dtype: Any,
                     tile: tuple[int, int] = (512, 512), compression: str = "zlib", level: int = 6, ome: bool = False,
                     icc_profile: bytes | None = None, description: str | None = None, has_alpha: bool = False,
                     predictor: bool = False, maxworkers: int = 1, pyramid: int = 0,
                     tmpdir: str | None = None) -> None:
    """Write a tiled BigTIFF (or OME-TIFF with ``ome=True``) from ``bands``, holding one row of tiles + one band.

    ``bands`` yields arrays ``(h_i, width, channels + has_alpha)`` of ``dtype`` (uint8 or uint16), alpha last, in
    order, with heights summing to ``height``. Grey is written minisblack, RGB as rgb, alpha as an unassociated extra
    sample. ``compression``: ``"zlib"`` (deflate, default, at ``level``), ``"none"``, or ``"zstd"``/``"lzma"``/
    ``"lzw"``/``"packbits"`` where available. ``predictor=True`` adds horizontal differencing (smaller deflate output
    for smooth images). ``fh`` is a local, seekable binary file: the directory is written after the tiles.
    ``maxworkers`` threads compress tiles (tifffile; 1 = in the calling thread).

    ``pyramid=n`` adds n sub-resolutions as SubIFDs (the OME-TIFF / QuPath / Bio-Formats pyramid layout; with
    ``ome=False`` a plain pyramidal BigTIFF), each the 2x2 mean (rounded half up; odd last row/column repeated) of the
    one above, size ``ceil(prev / 2)``. While a level is written, the next is spooled raw to a temporary file in
    ``tmpdir`` (default: the system's), so memory stays one row of tiles + one band; extra disk: about a quarter of
    the raw image at most at once.

    Memory: one row of tiles (``tile[0] x width x samples``) + one band + a tile per worker.

    Raises :class:`ConfigError` for a wrong band shape/dtype or heights that do not add up -- then a partial file may
    be left in ``fh``: the caller writes to a temporary file and removes it on any error.
    """
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ConfigError(f"write_tiled_tiff: dtype {dt} is not supported; expected uint8 or uint16")
    if channels not in (1, 3):
        raise ConfigError(f"write_tiled_tiff: channels={channels}; expected 1 (grey) or 3 (RGB), alpha apart")
    if height <= 0 or width <= 0:
        raise ConfigError(f"write_tiled_tiff: image size {height}x{width} must be positive")
    th, tw = (int(t) for t in tile)
    if th <= 0 or tw <= 0 or th % 16 or tw % 16:
        raise ConfigError(f"write_tiled_tiff: tile {tile} must be positive multiples of 16 (TIFF requires it)")
    samples = channels + int(has_alpha)
    code, cargs = _compression_arg(compression, level)
    if not 0 <= pyramid <= 16 or (height >> pyramid) < 1 or (width >> pyramid) < 1:
        raise ConfigError(f"write_tiled_tiff: pyramid={pyramid} levels do not fit a {height}x{width} image; expected "
                          "0 (none) up to log2 of the shorter side")
    common: dict[str, Any] = {
        "dtype": dt, "tile": (th, tw), "photometric": "rgb" if channels == 3 else "minisblack",
        "planarconfig": "contig" if samples > 1 else None, "maxworkers": maxworkers,
    }
    if code is not None:
        common["compression"] = code
        if cargs:
            common["compressionargs"] = cargs
        if predictor:
            common["predictor"] = True
    if has_alpha:
        common["extrasamples"] = ["unassalpha"]
    first: dict[str, Any] = {}
    if icc_profile:
        first["iccprofile"] = icc_profile
    if pyramid:
        first["subifds"] = pyramid
    if ome:
        first["metadata"] = {"axes": "YXS" if samples > 1 else "YX"}
        if description:
            first["metadata"]["Description"] = description
    else:
        first["metadata"] = None
        if description:
            first["description"] = description
    band_iter = iter(bands)
    source: Iterator[np.ndarray] = band_iter
    spool: BinaryIO | None = None
    opened: list[BinaryIO] = []
    h, w = height, width
    try:
        with tifffile.TiffWriter(fh, bigtiff=True, ome=ome) as writer:
            for lvl in range(pyramid + 1):
                # each level is written while the next, halved, is spooled raw to a temporary file (not to memory)
                nxt = tempfile.TemporaryFile(dir=tmpdir) if lvl < pyramid else None  # noqa: SIM115
                if nxt is not None:
                    opened.append(nxt)
                tiles = _tiles(source, height=h, width=w, samples=samples, dtype=dt, tile=(th, tw), spool=nxt)
                if samples == 1:
                    tiles = (t[:, :, 0] for t in tiles)
                shape = (h, w, samples) if samples > 1 else (h, w)
                extra = first if lvl == 0 else {"subfiletype": 1, "metadata": None}
                writer.write(tiles, shape=shape, **common, **extra)
                if lvl == 0 and next(band_iter, None) is not None:
                    raise ConfigError(f"the bands hold more than height={height} rows")
                if spool is not None:
                    spool.close()  # that level is written: its disk space goes back now
                spool = nxt
                h, w = (h + 1) // 2, (w + 1) // 2
                if spool is not None:
                    source = _spooled_bands(spool, height=h, width=w, samples=samples, dtype=dt, rows=th)
    finally:
        for f in opened:
            f.close()
