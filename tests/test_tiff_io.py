"""Streamed file formats: TIFF regions (srbatch.io.tiff) and the band-by-band PNG writer (srbatch.io.pngstream).

Every pixel is compared with an independent path: test files are written by tifffile or Pillow (libtiff), regions are
checked against ``tifffile.imread`` of the whole file, written files are read back by tifffile / Pillow, and 16-bit
PNG by a small unfilter written here.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import tifffile
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from PIL import Image

from srbatch.errors import ConfigError, ImageDecodeError
from srbatch.io.images import decode_image
from srbatch.io.pngstream import write_png_stream
from srbatch.io.tiff import TiffSource, is_tiff, write_tiled_tiff

H, W = 700, 900
RNG = np.random.default_rng(15)


def _smooth(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Gradient plus noise: compressible, yet every pixel differs from its neighbours."""
    top = np.iinfo(dtype).max
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = (x * 0.7 + y * 0.3) / (shape[0] + shape[1]) * top
    if len(shape) == 3:
        base = np.stack([base * (0.5 + 0.5 * c / shape[2]) for c in range(shape[2])], -1)
    noise = RNG.integers(0, max(2, top // 40), shape)
    return np.clip(base + noise, 0, top).astype(dtype)


def _tifffile_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _pillow_lzw(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF", compression="tiff_lzw", **kw)
    return buf.getvalue()


RGB8 = _smooth((H, W, 3), np.uint8)
GREY16 = _smooth((H, W), np.uint16)
RGB16 = _smooth((H, W, 3), np.uint16)
GREY8 = _smooth((H, W), np.uint8)
RGBA8 = np.dstack([RGB8, _smooth((H, W), np.uint8)])

CASES = {
    "rgb8-tiled-deflate": lambda: _tifffile_bytes(RGB8, tile=(128, 128), photometric="rgb", compression="zlib"),
    "rgb8-strips-deflate-predictor": lambda: _tifffile_bytes(RGB8, rowsperstrip=50, photometric="rgb",
                                                             compression="zlib", predictor=True),
    "grey16-tiled-deflate-bigendian-bigtiff": lambda: _tifffile_bytes(GREY16, tile=(128, 128), compression="zlib",
                                                                      predictor=True, byteorder=">", bigtiff=True),
    "grey16-strips-none-bigendian": lambda: _tifffile_bytes(GREY16, rowsperstrip=64, byteorder=">"),
    "grey8-tiled-ome": lambda: _tifffile_bytes(GREY8, tile=(128, 128), ome=True, compression="zlib"),
    "rgb16-tiled-separate-planes": lambda: _tifffile_bytes(np.ascontiguousarray(RGB16.transpose(2, 0, 1)),
                                                           tile=(128, 256), photometric="rgb",
                                                           planarconfig="separate", compression="zlib"),
    "rgba8-tiled-none": lambda: _tifffile_bytes(RGBA8, tile=(128, 128), photometric="rgb",
                                                extrasamples=["unassalpha"]),
    "grey16-tiled-lzma": lambda: _tifffile_bytes(GREY16, tile=(256, 128), compression="lzma"),
    "rgb8-strips-lzw-pillow": lambda: _pillow_lzw(RGB8),
    "grey16-strips-lzw-pillow": lambda: _pillow_lzw(GREY16),
    "rgb8-strips-lzw-predictor-pillow": lambda: _pillow_lzw(RGB8, tiffinfo={317: 2}),
    "greyalpha16-tiled-deflate": lambda: _tifffile_bytes(np.dstack([GREY16, GREY16[::-1]]), tile=(128, 128),
                                                         photometric="minisblack", extrasamples=["unassalpha"],
                                                         compression="zlib"),
    "rgb16-one-strip-none": lambda: _tifffile_bytes(RGB16, photometric="rgb"),  # one 3.8 MB strip, read in blocks
    "rgb16-one-strip-none-separate": lambda: _tifffile_bytes(np.ascontiguousarray(RGB16.transpose(2, 0, 1)),
                                                             photometric="rgb", planarconfig="separate"),
    "grey16-strips-lzw-predictor-pillow": lambda: _pillow_lzw(GREY16, tiffinfo={317: 2}),
}
EXPECTED = {  # channels, has_alpha, dtype, tiled, segment_shape (None: from tifffile), bigtiff, is_ome, compression
    "rgb8-tiled-deflate": (3, False, np.uint8, True, (128, 128), False, False, "adobe_deflate"),
    "rgb8-strips-deflate-predictor": (3, False, np.uint8, False, (50, W), False, False, "adobe_deflate"),
    "grey16-tiled-deflate-bigendian-bigtiff": (1, False, np.uint16, True, (128, 128), True, False, "adobe_deflate"),
    "grey16-strips-none-bigendian": (1, False, np.uint16, False, (64, W), False, False, "none"),
    "grey8-tiled-ome": (1, False, np.uint8, True, (128, 128), False, True, "adobe_deflate"),
    "rgb16-tiled-separate-planes": (3, False, np.uint16, True, (128, 256), False, False, "adobe_deflate"),
    "rgba8-tiled-none": (3, True, np.uint8, True, (128, 128), False, False, "none"),
    "grey16-tiled-lzma": (1, False, np.uint16, True, (256, 128), False, False, "lzma"),
    "rgb8-strips-lzw-pillow": (3, False, np.uint8, False, None, False, False, "lzw"),
    "grey16-strips-lzw-pillow": (1, False, np.uint16, False, None, False, False, "lzw"),
    "rgb8-strips-lzw-predictor-pillow": (3, False, np.uint8, False, None, False, False, "lzw"),
    "greyalpha16-tiled-deflate": (1, True, np.uint16, True, (128, 128), False, False, "adobe_deflate"),
    "rgb16-one-strip-none": (3, False, np.uint16, False, (175, W), False, False, "none"),
    "rgb16-one-strip-none-separate": (3, False, np.uint16, False, (350, W), False, False, "none"),
    "grey16-strips-lzw-predictor-pillow": (1, False, np.uint16, False, None, False, False, "lzw"),
}
REGIONS = [
    (0, H, 0, W),  # whole image
    (0, 1, 0, 1),  # first pixel
    (H - 1, H, W - 1, W),  # last pixel (inside the padded edge tile)
    (123, 124, 517, 518),  # one pixel in the middle
    (100, 300, 120, 260),  # crosses tile/strip borders both ways
    (640, H, 0, W),  # bottom band, edge tiles / short last strip
    (5, 690, 850, W),  # right edge column
    (130, 250, 130, 250),  # inside one 128x128 tile
]


SOURCES = {  # the array each case was written from
    "rgb8-tiled-deflate": RGB8, "rgb8-strips-deflate-predictor": RGB8, "grey16-tiled-deflate-bigendian-bigtiff": GREY16,
    "grey16-strips-none-bigendian": GREY16, "grey8-tiled-ome": GREY8, "rgb16-tiled-separate-planes": RGB16,
    "rgba8-tiled-none": RGBA8, "grey16-tiled-lzma": GREY16, "rgb8-strips-lzw-pillow": RGB8,
    "grey16-strips-lzw-pillow": GREY16, "rgb8-strips-lzw-predictor-pillow": RGB8,
    "grey16-strips-lzw-predictor-pillow": GREY16, "rgb16-one-strip-none": RGB16,
    "greyalpha16-tiled-deflate": np.dstack([GREY16, GREY16[::-1]]), "rgb16-one-strip-none-separate": RGB16,
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    data = CASES[request.param]()
    ref = SOURCES[request.param]
    if ref.ndim == 2:
        ref = ref[:, :, None]
    if "lzw" not in request.param:  # tifffile reads LZW only with imagecodecs; Pillow (libtiff) wrote those
        whole = tifffile.imread(io.BytesIO(data))
        if whole.shape[-2:] == (H, W) and whole.ndim == 3:  # separate planes: tifffile gives (samples, H, W)
            whole = np.moveaxis(whole, 0, -1)
        np.testing.assert_array_equal(whole.reshape(ref.shape), ref)
    return request.param, data, ref


def test_region_reads_equal_the_written_image(case):
    name, data, ref = case
    assert ref.shape[:2] == (H, W)
    with TiffSource(io.BytesIO(data), name=f"{name}.tif") as src:
        channels, alpha, dtype, tiled, seg, bigtiff, ome, comp = EXPECTED[name]
        assert (src.height, src.width, src.channels, src.has_alpha) == (H, W, channels, alpha)
        assert src.dtype == np.dtype(dtype) and src.tiled is tiled and src.bigtiff is bigtiff and src.is_ome is ome
        assert src.compression == comp
        if seg is not None:
            assert src.segment_shape == seg
        assert src.out_channels == ref.shape[2]
        for y0, y1, x0, x1 in REGIONS:
            got = src.read_region(y0, y1, x0, x1)
            assert got.shape == (y1 - y0, x1 - x0, ref.shape[2]) and got.dtype == ref.dtype
            np.testing.assert_array_equal(got, ref[y0:y1, x0:x1], err_msg=f"{name} region {(y0, y1, x0, x1)}")


def test_pillow_lzw_fixtures_are_what_they_claim():
    for kw, predictor in (({}, 1), ({"tiffinfo": {317: 2}}, 2)):
        with tifffile.TiffFile(io.BytesIO(_pillow_lzw(RGB8, **kw))) as tif:
            page = tif.pages[0]
            assert int(page.compression) == 5 and int(page.predictor) == predictor and len(page.dataoffsets) > 10


def test_miniswhite_is_inverted_to_black_is_zero():
    data = _tifffile_bytes(GREY16, tile=(128, 128), photometric="miniswhite")
    with TiffSource(io.BytesIO(data), name="mw.tif") as src:
        np.testing.assert_array_equal(src.read_region(10, 300, 20, 400)[..., 0], 65535 - GREY16[10:300, 20:400])


def test_icc_profile_is_read():
    icc = bytes(range(256)) * 3
    data = _tifffile_bytes(RGB8, tile=(128, 128), photometric="rgb", iccprofile=icc)
    with TiffSource(io.BytesIO(data), name="icc.tif") as src:
        assert src.icc_profile == icc
    with TiffSource(io.BytesIO(_tifffile_bytes(GREY8, tile=(128, 128))), name="no.tif") as src:
        assert src.icc_profile is None


def test_is_tiff():
    for data in (CASES["rgb8-tiled-deflate"](), _tifffile_bytes(GREY8[:32, :32], bigtiff=True, byteorder=">")):
        assert is_tiff(data[:4])
    assert {is_tiff(b"II*\x00"), is_tiff(b"MM\x00*"), is_tiff(b"II+\x00"), is_tiff(b"MM\x00+")} == {True}
    assert not is_tiff(b"\x89PNG\r\n\x1a\n") and not is_tiff(b"II") and not is_tiff(b"MM\x00\x2b"[:3])


# ------------------------------------------------------------------ only the needed segments, and the cache
class _Recording(io.BytesIO):
    """A file that records every (position, size) of ``read`` once ``recording`` is set."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.recording = False
        self.reads: list[tuple[int, int]] = []

    def read(self, size=-1):
        pos = self.tell()
        out = super().read(size)
        if self.recording:
            self.reads.append((pos, len(out)))
        return out


def _tile_ranges(data: bytes) -> list[tuple[int, int]]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        return list(zip(map(int, page.dataoffsets), map(int, page.databytecounts), strict=True))


def test_region_read_touches_only_its_segments_garbage_elsewhere():
    data = CASES["grey16-tiled-deflate-bigendian-bigtiff"]()
    ranges = _tile_ranges(data)
    across = -(-W // 128)
    wanted = {(ty, tx) for ty in (1, 2) for tx in (0, 1)}  # region [150:300, 100:200] touches these 4 tiles
    spoiled = bytearray(data)
    for i, (off, cnt) in enumerate(ranges):
        if (i // across, i % across) not in wanted:
            spoiled[off : off + cnt] = b"\xff" * cnt  # not deflate data: decoding it would fail
    ref = tifffile.imread(io.BytesIO(data))
    fh = _Recording(bytes(spoiled))
    with TiffSource(fh, name="spoiled.tif") as src:
        fh.recording = True
        np.testing.assert_array_equal(src.read_region(150, 300, 100, 200)[..., 0], ref[150:300, 100:200])
        expected = sorted(ranges[ty * across + tx] for ty, tx in wanted)
        assert sorted(fh.reads) == expected  # exactly the 4 tiles, each read once, nothing else
        fh.reads.clear()
        # overlapping read (a halo): served from the cache, only the new tiles are read
        np.testing.assert_array_equal(src.read_region(140, 250, 110, 256)[..., 0], ref[140:250, 110:256])
        assert fh.reads == []
        with pytest.raises(ImageDecodeError) as err:  # a tile that is garbage: decode error naming file and segment
            src.read_region(150, 300, 100, 300)
    msg = str(err.value)
    assert "spoiled.tif" in msg and "segment" in msg and "re-upload" in msg


class _RangeFile(AbstractBufferedFile):
    """fsspec's buffered remote file (the base of s3fs's S3File), serving byte ranges of ``data`` and recording them."""

    def __init__(self, data: bytes, block_size: int) -> None:
        self.data, self.fetched = data, []
        super().__init__(AbstractFileSystem(), "s3://bucket/slide.tif", mode="rb", size=len(data),
                         block_size=block_size)

    def _fetch_range(self, start: int, end: int) -> bytes:
        self.fetched.append((start, end))
        return self.data[start:end]


def test_fsspec_remote_file_fetches_only_the_touched_tiles():
    data = CASES["grey16-tiled-deflate-bigendian-bigtiff"]()
    ref = tifffile.imread(io.BytesIO(data))
    ranges = _tile_ranges(data)
    across = -(-W // 128)
    block = 4096
    fh = _RangeFile(data, block)
    with TiffSource(fh, name="s3://bucket/slide.tif") as src:
        opened = len(fh.fetched)
        np.testing.assert_array_equal(src.read_region(300, 400, 500, 700)[..., 0], ref[300:400, 500:700])
    touched = [ranges[ty * across + tx] for ty in (2, 3) for tx in (3, 4, 5)]
    fetched = sum(end - start for start, end in fh.fetched[opened:])
    assert sum(c for _, c in touched) <= fetched <= sum(c for _, c in touched) + len(touched) * block
    assert fetched < len(data) / 4


def test_one_uncompressed_strip_is_read_in_row_blocks():
    data = CASES["rgb16-one-strip-none"]()  # tifffile (and Pillow) write an uncompressed image as ONE strip
    (offset, count), = _tile_ranges(data)
    assert count == RGB16.nbytes
    fh = _Recording(data)
    with TiffSource(fh, name="one.tif") as src:
        fh.recording = True
        np.testing.assert_array_equal(src.read_region(200, 210, 5, 7), RGB16[200:210, 5:7])
        rowbytes = W * 3 * 2
        assert fh.reads == [(offset + 175 * rowbytes, 175 * rowbytes)]  # rows 175..349 only: 0.9 MB of 3.8 MB
    with TiffSource(io.BytesIO(data[: offset + 500 * rowbytes]), name="one-cut.tif") as src:
        src.read_region(0, 350, 0, W)
        with pytest.raises(ImageDecodeError, match=r"one-cut.tif: segment 0 .*image rows 350..524.*truncated"):
            src.read_region(0, H, 0, W)


def test_cache_is_bounded_in_bytes():
    data = CASES["rgb8-tiled-deflate"]()  # 128x128x3 = 48 KiB tiles
    fh = _Recording(data)
    with TiffSource(fh, name="c.tif", cache_bytes=3 * 128 * 128 * 3) as src:
        fh.recording = True
        src.read_region(0, 128, 0, W)  # 8 tiles, only 3 fit
        assert sum(src._cache[k].nbytes for k in src._cache) <= 3 * 128 * 128 * 3 and len(src._cache) == 3
        fh.reads.clear()
        src.read_region(0, 128, 0, 128)  # evicted first: read again
        assert len(fh.reads) == 1


# ------------------------------------------------------------------ broken files
def test_truncated_file_names_the_file_and_the_segment():
    data = CASES["rgb8-tiled-deflate"]()
    ranges = _tile_ranges(data)
    cut = ranges[len(ranges) // 2][0] + 10  # in the middle of the pixel data
    assert cut < len(data) - 100
    src = TiffSource(io.BytesIO(data[:cut]), name="cut.tif")  # tifffile writes the directory before the tiles
    with src:
        src.read_region(0, 10, 0, 10)  # before the cut: fine
        with pytest.raises(ImageDecodeError) as err:
            src.read_region(0, H, 0, W)
    msg = str(err.value)
    assert "cut.tif" in msg and "past the end of the file" in msg and "segment" in msg and "re-upload" in msg


def test_truncated_directory_is_refused_at_open():
    data = _tifffile_bytes(GREY8, tile=(128, 128), compression="zlib")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        ifd = tif.pages[0].offset
    with pytest.raises(ImageDecodeError) as err:
        TiffSource(io.BytesIO(data[: ifd + 20]), name="cutifd.tif")  # cut inside the image directory
    assert "cutifd.tif" in str(err.value) and "re-upload" in str(err.value)


def test_deflate_bomb_in_a_tile_is_not_inflated_past_the_tile():
    import tracemalloc

    tile = np.arange(128 * 128, dtype=np.uint16).reshape(128, 128)
    bomb = zlib.compress(tile.tobytes() + bytes(64 << 20), 1)  # a valid tile followed by 64 MB of zeros
    assert len(bomb) < 1 << 20
    buf = io.BytesIO()
    tifffile.imwrite(buf, iter([bomb, zlib.compress(tile.tobytes())]), shape=(128, 256), dtype=np.uint16,
                     tile=(128, 128), compression="zlib")
    with TiffSource(io.BytesIO(buf.getvalue()), name="bomb.tif") as src:
        tracemalloc.start()
        try:
            got = src.read_region(0, 128, 0, 256)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(got[..., 0], np.hstack([tile, tile]))
    assert peak < 8 << 20, f"reading two 32 KiB tiles allocated {peak / 1e6:.0f} MB"


def test_not_a_tiff_and_corrupt_header():
    for data in (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, b"II*\x00" + struct.pack("<I", 10**9) + b"\x00" * 100, b""):
        with pytest.raises(ImageDecodeError) as err:
            TiffSource(io.BytesIO(data), name="bad.tif")
        assert "bad.tif" in str(err.value) and "re-upload" in str(err.value)


def test_several_planes_are_refused_with_the_axes():
    data = _tifffile_bytes(np.stack([GREY8, GREY8, GREY8]), ome=True, tile=(128, 128))  # C, Y, X as 3 pages
    with pytest.raises(ImageDecodeError) as err:
        TiffSource(io.BytesIO(data), name="planes.ome.tif")
    assert "planes.ome.tif" in str(err.value) and "3 planes" in str(err.value) and "CYX" in str(err.value)


def test_unsupported_dtype_says_which_and_the_fix():
    data = _tifffile_bytes(GREY16.astype(np.float32), tile=(128, 128))
    with pytest.raises(ImageDecodeError) as err:
        TiffSource(io.BytesIO(data), name="float.tif")
    msg = str(err.value)
    assert "float.tif" in msg and "float32" in msg and "16-bit unsigned" in msg


def test_region_outside_the_image_is_refused():
    with TiffSource(io.BytesIO(CASES["rgb8-tiled-deflate"]()), name="r.tif") as src:
        for region in ((0, H + 1, 0, 10), (5, 5, 0, 10), (-1, 3, 0, 10)):
            with pytest.raises(ConfigError):
                src.read_region(*region)


# ------------------------------------------------------------------ tiled BigTIFF writer
def _bands(arr: np.ndarray, heights):
    y = 0
    for h in heights:
        yield arr[y : y + h]
        y += h
    assert y == arr.shape[0]


@pytest.mark.parametrize(
    ("arr", "channels", "alpha", "tile", "ome"),
    [
        (RGB8, 3, False, (128, 256), False),
        (GREY16[..., None], 1, False, (128, 128), False),
        (RGBA8, 3, True, (256, 128), False),
        (RGB16, 3, False, (128, 128), True),
    ],
    ids=["rgb8", "grey16", "rgba8", "rgb16-ome"],
)
def test_tiled_writer_round_trip(tmp_path, arr, channels, alpha, tile, ome):
    path = tmp_path / "out.tif"
    icc = b"not-a-real-profile" * 5
    with open(path, "wb") as fh:
        write_tiled_tiff(fh, _bands(arr, [1, 127, 200, 5, 367]), height=H, width=W, channels=channels,
                         dtype=arr.dtype, tile=tile, ome=ome, icc_profile=icc, has_alpha=alpha, description="x4 test")
    back = tifffile.imread(path)
    np.testing.assert_array_equal(back.reshape(arr.shape), arr)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert tif.is_bigtiff and page.is_tiled and (page.tilelength, page.tilewidth) == tile
        assert int(page.compression) == 8  # deflate
        assert int(page.photometric) == (2 if channels == 3 else 1)
        assert len(page.extrasamples) == int(alpha) and (not alpha or int(page.extrasamples[0]) == 2)
        assert page.tags[34675].value == icc
        assert tif.is_ome is ome
        if not ome:
            assert page.description == "x4 test"


def _half_reference(a: np.ndarray) -> np.ndarray:
    """2x2 mean in float64, rounded half up, odd edge repeated: what a pyramid level should hold."""
    p = np.pad(a.astype(np.float64), ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
    return np.floor((p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]) / 4 + 0.5).astype(a.dtype)


@pytest.mark.parametrize("ome", [True, False], ids=["ome", "plain"])
def test_tiled_writer_pyramid(tmp_path, ome):
    arr = RGB16[:699, :899]  # odd sizes: the last row and column are repeated when halving
    path = tmp_path / "pyr.ome.tif"
    with open(path, "wb") as fh:
        write_tiled_tiff(fh, _bands(arr, [300, 1, 398]), height=699, width=899, channels=3, dtype=np.uint16,
                         tile=(128, 128), ome=ome, pyramid=3, tmpdir=str(tmp_path))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome is ome and len(tif.series) == 1
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(699, 899, 3), (350, 450, 3), (175, 225, 3), (88, 113, 3)]
        ref = arr
        for lv in levels:
            np.testing.assert_array_equal(lv.asarray(), ref)
            ref = _half_reference(ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyr.ome.tif"]  # spool files are gone
    with open(path, "rb") as fh, TiffSource(fh, name="pyr.ome.tif") as src:  # the reader takes level 0
        assert (src.height, src.width) == (699, 899)
        np.testing.assert_array_equal(src.read_region(600, 699, 800, 899), arr[600:, 800:])


def test_tiled_writer_bands_are_checked(tmp_path):
    def write(bands, tile=(128, 128)):
        with open(tmp_path / "bad.tif", "wb") as fh:
            write_tiled_tiff(fh, bands, height=H, width=W, channels=3, dtype=np.uint8, tile=tile)

    with pytest.raises(ConfigError, match="600 rows, expected height=700"):
        write(_bands(RGB8[:600], [300, 300]))
    with pytest.raises(ConfigError, match="more than height"):
        write(iter([RGB8, RGB8[:1]]))
    with pytest.raises(ConfigError, match="band 1"):
        write(iter([RGB8[:100], RGB8[100:200, :-1]]))
    with pytest.raises(ConfigError, match="band 0"):
        write(iter([RGB16[:100]]))
    with pytest.raises(ConfigError, match="multiples of 16"):
        write(iter([RGB8]), tile=(100, 128))


# ------------------------------------------------------------------ PNG stream
class _WriteOnly:
    """A sink with ``write`` only: proves the PNG writer never seeks or tells (fsspec remote files in 'wb')."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


def _png(arr: np.ndarray, heights, *, channels, alpha=False, **kw) -> bytes:
    sink = _WriteOnly()
    write_png_stream(sink, _bands(arr, heights), height=arr.shape[0], width=arr.shape[1], channels=channels,
                     dtype=arr.dtype, has_alpha=alpha, **kw)
    return sink.getvalue()


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", png[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        out.append((kind, body))
        pos += 12 + n
    return out


def _unfilter_reference(png: bytes) -> np.ndarray:
    """An independent, per-pixel (slow, small images only) PNG decoder for 8/16-bit, non-interlaced images."""
    chunks = _chunks(png)
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert interlace == 0
    samples = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    bpp = samples * depth // 8
    stride = w * bpp
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == h * (stride + 1)
    rows, prev = [], [0] * stride
    for y in range(h):
        ftype, line = raw[y * (stride + 1)], list(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            else:
                assert ftype == 0
        rows.append(line)
        prev = line
    arr = np.array(rows, np.uint8)
    if depth == 16:
        arr = arr.view(">u2").astype(np.uint16)
    return arr.reshape(h, w, samples)


@pytest.mark.parametrize("filter_", ["adaptive", "none", "sub", "up", "average", "paeth"])
@pytest.mark.parametrize(("arr", "channels", "alpha"), [(RGB8, 3, False), (GREY8, 1, False), (RGBA8, 3, True)],
                         ids=["rgb8", "grey8", "rgba8"])
def test_png_stream_8bit_equals_pillow(arr, channels, alpha, filter_):
    data = _png(arr, [1, 99, 256, 344], channels=channels, alpha=alpha, filter=filter_)
    im = Image.open(io.BytesIO(data))
    assert im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2] if arr.ndim == 3 else 1]
    np.testing.assert_array_equal(np.asarray(im), arr)


def test_png_stream_adaptive_uses_several_filters():
    data = _png(RGB8, [H], channels=3)
    raw = zlib.decompress(b"".join(body for kind, body in _chunks(data) if kind == b"IDAT"))
    used = {raw[y * (W * 3 + 1)] for y in range(H)}
    assert len(used) >= 2, used


@pytest.mark.parametrize(("channels", "alpha"), [(1, False), (3, False), (1, True), (3, True)],
                         ids=["grey16", "rgb16", "greyalpha16", "rgba16"])
def test_png_stream_16bit_independent_decoders(channels, alpha):
    arr = _smooth((37, 53, channels + alpha), np.uint16)
    arr[0, 0] = 65535  # high bytes in play
    arr[1, 1] = 1
    data = _png(arr, [5, 1, 20, 11], channels=channels, alpha=alpha, icc_profile=None)
    np.testing.assert_array_equal(_unfilter_reference(data), arr)
    dec = decode_image(data, name="p16.png")
    assert dec.pixels.dtype == np.uint16
    np.testing.assert_array_equal(dec.pixels, arr[..., :channels])
    if alpha:
        np.testing.assert_array_equal(dec.alpha, arr[..., channels])


def test_png_stream_icc_and_bounded_idat_chunks():
    icc = bytes(range(256)) * 50
    noisy = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)  # ~1.9 MB that does not compress
    data = _png(noisy, [100, 600], channels=3, icc_profile=icc)
    assert Image.open(io.BytesIO(data)).info.get("icc_profile") == icc
    idat = [len(body) for kind, body in _chunks(data) if kind == b"IDAT"]
    assert len(idat) >= 2 and max(idat) <= 1 << 20
    assert _chunks(data)[-1] == (b"IEND", b"")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), noisy)


def test_png_stream_bands_are_checked():
    with pytest.raises(ConfigError, match="expected height=700"):
        write_png_stream(_WriteOnly(), iter([RGB8[:600]]), height=H, width=W, channels=3, dtype=np.uint8)
    with pytest.raises(ConfigError, match="more than height"):
        write_png_stream(_WriteOnly(), iter([RGB8, RGB8[:1]]), height=H, width=W, channels=3, dtype=np.uint8)
    with pytest.raises(ConfigError, match="band 0"):
        write_png_stream(_WriteOnly(), iter([RGBA8]), height=H, width=W, channels=3, dtype=np.uint8)
    with pytest.raises(ConfigError, match="channels=2"):
        write_png_stream(_WriteOnly(), iter([RGB8]), height=H, width=W, channels=2, dtype=np.uint8)


# ------------------------------------------------------------------ memory: streaming really happens
_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from srbatch.io.pngstream import write_png_stream
    from srbatch.io.tiff import TiffSource, write_tiled_tiff

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    src_path, out_path, band, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with open(src_path, "rb") as fh, TiffSource(fh, name=src_path, cache_bytes=4 << 20) as src:
        def bands():
            for y in range(0, src.height, band):
                yield src.read_region(y, min(y + band, src.height), 0, src.width)
        base = status("VmRSS:")
        with open(out_path, "wb") as out:
            if mode == "tiff":
                write_tiled_tiff(out, bands(), height=src.height, width=src.width, channels=1, dtype=src.dtype,
                                 tile=(256, 256), predictor=True, pyramid=2)
            else:
                write_png_stream(out, bands(), height=src.height, width=src.width, channels=1, dtype=src.dtype)
    print(base, status("VmHWM:"))
    """
)


@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory):
    side = 4000
    y, x = np.mgrid[0:side, 0:side]
    img = ((x * 7 + y * 3) % 65536).astype(np.uint16) ^ RNG.integers(0, 64, (side, side), dtype=np.uint16)
    del x, y
    path = tmp_path_factory.mktemp("big") / "big.tif"
    tifffile.imwrite(path, img, tile=(256, 256), compression="zlib", compressionargs={"level": 1})
    assert img.nbytes == 32_000_000
    return path, img


def _stream_in_child(src, out, mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), "200", mode], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    base, peak = map(int, run.stdout.split())
    growth = peak - base
    print(f"streaming 4000x4000 uint16 (32 MB) to {mode}: RSS {base / 1e6:.1f} MB before, peak {peak / 1e6:.1f} MB, "
          f"growth {growth / 1e6:.1f} MB")
    assert growth < 20_000_000, f"peak RSS grew by {growth / 1e6:.1f} MB while streaming a 32 MB image to {mode}"
    return growth


def test_streaming_tiff_memory_stays_bounded(tmp_path, big_tiff):
    src, img = big_tiff
    out = tmp_path / "out.tif"
    _stream_in_child(src, out, "tiff")
    with tifffile.TiffFile(out) as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(4000, 4000), (2000, 2000), (1000, 1000)]
        np.testing.assert_array_equal(levels[0].asarray(), img)


def test_streaming_png_memory_stays_bounded(tmp_path, big_tiff):
    src, img = big_tiff
    out = tmp_path / "out.png"
    _stream_in_child(src, out, "png")
    dec = decode_image(out.read_bytes(), name="out.png", max_pixels=img.size)
    np.testing.assert_array_equal(dec.pixels[..., 0], img)
