"""Tests of srbatch.io.images: every input is generated here with Pillow, numpy, zlib and struct."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from srbatch.errors import ConfigError, ImageDecodeError, ImageTooLargeError
from srbatch.io.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_OUTPUT_FORMATS,
    DecodedImage,
    decode_image,
    encode_image,
    encode_losses,
    format_from_name,
    from_float,
    to_float,
)

RNG = np.random.default_rng(1234)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def pil_bytes(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def rand(shape, dtype=np.uint8) -> np.ndarray:
    return RNG.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, colour_type: int = 0) -> bytes:
    """A PNG declaring width x height with a tiny (far too short) IDAT: a decompression-bomb lookalike."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- 8-bit modes


@pytest.mark.parametrize("channels,with_alpha", [(1, False), (1, True), (3, False), (3, True)])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_lossless_round_trip_8bit(channels, with_alpha, fmt):
    img = DecodedImage(pixels=rand((9, 13, channels)), alpha=rand((9, 13)) if with_alpha else None)
    back = decode_image(encode_image(img, format=fmt, lossless=True))
    expected = img.pixels if fmt != "WEBP" or channels == 3 else np.repeat(img.pixels, 3, axis=2)
    assert back.pixels.dtype == np.uint8
    np.testing.assert_array_equal(back.pixels, expected)
    if with_alpha:
        np.testing.assert_array_equal(back.alpha, img.alpha)
    else:
        assert back.alpha is None


@pytest.mark.parametrize("mode,channels,has_alpha", [("L", 1, False), ("LA", 1, True), ("RGB", 3, False),
                                                     ("RGBA", 3, True)])
def test_decode_pillow_modes(mode, channels, has_alpha):
    n = len(mode)
    src = Image.fromarray(rand((8, 6, n)).squeeze(-1) if n == 1 else rand((8, 6, n)), mode)
    dec = decode_image(pil_bytes(src, "PNG"), name="a.png")
    assert (dec.mode, dec.format, dec.channels, dec.info["n_frames"]) == (mode, "PNG", channels, 1)
    arr = np.asarray(src).reshape(8, 6, n)
    np.testing.assert_array_equal(dec.pixels, arr[..., :channels])
    if has_alpha:
        np.testing.assert_array_equal(dec.alpha, arr[..., -1])
    else:
        assert dec.alpha is None


def test_palette_with_transparency_becomes_rgba():
    src = Image.fromarray(rand((10, 12, 3))).quantize(16)
    src.info["transparency"] = 3
    data = pil_bytes(src, "PNG", transparency=3)
    dec = decode_image(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    assert dec.mode == "P" and dec.alpha is not None
    np.testing.assert_array_equal(dec.pixels, expected[..., :3])
    np.testing.assert_array_equal(dec.alpha, expected[..., 3])
    assert set(np.unique(dec.alpha)) <= {0, 255} and (dec.alpha == 0).any()


def test_palette_without_transparency_becomes_rgb():
    src = Image.fromarray(rand((10, 12, 3))).quantize(16)
    dec = decode_image(pil_bytes(src, "PNG"))
    assert dec.alpha is None and dec.pixels.shape == (10, 12, 3)
    np.testing.assert_array_equal(dec.pixels, np.asarray(src.convert("RGB")))


def test_grey_and_rgb_with_transparency_key_get_alpha():
    grey = Image.fromarray(np.array([[0, 7], [7, 9]], np.uint8))
    dec = decode_image(pil_bytes(grey, "PNG", transparency=7))
    np.testing.assert_array_equal(dec.alpha, [[255, 0], [0, 255]])
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8))
    dec = decode_image(pil_bytes(rgb, "PNG", transparency=(4, 5, 6)))
    np.testing.assert_array_equal(dec.alpha, [[255, 0]])


def test_bilevel_becomes_grey():
    bits = rand((7, 9)) > 127
    dec = decode_image(pil_bytes(Image.fromarray(bits), "PNG"))
    assert dec.mode == "1" and dec.pixels.dtype == np.uint8 and dec.channels == 1
    np.testing.assert_array_equal(dec.pixels[..., 0], np.where(bits, 255, 0))


def test_cmyk_jpeg_becomes_rgb_and_its_profile_is_dropped():
    cmyk = Image.fromarray(rand((16, 16, 3))).convert("CMYK")
    data = pil_bytes(cmyk, "JPEG", quality=95, icc_profile=SRGB)  # a stand-in profile: only its presence matters
    dec = decode_image(data)
    assert dec.mode == "CMYK" and dec.pixels.shape == (16, 16, 3) and dec.alpha is None
    np.testing.assert_array_equal(dec.pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert dec.icc_profile is None and "CMYK" in dec.info["icc_dropped"]


# ------------------------------------------------------------------------------------------------------- 16-bit


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_pillow_written_16bit_grey_decodes_to_uint16(fmt):
    arr = rand((11, 7), np.uint16)
    dec = decode_image(pil_bytes(Image.fromarray(arr), fmt))
    assert dec.mode.startswith("I;16") and dec.pixels.dtype == np.uint16 and dec.bit_depth == 16
    np.testing.assert_array_equal(dec.pixels[..., 0], arr)


@pytest.mark.parametrize("channels,with_alpha", [(1, False), (1, True), (3, False), (3, True)])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_round_trip(channels, with_alpha, fmt):
    img = DecodedImage(pixels=rand((9, 14, channels), np.uint16),
                       alpha=rand((9, 14), np.uint16) if with_alpha else None, icc_profile=SRGB)
    data = encode_image(img, format=fmt)
    back = decode_image(data)
    assert back.pixels.dtype == np.uint16 and "downgraded_from" not in back.info
    grey_alpha_tiff = fmt == "TIFF" and channels == 1 and with_alpha
    np.testing.assert_array_equal(back.pixels, np.repeat(img.pixels, 3, axis=2) if grey_alpha_tiff else img.pixels)
    if with_alpha:
        np.testing.assert_array_equal(back.alpha, img.alpha)
    assert back.icc_profile == SRGB
    assert bool(encode_losses(img, fmt)) == grey_alpha_tiff
    Image.open(io.BytesIO(data)).load()  # Pillow itself reads what we wrote by hand


def test_16bit_rgb_big_endian_uncompressed_tiff():
    px = rand((5, 6, 3), np.uint16)
    strip = px.astype(">u2").tobytes()
    n, base = 10, 8 + 2 + 12 * 10 + 4
    entries = [struct.pack(">HHII", 256, 4, 1, 6), struct.pack(">HHII", 257, 4, 1, 5),
               struct.pack(">HHII", 258, 3, 3, base), struct.pack(">HHIHH", 259, 3, 1, 1, 0),
               struct.pack(">HHIHH", 262, 3, 1, 2, 0), struct.pack(">HHII", 273, 4, 1, base + 6),
               struct.pack(">HHIHH", 277, 3, 1, 3, 0), struct.pack(">HHII", 278, 4, 1, 5),
               struct.pack(">HHII", 279, 4, 1, len(strip)), struct.pack(">HHIHH", 284, 3, 1, 1, 0)]
    data = (b"MM\x00*" + struct.pack(">IH", 8, n) + b"".join(entries) + struct.pack(">I", 0)
            + struct.pack(">3H", 16, 16, 16) + strip)
    np.testing.assert_array_equal(decode_image(data).pixels, px)


def test_16bit_rgb_interlaced_png():
    px = rand((13, 11, 3), np.uint16)
    raw = b""
    for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)]:
        for row in px[y0::dy, x0::dx]:
            raw += b"\x00" + row.astype(">u2").tobytes() if row.size else b""
    ihdr = struct.pack(">IIBBBBB", 11, 13, 16, 2, 0, 0, 1)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    np.testing.assert_array_equal(decode_image(data).pixels, px)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_16bit_to_8bit_formats_round_half_up(fmt):
    img = DecodedImage(pixels=rand((8, 8, 3), np.uint16))
    expected = ((img.pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    back = decode_image(encode_image(img, format=fmt, lossless=fmt == "WEBP"))
    assert back.pixels.dtype == np.uint8
    if fmt == "WEBP":
        np.testing.assert_array_equal(back.pixels, expected)
    assert any("8-bit" in loss for loss in encode_losses(img, fmt))


def test_32bit_integer_is_clipped_and_float_is_refused():
    arr = np.array([[-5, 0, 70000], [1, 65535, 300]], np.int32)
    dec = decode_image(pil_bytes(Image.fromarray(arr), "TIFF"))
    np.testing.assert_array_equal(dec.pixels[..., 0], [[0, 0, 65535], [1, 65535, 300]])
    assert dec.pixels.dtype == np.uint16 and "clipped" in dec.info
    with pytest.raises(ImageDecodeError, match=r"f\.tif: 32-bit floating-point"):
        decode_image(pil_bytes(Image.fromarray(np.ones((3, 3), np.float32)), "TIFF"), name="f.tif")


# ------------------------------------------------------------------------------------- orientation, ICC, frames


def test_exif_orientation_6_rotates_jpeg():
    # left half red, right half blue, 32 x 16; orientation 6 = rotate 90 degrees clockwise to display
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    dec = decode_image(pil_bytes(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95))
    assert (dec.width, dec.height) == (16, 32) and dec.info["exif_orientation"] == 6
    top, bottom = dec.pixels[4, 8].astype(int), dec.pixels[28, 8].astype(int)
    assert top[0] > 200 and top[2] < 60  # red ends on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation):
    src = Image.fromarray(rand((5, 7, 4)), "RGBA")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(src, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    dec = decode_image(data)
    np.testing.assert_array_equal(dec.pixels, expected[..., :3])
    np.testing.assert_array_equal(dec.alpha, expected[..., 3])


@pytest.mark.parametrize("fmt", SUPPORTED_OUTPUT_FORMATS)
def test_icc_profile_is_carried(fmt):
    dec = decode_image(pil_bytes(Image.fromarray(rand((6, 6, 3))), "PNG", icc_profile=SRGB))
    assert dec.icc_profile == SRGB
    assert Image.open(io.BytesIO(encode_image(dec, format=fmt))).info.get("icc_profile") == SRGB


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    dec = decode_image(data)
    assert dec.info["n_frames"] == 3 and dec.format == "GIF"
    assert (dec.pixels == (255, 0, 0)).all()


def test_multipage_tiff_uses_first_page():
    pages = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (10, 20)]
    dec = decode_image(pil_bytes(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    assert dec.info["n_frames"] == 2 and (dec.pixels == 10).all()


# --------------------------------------------------------------------------------------------------- encoding


def test_quality_changes_jpeg_size_and_alpha_is_dropped():
    img = DecodedImage(pixels=rand((64, 64, 3)), alpha=rand((64, 64)))
    low, high = encode_image(img, format="jpg", quality=30), encode_image(img, format="JPEG")
    assert len(low) < len(high)
    back = decode_image(high)
    assert back.alpha is None and back.format == "JPEG"
    assert encode_losses(img, "jpeg") == ["alpha dropped (JPEG has no alpha channel)"]


def test_grey_stays_grey_in_jpeg_and_png():
    img = DecodedImage(pixels=rand((8, 8, 1)), mode="L")
    for fmt in ("JPEG", "PNG", "TIFF"):
        assert decode_image(encode_image(img, format=fmt)).channels == 1


def test_format_names_and_errors():
    img = DecodedImage(pixels=rand((4, 4, 3)))
    assert Image.open(io.BytesIO(encode_image(img, format="tif"))).format == "TIFF"
    assert Image.open(io.BytesIO(encode_image(img, format="WebP"))).format == "WEBP"
    with pytest.raises(ConfigError, match="PNG, JPEG, WEBP, TIFF"):
        encode_image(img, format="bmp")
    with pytest.raises(ConfigError, match="no lossless mode"):
        encode_image(img, format="JPEG", lossless=True)
    with pytest.raises(ConfigError, match="quality"):
        encode_image(img, format="JPEG", quality=0)
    assert format_from_name("s3://bucket/dir/a.JPG") == "JPEG"
    assert [format_from_name(p) for p in ("x.png", "y.jpeg", "z.webp", "w.tif", "v.TIFF")] == [
        "PNG", "JPEG", "WEBP", "TIFF", "TIFF"]
    with pytest.raises(ConfigError, match="a.bmp"):
        format_from_name("a.bmp")


# ----------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_errors(fmt):
    data = pil_bytes(Image.fromarray(rand((64, 64, 3))), fmt)
    with pytest.raises(ImageDecodeError, match=rf"cut\.{fmt.lower()}: truncated"):
        decode_image(data[: len(data) // 2], name=f"cut.{fmt.lower()}")


@pytest.mark.parametrize("data,cause", [
    (b"", "empty file"),
    (RNG.integers(0, 256, 4096).astype(np.uint8).tobytes(), "not an image or an unsupported format"),
    (b"hello, I am a text file\n" * 10, "not an image or an unsupported format"),
])
def test_non_images_are_errors_naming_the_file(data, cause):
    with pytest.raises(ImageDecodeError, match=rf"bucket/x\.png: {cause}"):
        decode_image(data, name="bucket/x.png")


def test_corrupt_png_chunk_is_an_error():
    data = bytearray(pil_bytes(Image.fromarray(rand((16, 16, 3))), "PNG"))
    data[40:60] = b"\xff" * 20  # clobbers the end of IHDR's CRC and the start of IDAT
    with pytest.raises(ImageDecodeError, match="bad.png"):
        decode_image(bytes(data), name="bad.png")


def test_decompression_bomb_is_refused_from_the_header():
    data = png_header_only(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: declares 100000 x 100000") as caught:
        decode_image(data, name="bomb.png")
    assert time.perf_counter() - start < 1.0
    assert f"{DEFAULT_MAX_PIXELS:,}" in str(caught.value) and "max_pixels" in str(caught.value)
    assert isinstance(caught.value, ImageDecodeError)


def test_custom_limit_applies_to_real_images():
    data = pil_bytes(Image.fromarray(rand((20, 30, 3))), "PNG")
    with pytest.raises(ImageTooLargeError, match="30 x 20 = 600 pixels, above the limit of 599"):
        decode_image(data, max_pixels=599)
    assert decode_image(data, max_pixels=600).pixels.shape == (20, 30, 3)


def test_pillow_pixel_limit_does_not_leak():
    # 9500 x 9500 is above Pillow's warning threshold but within ours: no DecompressionBombWarning, and the too-short
    # IDAT is reported as our own error.
    assert 9500 * 9500 > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageDecodeError, match="big.png: truncated") as caught:
            decode_image(png_header_only(9500, 9500), name="big.png")
    assert not isinstance(caught.value, ImageTooLargeError)


# ------------------------------------------------------------------------------------------------ conversions


def test_float_conversions():
    for dtype in (np.uint8, np.uint16):
        every = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
        as_float = to_float(every)
        assert as_float.dtype == np.float32 and as_float[0] == 0.0 and as_float[-1] == 1.0
        np.testing.assert_array_equal(from_float(as_float, dtype), every)
    np.testing.assert_array_equal(from_float(np.array([-0.5, np.nan, 0.5, 1.5, np.inf]), np.uint8), [0, 0, 128, 255, 255])
    assert from_float(np.array([0.5]), "uint16")[0] == 32768
    with pytest.raises(ConfigError):
        to_float(np.zeros(3, np.float32))
    with pytest.raises(ConfigError):
        from_float(np.zeros(3), np.int16)


def test_tile_rewrite_handles_plain_tuples_of_older_pillow():
    from srbatch.io.images import _rawmode, _with_rawmode

    assert _with_rawmode(("zip", (0, 0, 2, 2), 41, "RGB;16B"), "RGB;16L") == ("zip", (0, 0, 2, 2), 41, "RGB;16L")
    tile = ("raw", (0, 0, 2, 2), 8, ("RGB;16B", 0, 1))
    assert _rawmode(_with_rawmode(tile, "RGB;16L")) == "RGB;16L" and _rawmode(tile) == "RGB;16B"
