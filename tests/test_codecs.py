"""Output encoding choices (PNG level, lossless WebP, JPEG from a tensor), their config checks and fingerprint, and
the weight-free ``nearest`` model. Pixels are checked with Pillow, numpy and hashlib, never with srbatch's own output.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, JpegImagePlugin

from srbatch import load_model
from srbatch.errors import ConfigError
from srbatch.inference.upscaler import Upscaler
from srbatch.io.images import DecodedImage, encode_image, encode_jpeg_tensor
from srbatch.io.pngstream import write_png_stream
from srbatch.models.archs import nearest
from srbatch.upscale.config import build_parser, config_from_args, load_config
from srbatch.upscale.plan import fingerprint

LEVELS = (0, 1, 3, 6, 9)


@pytest.fixture(scope="module")
def photo(refs) -> np.ndarray:
    """A 128x128 RGB crop of a real CC0 photo (refs/train/cc0_pexels/airplane.png)."""
    with Image.open(refs / "train" / "cc0_pexels" / "airplane.png") as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[600:728, 700:828])


def _pillow(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse else float("inf")


def _idat(png: bytes) -> bytes:
    """The concatenated IDAT payload of a PNG (its chunks walked by hand)."""
    out, at = [], 8
    while at < len(png):
        n = int.from_bytes(png[at:at + 4], "big")
        if png[at + 4:at + 8] == b"IDAT":
            out.append(png[at + 8:at + 8 + n])
        at += 12 + n
    return b"".join(out)


def _zlib_level(png: bytes) -> int:
    """FLEVEL of the zlib header (RFC 1950): 0 fastest (level 0-1), 1 fast (2-5), 2 default (6), 3 best (7-9)."""
    return _idat(png)[1] >> 6


# --------------------------------------------------------------------------------------------------- PNG level


def test_png_levels_keep_pixels_and_trade_size(photo):
    sizes = {}
    for level in LEVELS:
        data = encode_image(DecodedImage(pixels=photo), format="PNG", compress_level=level)
        assert np.array_equal(np.asarray(_pillow(data)), photo), level
        assert _zlib_level(data) == {0: 0, 1: 0, 3: 1, 6: 2, 9: 3}[level], level
        sizes[level] = len(data)
    assert sizes[0] > photo.size  # stored blocks: the raw samples and more
    assert sizes[0] > sizes[1] > sizes[9] and sizes[3] >= sizes[9], sizes


def test_png16_and_streamed_png_honour_the_level(photo):
    wide = photo.astype(np.uint16) * 257 + 3
    sizes16, sizes_stream = [], []
    for level in (0, 1, 9):
        data = encode_image(DecodedImage(pixels=wide), format="PNG", compress_level=level)
        # Pillow opens 16-bit RGB PNG as 8-bit RGB: read the samples from the zlib stream, undoing the 'Up' filter
        raw = zlib.decompress(_idat(data))
        rows = np.frombuffer(raw, np.uint8).reshape(128, 1 + 128 * 6)
        assert (rows[:, 0] == 2).all()
        samples = np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8).view(">u2").reshape(128, 128, 3)
        assert np.array_equal(samples, wide), level
        sizes16.append(len(data))
        buf = io.BytesIO()
        write_png_stream(buf, [photo[:50], photo[50:]], height=128, width=128, channels=3, dtype=np.uint8, level=level)
        assert np.array_equal(np.asarray(_pillow(buf.getvalue())), photo)
        assert _zlib_level(buf.getvalue()) == {0: 0, 1: 0, 9: 3}[level]
        sizes_stream.append(buf.tell())
    assert sizes16[0] > sizes16[1] > sizes16[2] and sizes_stream[0] > sizes_stream[1] > sizes_stream[2]


# ------------------------------------------------------------------------------------------------ lossless WebP


def test_lossless_webp_is_exact_even_under_transparent_alpha(photo):
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    alpha[:, :64] = 0  # fully transparent half: its RGB must survive too (Pillow's exact=True)
    alpha[100:, 64:] = 77
    cfg = load_config(overrides={"input": "in/", "output": "out/", "format": "WEBP", "webp_lossless": True})
    img = DecodedImage(pixels=photo, alpha=alpha)
    back = np.asarray(_pillow(encode_image(img, **cfg.encode_options())).convert("RGBA"))
    assert np.array_equal(back[..., :3], photo) and np.array_equal(back[..., 3], alpha)
    lossy = load_config(overrides={"input": "in/", "output": "out/", "format": "WEBP"})
    rough = np.asarray(_pillow(encode_image(img, **lossy.encode_options())).convert("RGBA"))
    assert not np.array_equal(rough[..., :3], photo)  # the lossy default is not exact: the flag does something


# ------------------------------------------------------------------------------------------------------- config


def _cfg(**kw):
    return load_config(overrides={"input": "in/", "output": "out/", **kw})


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"format": "PNG", "webp_lossless": True}, ["webp_lossless", "format WEBP"]),
        ({"format": "WEBP", "webp_lossless": True, "quality": 80}, ["quality", "lossless WebP", "drop quality"]),
        ({"format": "PNG", "jpeg_encoder": "gpu"}, ["jpeg_encoder gpu", "format JPEG"]),
        ({"png_compression": 10}, ["png_compression", "less than or equal to 9"]),
        ({"jpeg_encoder": "nvjpeg"}, ["jpeg_encoder", "'auto', 'pillow' or 'gpu'"]),
    ],
)
def test_config_refusals_name_the_field_and_the_fix(fields, words):
    with pytest.raises(ConfigError) as err:
        _cfg(**fields)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.parametrize(
    "fields",
    [{}, {"format": "JPEG", "jpeg_encoder": "gpu", "quality": 90}, {"format": "WEBP", "webp_lossless": True},
     {"format": "TIFF"}, {"format": "PNG", "png_compression": 9}],
)
def test_config_survives_the_trip_to_the_actors(fields):
    """Actors rebuild the config from ``model_dump()`` (every field set): each valid combination must survive it."""
    cfg = _cfg(**fields)
    again = type(cfg).model_validate(cfg.model_dump())
    assert again == cfg and again.encode_options() == cfg.encode_options()


def test_flags_and_encode_options():
    args = build_parser().parse_args(["in/", "-o", "out/", "--png-compression", "9"])
    cfg = config_from_args(args)
    assert cfg.encode_options() == {"format": "PNG", "quality": None, "lossless": False, "compress_level": 9}
    assert _cfg().encode_options()["compress_level"] == 1  # the default
    assert _cfg(format="TIFF", png_compression=9).encode_options()["compress_level"] == 6  # TIFF bytes as before
    args = build_parser().parse_args(["in/", "-o", "out/", "--format", "WEBP", "--webp-lossless"])
    assert config_from_args(args).encode_options() == {"format": "WEBP", "quality": None, "lossless": True,
                                                       "compress_level": 6}
    assert _cfg(format="JPEG", quality=80).encode_options()["quality"] == 80


def test_jpeg_on_device():
    assert _cfg(format="JPEG").jpeg_on_device("cuda") is True  # auto
    assert _cfg(format="JPEG").jpeg_on_device("cpu") is False
    assert _cfg(format="JPEG", jpeg_encoder="pillow").jpeg_on_device("cuda") is False
    assert _cfg(format="JPEG", jpeg_encoder="gpu").jpeg_on_device("cuda") is True
    assert _cfg(format="PNG").jpeg_on_device("cuda") is False
    with pytest.raises(ConfigError, match="jpeg_encoder gpu needs a CUDA device"):
        _cfg(format="JPEG", jpeg_encoder="gpu").jpeg_on_device("cpu")


# -------------------------------------------------------------------------------------------------- fingerprint

MODEL_ID = {"name": "edsr-baseline", "sha256": "ab" * 32}


def _old_fingerprint(cfg) -> str:
    """The fingerprint as every run before the codec settings computed it (written out here, independently)."""
    payload = {"model": dict(MODEL_ID), "scale": cfg.scale, "outscale": cfg.outscale, "dtype": cfg.dtype,
               "tile": cfg.tile, "tile_overlap": cfg.tile_overlap, "format": cfg.format, "quality": cfg.quality,
               "reference": cfg.reference}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "fields",
    [
        {"format": "PNG", "png_compression": 6},
        {"format": "JPEG", "jpeg_encoder": "pillow"},
        {"format": "JPEG", "jpeg_encoder": "pillow", "quality": 90},
        {"format": "WEBP"},
        {"format": "WEBP", "quality": 80},
        {"format": "TIFF"},
    ],
)
def test_fingerprint_unchanged_where_the_bytes_are(fields):
    cfg = _cfg(**fields)
    assert fingerprint(cfg, MODEL_ID) == _old_fingerprint(cfg)


def test_fingerprint_follows_every_codec_setting():
    fps = {
        "png6": fingerprint(_cfg(png_compression=6), MODEL_ID),
        "png1": fingerprint(_cfg(), MODEL_ID),
        "png9": fingerprint(_cfg(png_compression=9), MODEL_ID),
        "webp": fingerprint(_cfg(format="WEBP"), MODEL_ID),
        "webp-lossless": fingerprint(_cfg(format="WEBP", webp_lossless=True), MODEL_ID),
        "jpeg-pillow": fingerprint(_cfg(format="JPEG", jpeg_encoder="pillow"), MODEL_ID),
        "jpeg-auto": fingerprint(_cfg(format="JPEG"), MODEL_ID),
        "jpeg-gpu": fingerprint(_cfg(format="JPEG", jpeg_encoder="gpu"), MODEL_ID),
    }
    assert len(set(fps.values())) == len(fps), fps
    assert fps["png1"] != _old_fingerprint(_cfg())  # the new default level is new bytes: default runs are redone once


# ------------------------------------------------------------------------------------------- JPEG from a tensor


def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_jpeg_tensor_on_cpu_decodes_close_to_the_source(photo):
    data = encode_jpeg_tensor(torch.from_numpy(photo), quality=95)
    im = _pillow(data)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (128, 128)
    back = np.asarray(im)
    assert _psnr(back, photo) >= 40.0
    # a black image, a wrong channel order or a transposed layout would move the per-channel means
    assert np.abs(back.reshape(-1, 3).mean(0) - photo.reshape(-1, 3).mean(0)).max() < 1.5
    assert np.ptp(photo.reshape(-1, 3).mean(0)) > 5  # ... which this crop can show (its channels differ)
    assert JpegImagePlugin.get_sampling(im) == 2  # libjpeg's default 4:2:0 through torchvision, as documented
    assert len(encode_jpeg_tensor(torch.from_numpy(photo), quality=30)) < len(data)  # quality is passed on


def test_jpeg_tensor_grey_and_16_bit(photo):
    grey = np.ascontiguousarray(photo[..., 1:2])
    im = _pillow(encode_jpeg_tensor(torch.from_numpy(grey)))
    assert im.mode == "L" and _psnr(np.asarray(im), grey[..., 0]) >= 40.0
    wide = photo.astype(np.uint16) * 257 + np.uint16(100)  # rounds back to photo: (257x + 100 + 128) // 257 = x
    wide[0, 0] = [128, 129, 65535]  # -> 0, 1, 255: 128.5 / 257 = 0.5 is the half-up boundary
    rounded = ((wide.astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert rounded[0, 0].tolist() == [0, 1, 255]
    assert encode_jpeg_tensor(torch.from_numpy(wide)) == encode_jpeg_tensor(torch.from_numpy(rounded))


def test_jpeg_tensor_embeds_icc_profiles_pillow_reads_back(photo):
    icc = _srgb_icc()
    im = _pillow(encode_jpeg_tensor(torch.from_numpy(photo), icc_profile=icc))
    data = encode_jpeg_tensor(torch.from_numpy(photo), icc_profile=icc)
    assert data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\x00"  # JFIF's APP0 still right after SOI
    assert im.info["icc_profile"] == icc
    assert _psnr(np.asarray(im), photo) >= 40.0
    big = bytes(np.random.default_rng(0).integers(0, 256, 150_000, dtype=np.uint8))  # three APP2 segments
    data = encode_jpeg_tensor(torch.from_numpy(photo), icc_profile=big)
    assert data.count(b"ICC_PROFILE\x00") == 3 and _pillow(data).info["icc_profile"] == big


@pytest.mark.parametrize(
    ("pixels", "words"),
    [
        (torch.zeros(4, 4, 4, dtype=torch.uint8), "JPEG has no alpha"),
        (torch.zeros(4, 4, 3), "uint8 or uint16"),
        (torch.zeros(3, 4, 4, dtype=torch.int16), "uint8 or uint16"),
        (np.zeros((4, 4, 3), np.uint8), "torch.Tensor"),
    ],
)
def test_jpeg_tensor_refuses(pixels, words):
    with pytest.raises(ConfigError, match=words):
        encode_jpeg_tensor(pixels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_jpeg_tensor_on_cuda_matches_the_cpu_path(photo):
    icc = _srgb_icc()
    cpu = np.asarray(_pillow(encode_jpeg_tensor(torch.from_numpy(photo))))
    im = _pillow(encode_jpeg_tensor(torch.from_numpy(photo).cuda(), quality=95, icc_profile=icc))
    gpu = np.asarray(im)
    assert im.mode == "RGB" and im.info["icc_profile"] == icc
    assert JpegImagePlugin.get_sampling(im) == 0  # nvJPEG: 4:4:4
    assert _psnr(gpu, photo) >= 40.0 and _psnr(gpu, cpu) >= 38.0
    assert np.abs(gpu.reshape(-1, 3).mean(0) - photo.reshape(-1, 3).mean(0)).max() < 1.5
    wide = torch.from_numpy(photo.astype(np.uint16) * 257).cuda()
    assert _psnr(np.asarray(_pillow(encode_jpeg_tensor(wide))), photo) >= 40.0
    grey = _pillow(encode_jpeg_tensor(torch.from_numpy(np.ascontiguousarray(photo[..., :1])).cuda()))
    assert grey.mode == "L" and _psnr(np.asarray(grey), photo[..., 0]) >= 40.0


# ---------------------------------------------------------------------------------------------- the nearest model


@pytest.mark.parametrize("scale", [1, 2, 3, 5, 7])
def test_nearest_module_is_pixel_replication(scale):
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    want = np.repeat(np.repeat(x.numpy(), scale, axis=2), scale, axis=3)
    assert np.array_equal(nearest.Nearest(scale=scale)(x).numpy(), want)
    info = nearest.info({"scale": scale})
    assert (info.scale, info.receptive_halo, info.local, info.tile_hint) == (scale, 0, True, None)
    assert nearest.ARCH.needs_weights is False and nearest.detect({}) is None


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 3])
def test_nearest_through_the_engine_is_exact(dtype, channels):
    rng = np.random.default_rng(1)
    pix = rng.integers(0, np.iinfo(dtype).max + 1, (19, 23, channels), dtype=dtype)
    pix[0, 0], pix[0, 1] = 0, np.iinfo(dtype).max
    up = Upscaler(load_model("nearest", scale=3), device="cpu")
    out = up.upscale_image(DecodedImage(pixels=pix))
    assert out.pixels.dtype == dtype
    assert np.array_equal(out.pixels, np.repeat(np.repeat(pix, 3, axis=0), 3, axis=1))


def test_nearest_needs_a_scale():
    with pytest.raises(ConfigError, match="scale"):
        load_model("nearest")
    with pytest.raises(ConfigError, match="scale"):
        nearest.Nearest(scale=0)
