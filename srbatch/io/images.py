"""Image decoding and encoding with Pillow: bytes in, arrays out, and back.

* **Size limit**: only the header is read before width x height is checked against ``max_pixels`` (default 2**27,
  under Pillow's hard limit); Pillow's own check is bypassed, not reconfigured: no Pillow global is changed.
* **16-bit**: Pillow has no 16-bit colour mode and cuts such PNG/TIFF to 8 bits, so we run its decoder twice, keeping
  each sample's high byte, then its low byte (16-bit grey+alpha PNG: once, unpacked as RGBA bytes). Layouts we cannot
  widen fall back to 8 bits with ``info["downgraded_from"] = "16-bit"``. 16-bit PNG/TIFF are written by hand.
* **Multi-frame** files give their first frame; ``info["n_frames"]`` counts them.
* **CMYK** -> RGB by Pillow's plain formula; the CMYK ICC profile is dropped (``info["icc_dropped"]``).
* **JPEG has no alpha**: dropped on encode (:func:`encode_losses` lists such losses); JPEG/WebP get 8-bit samples.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from srbatch.errors import ConfigError, ImageDecodeError, ImageTooLargeError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 2**27
"""Default decompression-bomb limit on declared width x height (134,217,728 pixels, e.g. 16384 x 8192)."""

SUPPORTED_OUTPUT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "TIFF")
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}
_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".webp": "WEBP",
               ".tif": "TIFF", ".tiff": "TIFF"}

# Rawmodes Pillow uses for 16-bit colour (mode RGB/RGBA keeps one byte per sample) -> the rawmode keeping the other byte.
_SWAP = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}  # N: native order (libtiff)
_OTHER_BYTE = {f"{m};16{k}": f"{m};16{v}" for m in ("RGB", "RGBA", "RGBX") for k, v in _SWAP.items()}
# 16-bit grey+alpha (big-endian L, A) unpacked byte for byte as RGBA: R,G = L high/low, B,A = alpha high/low.
_WIDE_GREY_ALPHA = {"LA;16B": "RGBA"}

# EXIF orientation -> numpy transform, matching PIL.ImageOps.exif_transpose.
_ORIENT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1), 7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: np.rot90(a, 1),
}


@dataclass
class DecodedImage:
    """A decoded image, ready for the engine.

    ``pixels`` is ``(H, W, C)`` with C = 1 (grey) or 3 (RGB), dtype uint8 or uint16 (16-bit sources stay 16-bit).
    ``alpha`` is ``(H, W)`` of the same dtype, or None. EXIF orientation has already been applied.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    mode: str = "RGB"
    """Pillow mode of the source (``RGB``, ``L``, ``I;16``, ``P``, ``CMYK``, ...), for the manifest."""
    format: str | None = None
    """Pillow format of the source (``PNG``, ``JPEG``, ...)."""
    icc_profile: bytes | None = None
    info: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8


# ----------------------------------------------------------------------------------------------------------- decoding


def _open_header(data: bytes) -> Image.Image:
    """``Image.open`` without Pillow's global pixel limit (we apply ours right after): only the header is read."""
    fp = io.BytesIO(data)
    prefix = data[:16]
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            if accept is not None:
                verdict = accept(prefix)
                if not verdict or isinstance(verdict, str):
                    continue
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # as Image.open does: the next plugin may accept it
    raise UnidentifiedImageError("no Pillow plugin recognises the data")


def _too_large(name: str, size: str, max_pixels: int, extra: str = "") -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name}: declares {size}, above the limit of {max_pixels:,} pixels (a guard against decompression bombs); "
        "this format is decoded whole, in memory; if the image is genuine, raise the limit (--max-pixels in the "
        f"upscale job, max_pixels= of decode_image){extra}, or store it as a tiled TIFF, which is read tile by tile"
    )


def decode_image(data: bytes, *, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes (PNG, JPEG, WebP, TIFF, GIF, BMP, ... anything Pillow reads) into a :class:`DecodedImage`.

    * The declared width x height is checked against ``max_pixels`` after reading only the header; too large ->
      :class:`ImageTooLargeError` (a subclass of :class:`ImageDecodeError`), before any pixel is allocated.
    * EXIF orientation is applied (``info["exif_orientation"]`` keeps the original tag); the ICC profile is kept.
    * Modes: ``L``/``1`` -> grey uint8; ``LA``/``La`` -> grey + alpha; ``RGB``; ``RGBA``/``RGBa`` -> RGB + alpha;
      ``P``/``PA`` -> RGB (+ alpha when the palette has transparency); ``L``/``RGB`` with a transparency key -> + alpha;
      ``CMYK``/``YCbCr``/``LAB``/``HSV`` -> RGB (plain conversion, no colour management; a CMYK ICC profile is dropped);
      ``I;16*`` -> grey uint16; ``I`` (32-bit integer) -> grey uint16, clipped to 0..65535 (``info["clipped"]``).
      16-bit RGB(A) PNG/TIFF stay 16-bit (see the module docstring). ``F`` (32-bit float) is refused: its range is
      undefined.
    * Multi-frame files: the first frame; ``info["n_frames"]`` is the frame count.
    * Truncated, empty, unidentifiable or corrupt data -> :class:`ImageDecodeError` naming ``name`` and the cause.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes); re-upload or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = _open_header(data)
            except UnidentifiedImageError:
                brand = data[8:12] if data[4:8] == b"ftyp" else b""
                if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"):
                    kind = "AVIF" if brand.startswith(b"avi") else "HEIC/HEIF"
                    raise ImageDecodeError(
                        f"{name}: a {kind} image (brand {brand.decode()!r}), which this installation cannot decode; "
                        "install the pillow-heif plugin (HEIC) or a Pillow built with AVIF support, or convert it to "
                        "PNG/JPEG"
                    ) from None
                raise ImageDecodeError(
                    f"{name}: not an image or an unsupported format, or a corrupt header ({len(data):,} bytes "
                    f"starting {data[:8]!r}); expected PNG, JPEG, WebP, TIFF, GIF or another format Pillow reads"
                ) from None
            width, height = im.size
            if width * height > max_pixels:
                raise _too_large(name, f"{width} x {height} = {width * height:,} pixels", max_pixels)
            return _decode_opened(im, data, name)
    except Image.DecompressionBombError as e:
        raise _too_large(name, "a frame larger than Pillow's own limit", max_pixels,
                         f" and raise PIL.Image.MAX_IMAGE_PIXELS too ({e})") from None
    except ImageDecodeError:
        raise
    except OSError as e:
        text = str(e)
        cause = "truncated" if "truncat" in text.lower() else "corrupt or unsupported"
        raise ImageDecodeError(f"{name}: {cause} image data ({text}); re-download or re-export the file") from e
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error, zlib.error) as e:
        raise ImageDecodeError(
            f"{name}: corrupt image data ({type(e).__name__}: {e}); re-download or re-export the file"
        ) from e


def _decode_opened(im: Image.Image, data: bytes, name: str) -> DecodedImage:
    n_frames = int(getattr(im, "n_frames", 1) or 1)
    if n_frames > 1:
        im.seek(0)
    source_mode, source_format = im.mode, im.format
    icc = im.info.get("icc_profile") or None
    info: dict = {"n_frames": n_frames}
    rawmodes = [_rawmode(t) for t in im.tile]  # read before anything loads the pixels (PNG's getexif does)
    pixels, alpha = _wide_16bit(im, data, rawmodes)
    if pixels is None:
        if source_mode in ("RGB", "RGBA") and any(r and ";16" in r for r in rawmodes):
            info["downgraded_from"] = "16-bit"
        pixels, alpha = _to_arrays(im, info, name)
    orientation = int(im.getexif().get(0x0112, 1) or 1)
    if source_mode == "CMYK" and icc is not None:
        icc = None
        info["icc_dropped"] = "CMYK profile does not describe the converted RGB pixels"
    if orientation in _ORIENT:
        info["exif_orientation"] = orientation
        pixels = np.ascontiguousarray(_ORIENT[orientation](pixels))
        alpha = None if alpha is None else np.ascontiguousarray(_ORIENT[orientation](alpha))
    return DecodedImage(pixels=pixels, alpha=alpha, mode=source_mode, format=source_format, icc_profile=icc, info=info)


def _rawmode(tile: tuple) -> str | None:
    """The rawmode in a tile's args (a string for PNG, the first item for TIFF); tiles are (codec, box, offset, args)."""
    args = tile[3] if len(tile) > 3 else None
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else None


def _with_rawmode(tile: tuple, rawmode: str) -> tuple:
    args = rawmode if isinstance(tile[3], str) else (rawmode, *tile[3][1:])
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)  # Pillow < 11: plain tuples


def _wide_16bit(im: Image.Image, data: bytes, rawmodes: list) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Full 16-bit samples of a colour or grey+alpha image that Pillow would cut to 8 bits, or (None, None)."""
    if im.mode not in ("RGB", "RGBA") or not rawmodes:
        return None, None
    if all(r in _WIDE_GREY_ALPHA for r in rawmodes):  # 16-bit grey + alpha PNG: one pass, bytes kept
        im.tile = [_with_rawmode(t, _WIDE_GREY_ALPHA[r]) for t, r in zip(im.tile, rawmodes)]
        b = np.asarray(im).astype(np.uint16)
        return ((b[..., 0] << 8) | b[..., 1])[..., None], (b[..., 2] << 8) | b[..., 3]
    if not all(r in _OTHER_BYTE for r in rawmodes):
        return None, None
    high = np.asarray(im).astype(np.uint16)
    again = _open_header(data)  # second pass through the same decoder, keeping the other byte of each sample
    again.tile = [_with_rawmode(t, _OTHER_BYTE[r]) for t, r in zip(again.tile, rawmodes)]
    both = (high << 8) | np.asarray(again).astype(np.uint16)
    if im.mode == "RGBA":
        return np.ascontiguousarray(both[..., :3]), np.ascontiguousarray(both[..., 3])
    return both, None


def _to_arrays(im: Image.Image, info: dict, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    has_key = "transparency" in im.info
    if mode == "F":
        raise ImageDecodeError(
            f"{name}: 32-bit floating-point images are not supported (their value range is undefined); "
            "convert the file to 8- or 16-bit integer"
        )
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)[..., None], None
    if mode == "I":
        arr = np.asarray(im)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            info["clipped"] = "32-bit integer values clipped to 0..65535"
        return np.clip(arr, 0, 65535).astype(np.uint16)[..., None], None
    targets = {"P": "RGBA" if has_key else "RGB", "PA": "RGBA", "1": "L", "L": "LA" if has_key else "L", "LA": "LA",
               "La": "LA", "RGBA": "RGBA", "RGBa": "RGBA", "RGB": "RGBA" if has_key else "RGB"}
    target = targets.get(mode, "RGB")  # CMYK, YCbCr, LAB, HSV, RGBX ... -> RGB
    arr = np.asarray(im if mode == target else im.convert(target))
    if target in ("L", "RGB"):
        return arr.reshape(arr.shape[0], arr.shape[1], -1).copy(), None
    return np.ascontiguousarray(arr[..., :-1]), np.ascontiguousarray(arr[..., -1])


# ----------------------------------------------------------------------------------------------------------- encoding


def normalize_format(format: str) -> str:
    """Canonical Pillow name of an output format: case-insensitive, ``jpg`` -> ``JPEG``, ``tif`` -> ``TIFF``.

    Raises :class:`ConfigError` listing :data:`SUPPORTED_OUTPUT_FORMATS` for anything else.
    """
    key = str(format).strip().upper().lstrip(".")
    key = _FORMAT_ALIASES.get(key, key)
    if key not in SUPPORTED_OUTPUT_FORMATS:
        raise ConfigError(
            f"unsupported output format {format!r}; expected one of {', '.join(SUPPORTED_OUTPUT_FORMATS)} "
            f"(case-insensitive; 'jpg' and 'tif' are accepted too)"
        )
    return key


def format_from_name(path: str) -> str:
    """Output format for a file name or object key by its extension (``out/a.JPG`` -> ``JPEG``).

    Raises :class:`ConfigError` when the extension is missing or not one of the supported ones.
    """
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in _EXTENSIONS:
        raise ConfigError(
            f"cannot tell the image format of {path!r} from its extension {ext or '(none)'!r}; "
            f"use one of {', '.join(sorted(_EXTENSIONS))} or pass the format explicitly"
        )
    return _EXTENSIONS[ext]


def encode_losses(img: DecodedImage, format: str) -> list[str]:
    """What :func:`encode_image` will have to drop to write ``img`` as ``format`` (empty when nothing), for manifests."""
    fmt = normalize_format(format)
    losses = []
    if fmt == "JPEG" and img.alpha is not None:
        losses.append("alpha dropped (JPEG has no alpha channel)")
    if fmt in ("JPEG", "WEBP") and img.bit_depth == 16:
        losses.append(f"16-bit rounded to 8-bit ({fmt} holds 8 bits per sample)")
    if fmt == "TIFF" and img.bit_depth == 16 and img.channels == 1 and img.alpha is not None:
        losses.append("16-bit grey+alpha stored as RGBA (Pillow cannot read 16-bit grey+alpha TIFF)")
    if fmt == "WEBP" and img.channels == 1:
        losses.append("grey stored as RGB (WebP has no grey mode)")
    return losses


def encode_image(img: DecodedImage, *, format: str = "PNG", quality: int | None = None, lossless: bool = False,
                 compress_level: int = 6) -> bytes:
    """Encode a :class:`DecodedImage` as PNG, JPEG, WebP or TIFF and return the file's bytes.

    * ``format`` is case-insensitive with aliases ``jpg``/``tif``; anything else -> :class:`ConfigError`.
    * Grey stays grey (except WebP, which has no grey mode and stores RGB, and 16-bit grey+alpha TIFF, stored as
      RGBA because Pillow cannot read that layout back); alpha is re-attached (LA/RGBA), except
      for JPEG, which cannot hold it: alpha is dropped (:func:`encode_losses` reports it).
    * 16-bit stays 16-bit in PNG and TIFF (16-bit files are written by hand with zlib + struct, deflate-compressed,
      because Pillow cannot write 16-bit colour); JPEG and WebP get 8-bit samples rounded half-up (``(x + 128) // 257``).
    * The ICC profile is embedded in every format.
    * ``quality`` (1..100) applies to JPEG (default 95, chroma not subsampled) and lossy WebP (default 95); it is
      ignored by the lossless PNG and TIFF. ``lossless=True`` selects lossless WebP (RGB under transparent pixels
      kept exactly) and is refused for JPEG. ``compress_level`` (0..9) is the zlib level of PNG and 16-bit TIFF.
    """
    fmt = normalize_format(format)
    if quality is not None and not 1 <= int(quality) <= 100:
        raise ConfigError(f"quality must be between 1 and 100; got {quality}")
    if not 0 <= int(compress_level) <= 9:
        raise ConfigError(f"compress_level must be between 0 and 9; got {compress_level}")
    if lossless and fmt == "JPEG":
        raise ConfigError("JPEG has no lossless mode; use format='PNG', 'WEBP' (with lossless=True) or 'TIFF'")
    pixels, alpha = img.pixels, img.alpha
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or pixels.dtype not in (np.uint8, np.uint16):
        raise ConfigError(f"expected pixels of shape (H, W, 1 or 3) and dtype uint8/uint16; got "
                          f"{pixels.shape} {pixels.dtype}")
    if fmt == "JPEG":
        alpha = None
    if alpha is not None and (alpha.shape != pixels.shape[:2] or alpha.dtype != pixels.dtype):
        raise ConfigError(f"alpha must be {pixels.shape[:2]} {pixels.dtype}; got {alpha.shape} {alpha.dtype}")
    icc = img.icc_profile or None
    if pixels.dtype == np.uint16 and fmt in ("PNG", "TIFF"):
        if fmt == "TIFF" and alpha is not None and pixels.shape[2] == 1:
            pixels = np.repeat(pixels, 3, axis=2)  # Pillow (so decode_image) cannot read 16-bit grey+alpha TIFF
        samples = pixels if alpha is None else np.concatenate([pixels, alpha[..., None]], axis=2)
        writer = _png16 if fmt == "PNG" else _tiff16
        return writer(samples, alpha is not None, icc, int(compress_level))
    if pixels.dtype == np.uint16:
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
        alpha = None if alpha is None else ((alpha.astype(np.uint32) + 128) // 257).astype(np.uint8)
    arr = pixels if pixels.shape[2] == 3 else pixels[..., 0]
    pil = Image.fromarray(np.ascontiguousarray(arr), "RGB" if pixels.shape[2] == 3 else "L")
    if alpha is not None:
        pil.putalpha(Image.fromarray(np.ascontiguousarray(alpha), "L"))
    options: dict = {"icc_profile": icc} if icc else {}
    if fmt == "PNG":
        options["compress_level"] = int(compress_level)
    elif fmt == "JPEG":
        options.update(quality=int(quality or 95), subsampling=0)
    elif fmt == "WEBP":
        options.update(quality=int(quality or 95), lossless=bool(lossless), exact=bool(lossless), method=4)
    else:
        options["compression"] = "tiff_adobe_deflate"
    out = io.BytesIO()
    pil.save(out, fmt, **options)
    return out.getvalue()


# ------------------------------------------------------------------------------------ JPEG from a tensor (nvJPEG)

_ICC_SIGNATURE = b"ICC_PROFILE\x00"
_ICC_CHUNK = 65519  # 65535 (segment length field) - 2 (the field itself) - 12 (signature) - 2 (sequence, count)


def encode_jpeg_tensor(pixels: torch.Tensor, *, quality: int = 95, icc_profile: bytes | None = None) -> bytes:
    """Encode ``pixels``, a ``torch.Tensor`` ``(H, W, C)`` (C = 1 grey or 3 RGB) of uint8 or uint16 on any device,
    as a baseline JPEG with ``torchvision.io.encode_jpeg`` and return the file's bytes (on the host).

    * CUDA tensors are encoded by nvJPEG on the GPU, chroma not subsampled (4:4:4, as :func:`encode_image`'s Pillow
      path); CPU tensors by libjpeg inside torchvision, with libjpeg's default 4:2:0 chroma subsampling. nvJPEG
      (through torchvision) takes 3 channels only: a grey CUDA tensor is copied to the host (H x W bytes) and
      encoded there as 1-channel JPEG, so grey stays grey whichever the device.
    * uint16 is rounded to 8 bits half-up, ``(x + 128) // 257`` (as :func:`encode_image` does), on the tensor's
      device; other dtypes and channel counts (alpha included: JPEG has none) are a :class:`ConfigError`.
    * ``icc_profile`` is embedded as APP2 ``ICC_PROFILE`` segments (at most 65,519 bytes of profile each, up to 255
      of them) after the JFIF header, since torchvision writes none.
    """
    import torch

    if not isinstance(pixels, torch.Tensor):
        raise ConfigError(f"encode_jpeg_tensor takes a torch.Tensor (H, W, C); got {type(pixels).__name__}")
    if not 1 <= int(quality) <= 100:
        raise ConfigError(f"quality must be between 1 and 100; got {quality}")
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3) or pixels.dtype not in (torch.uint8, torch.uint16):
        raise ConfigError(
            f"encode_jpeg_tensor expects a tensor (H, W, 1 or 3) of uint8 or uint16 (JPEG has no alpha: drop it "
            f"first); got {tuple(pixels.shape)} {pixels.dtype}"
        )
    if pixels.shape[0] < 1 or pixels.shape[1] < 1 or max(pixels.shape[0], pixels.shape[1]) > 65535:
        raise ConfigError(f"encode_jpeg_tensor: JPEG sides are 1 .. 65535 pixels; got {tuple(pixels.shape[:2])}")
    if icc_profile and len(icc_profile) > 255 * _ICC_CHUNK:
        raise ConfigError(f"ICC profile of {len(icc_profile):,} bytes does not fit in 255 JPEG APP2 segments "
                          f"({255 * _ICC_CHUNK:,} bytes at most)")
    if pixels.dtype == torch.uint16:
        pixels = ((pixels.to(torch.int32) + 128) // 257).to(torch.uint8)
    if pixels.shape[2] == 1 and pixels.device.type != "cpu":
        pixels = pixels.cpu()  # torchvision's nvJPEG path takes RGB only
    chw = pixels.permute(2, 0, 1).contiguous()
    from torchvision.io import encode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 points to TorchCodec on every call
        encoded = encode_jpeg(chw, quality=int(quality))
    data = encoded.cpu().numpy().tobytes()
    return _with_icc(data, icc_profile) if icc_profile else data


def _with_icc(jpeg: bytes, icc: bytes) -> bytes:
    """``jpeg`` with ``icc`` inserted as APP2 ICC_PROFILE segments after SOI and any APP0 (JFIF/JFXX) segments."""
    if jpeg[:2] != b"\xff\xd8":
        raise ConfigError(f"not a JPEG stream (starts {jpeg[:4]!r}); cannot embed the ICC profile")
    at = 2
    while jpeg[at:at + 2] == b"\xff\xe0":  # JFIF wants its APP0 right after SOI
        at += 2 + struct.unpack(">H", jpeg[at + 2:at + 4])[0]
    pieces = [icc[i:i + _ICC_CHUNK] for i in range(0, len(icc), _ICC_CHUNK)]
    segments = b"".join(
        b"\xff\xe2" + struct.pack(">H", 2 + len(_ICC_SIGNATURE) + 2 + len(p)) + _ICC_SIGNATURE
        + bytes((n, len(pieces))) + p
        for n, p in enumerate(pieces, start=1)
    )
    return jpeg[:at] + segments + jpeg[at:]


def _png16(samples: np.ndarray, has_alpha: bool, icc: bytes | None, level: int) -> bytes:
    """A 16-bit PNG (colour type 0/4/2/6), rows with the 'Up' filter, optional iCCP chunk."""
    h, w, s = samples.shape
    colour_type = {(1, False): 0, (1, True): 4, (3, False): 2, (3, True): 6}[(s - has_alpha, has_alpha)]
    rows = samples.astype(">u2").reshape(h, w * s).view(np.uint8)
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 arithmetic wraps modulo 256, as the filter wants
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))]
    if icc:
        parts.append(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    parts += [chunk(b"IDAT", zlib.compress(raw.tobytes(), level)), chunk(b"IEND", b"")]
    return b"".join(parts)


def _tiff16(samples: np.ndarray, has_alpha: bool, icc: bytes | None, level: int) -> bytes:
    """A little-endian, single-strip, deflate-compressed 16-bit TIFF (grey or RGB, optional unassociated alpha)."""
    h, w, s = samples.shape
    strip = zlib.compress(samples.astype("<u2").tobytes(), level)
    short, long_, undefined = 3, 4, 7
    fields: list[tuple[int, int, list[int] | bytes]] = [
        (256, long_, [w]), (257, long_, [h]), (258, short, [16] * s), (259, short, [8]),
        (262, short, [1 if s - has_alpha == 1 else 2]), (273, long_, [0]), (277, short, [s]), (278, long_, [h]),
        (279, long_, [len(strip)]), (284, short, [1]),
    ]
    if has_alpha:
        fields.append((338, short, [2]))
    if icc:
        fields.append((34675, undefined, icc))
    packed = [v if isinstance(v, bytes) else struct.pack(f"<{len(v)}{'H' if t == short else 'I'}", *v)
              for _, t, v in fields]
    extra_start = 8 + 2 + 12 * len(fields) + 4
    extra_size = sum(len(p) + len(p) % 2 for p in packed if len(p) > 4)
    strip_offset = extra_start + extra_size
    entries, extra = [], bytearray()
    for (tag, kind, value), body in zip(fields, packed):
        if tag == 273:
            body = struct.pack("<I", strip_offset)
        head = struct.pack("<HHI", tag, kind, len(value))
        if len(body) <= 4:
            entries.append(head + body.ljust(4, b"\x00"))
        else:
            entries.append(head + struct.pack("<I", extra_start + len(extra)))
            extra += body + b"\x00" * (len(body) % 2)
    ifd = struct.pack("<H", len(fields)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(extra) + strip


# -------------------------------------------------------------------------------------------------------- conversions


def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 -> ``x / 255``, uint16 -> ``x / 65535``, as float32 in [0, 1]. Other dtypes -> :class:`ConfigError`."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(65535)
    raise ConfigError(f"to_float takes uint8 or uint16 arrays; got {arr.dtype}")


def from_float(arr: np.ndarray, dtype: np.dtype | type | str) -> np.ndarray:
    """Float in [0, 1] -> uint8/uint16: clip to [0, 1], then ``floor(x * max + 0.5)`` (half-up, as MATLAB's
    ``im2uint8``). NaN becomes 0. ``from_float(to_float(a), a.dtype)`` returns ``a`` exactly."""
    target = np.dtype(dtype)
    if target not in (np.uint8, np.uint16):
        raise ConfigError(f"from_float converts to uint8 or uint16; got {target}")
    peak = 255.0 if target == np.uint8 else 65535.0
    x = np.nan_to_num(np.asarray(arr, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.floor(np.clip(x, 0.0, 1.0) * np.float32(peak) + np.float32(0.5)).astype(target)
