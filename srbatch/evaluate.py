"""Evaluation in the paper convention: pair HR/LR images, upscale, measure PSNR/SSIM, report.

Two options change what is measured, and every result records them (JSON, Parquet, the printed convention):
``grey_as_rgb`` (grey images measured as they are, as the MATLAB benchmark tables do, or converted to RGB first, as
test scripts reading every image with OpenCV as 3-channel do) and ``noise_sigma`` (seeded Gaussian noise on the LR,
measured against the clean HR: the denoising comparison).

``srbatch evaluate`` is a thin wrapper over :func:`evaluate`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from srbatch.errors import ConfigError
from srbatch.io.images import decode_image
from srbatch.io.storage import list_images, read_bytes, write_bytes
from srbatch.metrics.quality import Measurement, measure, psnr, ssim
from srbatch.metrics.resize import imresize_uint8
from srbatch.models.descriptor import ModelDescriptor

log = logging.getLogger("srbatch.evaluate")

_TOKEN = re.compile(r"(^|[_\-. ])(HR|LR)(?=$|[_\-. ])", re.IGNORECASE)

CONVENTION = (
    "Y of MATLAB rgb2ycbcr for RGB, grey as is; crop_border pixels shaved; PSNR peak = data range; "
    "SSIM Gaussian 11x11 sigma 1.5 (Wang et al.); LR made with MATLAB bicubic when not given"
)
"""The measuring convention with the defaults (grey images as they are, no noise); :func:`describe_convention` gives
it for other options."""
GREY_AS_IS = "grey as is"
GREY_AS_RGB = "grey images converted to RGB first (HR and LR replicated to 3 channels, as OpenCV's 3-channel read)"
NOISE_RULE = (
    "Gaussian noise of sigma {sigma:g} (0..255 units) added to the LR, seed = first 8 bytes of sha256(image key) "
    "little-endian, numpy default_rng(seed).standard_normal((H, W, C)), rounded and clipped; measured against the "
    "clean HR"
)


def describe_convention(grey_as_rgb: bool = False, noise_sigma: float = 0.0, lpips_net: str | None = None) -> str:
    """The measuring convention in words, for table footers, JSON and reports: :data:`CONVENTION` with how grey images
    are measured (``grey_as_rgb``), the noise added to the LR (``noise_sigma`` > 0, see :func:`add_noise`) and, with
    ``lpips_net`` (alex or vgg), how LPIPS is measured (:data:`srbatch.metrics.lpips.CONVENTION`)."""
    text = CONVENTION if not grey_as_rgb else CONVENTION.replace(GREY_AS_IS, GREY_AS_RGB)
    if noise_sigma:
        text += "; " + NOISE_RULE.format(sigma=noise_sigma)
    if lpips_net:
        from srbatch.metrics.lpips import CONVENTION as LPIPS_CONVENTION

        text += "; " + LPIPS_CONVENTION.format(net=lpips_net)
    return text


def check_noise_sigma(noise_sigma: float) -> float:
    """``noise_sigma`` as a float when it is finite and >= 0; otherwise a :class:`ConfigError` saying so."""
    try:
        s = float(noise_sigma)
    except (TypeError, ValueError):
        raise ConfigError(f"noise_sigma must be a number >= 0 (0..255 units); got {noise_sigma!r}") from None
    if not math.isfinite(s) or s < 0:
        raise ConfigError(f"noise_sigma must be finite and >= 0 (0..255 units, e.g. 25); got {noise_sigma!r}")
    return s


def noise_seed(key: str) -> int:
    """The seed of an image's noise: the first 8 bytes of ``sha256(key.encode("utf-8"))`` as a little-endian unsigned
    integer. ``key`` is the image's pairing key (:func:`pair_key`), so every model and every rerun get the same
    noise."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def add_noise(pixels: np.ndarray, sigma: float, key: str) -> np.ndarray:
    """``pixels`` (HWC, uint8 or uint16) plus Gaussian noise of standard deviation ``sigma`` in 0..255 units (scaled
    by 65535/255 for 16-bit), drawn as ``numpy.random.default_rng(noise_seed(key)).standard_normal(pixels.shape)``,
    rounded half to even (``numpy.rint``) and clipped to the dtype's range. A new array; ``sigma == 0`` returns
    ``pixels`` itself. Each channel gets its own noise."""
    sigma = check_noise_sigma(sigma)
    if sigma == 0:
        return pixels
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ConfigError(f"noise is added to 8- or 16-bit images; got {pixels.dtype}")
    peak = float(np.iinfo(pixels.dtype).max)
    z = np.random.default_rng(noise_seed(key)).standard_normal(pixels.shape)
    noisy = pixels.astype(np.float64) + z * (sigma * peak / 255.0)
    return np.clip(np.rint(noisy), 0, peak).astype(pixels.dtype)


def is_grey(*images: Any) -> bool:
    """Whether any of the decoded images (None skipped) is a one-channel (grey) image, alpha aside."""
    return any(img is not None and img.channels == 1 for img in images)


def _as_rgb(img: Any) -> Any:
    """A one-channel decoded image replicated to 3 channels (mode ``RGB``); others unchanged."""
    if img is None or img.channels != 1:
        return img
    return replace(img, pixels=np.repeat(img.pixels, 3, axis=2), mode="RGB")


PRECISION_MODES = ("auto", "uint8", "float")


def resolve_precision(precision: str, desc: ModelDescriptor) -> str:
    """The measuring pipeline for ``desc`` at ``precision`` (one of :data:`PRECISION_MODES`): ``auto`` is ``float``
    for Y-channel models (their own float Y output, as their authors measured) and ``uint8`` for the rest."""
    if precision not in PRECISION_MODES:
        raise ConfigError(f"precision must be one of {PRECISION_MODES}; got {precision!r}")
    if precision != "auto":
        return precision
    return "float" if desc.color_space == "Y" else "uint8"
"""How the SR output is measured. ``uint8``: the SR image rounded to its bit depth, Y rounded as MATLAB does for uint8
(the SelfExSR/MATLAB benchmark pipeline). ``float``: Y-channel models are measured on their own float Y output against
the float Y of HR, nothing rounded (the pipeline of the Y-only PyTorch releases such as twtygqyy's VDSR). ``auto``:
``float`` for models that work on the Y channel alone, ``uint8`` for every other model."""


def pair_key(uri: str) -> str:
    """The name an image is paired by: its file stem with the tokens ``HR`` / ``LR`` removed."""
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    return _TOKEN.sub("", stem).strip("_-. ") or stem


def _has_token(uri: str, token: str) -> bool:
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    return any(m.group(2).upper() == token for m in _TOKEN.finditer(stem))


def pair_images(hr_uris: Sequence[str], lr_uris: Sequence[str] | None) -> list[tuple[str, str, str | None]]:
    """``(key, hr_uri, lr_uri)`` triples. With ``lr_uris``, every file must find its partner.

    When a listing contains files tagged ``HR`` (or ``LR``), only the tagged ones are taken from it, so one folder
    holding ``*_HR.png`` and ``*_LR.png`` can serve as both. Unmatched files raise a :class:`ConfigError` listing them.
    """
    hr = [u for u in hr_uris if _has_token(u, "HR")] or [u for u in hr_uris if not _has_token(u, "LR")]
    if lr_uris is None:
        keys = [pair_key(u) for u in hr]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ConfigError(f"several HR images share the names {dup}; give each image a unique name")
        return [(pair_key(u), u, None) for u in hr]
    lr = [u for u in lr_uris if _has_token(u, "LR")] or [u for u in lr_uris if not _has_token(u, "HR")]
    hr_by = {pair_key(u): u for u in hr}
    lr_by = {pair_key(u): u for u in lr}
    only_hr = sorted(hr_by[k] for k in set(hr_by) - set(lr_by))
    only_lr = sorted(lr_by[k] for k in set(lr_by) - set(hr_by))
    if only_hr or only_lr:
        raise ConfigError(
            "HR and LR images do not pair up (names are compared with the tokens HR/LR removed). "
            f"HR without LR: {only_hr or 'none'}; LR without HR: {only_lr or 'none'}. "
            "Rename them, or drop --lr to make LR images from HR with MATLAB bicubic."
        )
    return [(k, hr_by[k], lr_by[k]) for k in sorted(hr_by)]


@dataclass
class EvalRow:
    """Figures of one image."""

    image: str
    hr_uri: str
    lr_uri: str | None
    height: int
    width: int
    channels: int
    psnr_y: float
    ssim_y: float
    psnr_rgb: float
    ssim_rgb: float
    seconds: float
    grey: bool = False
    """The image (HR or LR) was grey (one channel): the rows ``grey_as_rgb`` changes."""
    lpips: float | None = None
    """LPIPS of the SR image against the HR (lower is better); None without ``lpips_weights``."""


@dataclass
class EvalResult:
    """Figures of a whole evaluation: means over images (mean of per-image PSNR) and the per-image rows."""

    model: str
    architecture: str
    scale: int
    n_images: int
    psnr_y: float
    ssim_y: float
    psnr_rgb: float
    ssim_rgb: float
    crop_border: int
    seconds: float
    device: str
    precision: str = "uint8"
    rows: list[EvalRow] = field(default_factory=list)
    convention: str = CONVENTION
    grey_as_rgb: bool = False
    """Grey images converted to RGB before the model and the measuring (else measured as they are)."""
    noise_sigma: float = 0.0
    """Standard deviation (0..255 units) of the Gaussian noise added to each LR (see :func:`add_noise`)."""
    lpips: float | None = None
    """Mean LPIPS over images (lower is better); None without ``lpips_weights``."""
    lpips_net: str | None = None
    """The LPIPS trunk (alex or vgg) of the weights file; None without ``lpips_weights``."""

    @property
    def n_grey(self) -> int:
        """Images that were grey."""
        return sum(r.grey for r in self.rows)

    def summary(self) -> dict[str, Any]:
        """The JSON object printed by ``srbatch evaluate --json`` (without per-image rows)."""
        d = asdict(self)
        d["images"] = [{"image": r.image, "psnr_y": r.psnr_y, "ssim_y": r.ssim_y, "grey": r.grey}
                       | ({"lpips": r.lpips} if self.lpips_net else {}) for r in self.rows]
        d["n_grey"] = self.n_grey
        d.pop("rows")
        return d

    def table(self) -> str:
        """A plain-text table, one line per image and the mean."""
        lp = self.lpips_net is not None
        head = f"{'image':<28} {'size':>11} {'PSNR_Y':>8} {'SSIM_Y':>7} {'PSNR_RGB':>9} {'SSIM_RGB':>9}" + (
            f" {'LPIPS':>7}" if lp else ""
        )
        lines = [f"model {self.model} ({self.architecture}) x{self.scale} on {self.device}", head, "-" * len(head)]
        for r in self.rows:
            size = f"{r.width}x{r.height}"
            lines.append(
                f"{r.image[:28]:<28} {size:>11} {r.psnr_y:8.3f} {r.ssim_y:7.4f} {r.psnr_rgb:9.3f} {r.ssim_rgb:9.4f}"
                + (f" {_num(r.lpips, 7, 4)}" if lp else "")
                + ("  grey" if r.grey else "")
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'mean (' + str(self.n_images) + ' images)':<28} {'':>11} {self.psnr_y:8.3f} {self.ssim_y:7.4f} "
            f"{self.psnr_rgb:9.3f} {self.ssim_rgb:9.4f}" + (f" {_num(self.lpips, 7, 4)}" if lp else "")
        )
        lines.append(
            f"convention: crop_border={self.crop_border}; precision={self.precision}; grey_as_rgb={self.grey_as_rgb}; "
            f"noise_sigma={self.noise_sigma:g}; {self.convention}"
        )
        if self.n_grey:
            how = "converted to RGB (--grey-as-rgb)" if self.grey_as_rgb else "measured as they are (no --grey-as-rgb)"
            lines.append(f"grey images: {self.n_grey} of {self.n_images} (marked grey), {how}")
        return "\n".join(lines)


def _num(v: float | None, w: int, p: int) -> str:
    return f"{v:{w}.{p}f}" if v is not None else f"{'-':>{w}}"


def _modcrop(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return img[:h, :w, ...]


def reference_pair(
    hr_img: Any,
    lr_img: Any | None,
    scale: int,
    *,
    name: str,
    hr_uri: str = "",
    lr_uri: str | None = None,
    grey_as_rgb: bool = False,
    noise_sigma: float = 0.0,
) -> tuple[Any, np.ndarray]:
    """The (LR image, HR pixels) pair measured in the paper convention.

    Without ``lr_img`` the HR is cropped to a multiple of ``scale`` and downscaled with MATLAB bicubic; with it, the HR
    must be ``scale`` x the LR (a larger HR by less than ``scale`` pixels is cropped, as benchmark HR files often are).
    Alpha is dropped. Raises :class:`ConfigError` naming the files when sizes or channels do not match.

    ``grey_as_rgb``: a grey HR and a grey LR are first replicated to 3 channels (so the LR made from the HR is too), as
    test scripts that read every image with OpenCV as 3-channel do. ``noise_sigma`` > 0: the LR (made or given) gets
    :func:`add_noise` with the seed of ``name`` (the image's pairing key); the HR stays clean.
    """
    sigma = check_noise_sigma(noise_sigma)
    if grey_as_rgb:
        hr_img, lr_img = _as_rgb(hr_img), _as_rgb(lr_img)
    if lr_img is None:
        h, w = (hr_img.height // scale) * scale, (hr_img.width // scale) * scale
        if h < scale or w < scale:
            raise ConfigError(f"{hr_uri or name} is {hr_img.width}x{hr_img.height}: smaller than the scale {scale}")
        hr_px = _modcrop(hr_img.pixels, h, w)
        lr_img = type(hr_img)(pixels=imresize_uint8(hr_px, 1.0 / scale) if scale > 1 else hr_px, mode=hr_img.mode)
    else:
        h, w = lr_img.height * scale, lr_img.width * scale
        if hr_img.height < h or hr_img.width < w or hr_img.height - h >= scale or hr_img.width - w >= scale:
            raise ConfigError(
                f"{hr_uri} is {hr_img.width}x{hr_img.height} but its LR {lr_uri} is "
                f"{lr_img.width}x{lr_img.height}: at x{scale} the HR should be {w}x{h}; check --scale and the pairing"
            )
        hr_px = _modcrop(hr_img.pixels, h, w)
    if lr_img.channels != hr_px.shape[2]:
        raise ConfigError(
            f"{name}: LR has {lr_img.channels} channels but HR has {hr_px.shape[2]}"
            + ("" if grey_as_rgb else "; --grey-as-rgb reads grey images as RGB")
        )
    lr_img.alpha = None
    if sigma:
        lr_img = replace(lr_img, pixels=add_noise(lr_img.pixels, sigma, name))
    return lr_img, hr_px


def paper_model(desc: ModelDescriptor) -> ModelDescriptor:
    """``desc``, except that the bicubic model becomes the float64 MATLAB-exact one (the paper convention's bicubic;
    the jobs run the fast float32 one, which differs by one level on about 1e-5 of the samples)."""
    from srbatch.models.loader import build_model

    if desc.architecture == "bicubic" and not desc.hparams.get("exact"):
        exact = build_model("bicubic", **{**desc.hparams, "exact": True})
        return replace(desc, module=exact.module, hparams=exact.hparams)
    return desc


def evaluate(
    model: str | ModelDescriptor,
    *,
    scale: int,
    hr: str,
    lr: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    device: str = "auto",
    dtype: str = "float32",
    tile: int | None = 0,
    crop_border: int | None = None,
    self_ensemble: bool = False,
    precision: str = "auto",
    progress: Callable[[EvalRow], None] | None = None,
    grey_as_rgb: bool = False,
    noise_sigma: float = 0.0,
    lpips_weights: str | None = None,
) -> EvalResult:
    """Evaluate ``model`` at ``scale`` on the HR images named by ``hr`` (folder, glob or URI).

    Without ``lr``, each HR image is cropped to a multiple of ``scale`` and downscaled with MATLAB bicubic. With ``lr``,
    images pair by name (see :func:`pair_images`) and each HR image must be ``scale`` x its LR (a larger HR is cropped
    to it, as benchmark HR files often are). ``crop_border`` defaults to ``scale`` (the paper convention).
    ``precision`` is one of :data:`PRECISION_MODES`.

    ``grey_as_rgb`` (off: a grey image is measured as it is, the MATLAB benchmark tables): grey HR and LR images are
    replicated to 3 channels before the model and the measuring, so their Y is MATLAB ``rgb2ycbcr`` of grey RGB
    (16..235), as test scripts that read every image with OpenCV as 3-channel do. ``noise_sigma`` > 0: Gaussian noise
    (0..255 units, seeded by the image's key, see :func:`add_noise`) is added to each LR, measured against the clean HR.
    ``lpips_weights``: an LPIPS weights file (path or URI, see :mod:`srbatch.metrics.lpips`); each row then has
    ``lpips``, measured on the RGB SR image (the 8/16-bit image the model wrote) against the HR, with ``crop_border``
    shaved as for PSNR, grey images replicated to RGB.
    """
    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.models.loader import load_model

    if scale < 1:
        raise ConfigError(f"scale must be >= 1; got {scale}")
    sigma = check_noise_sigma(noise_sigma)
    desc = paper_model(model if isinstance(model, ModelDescriptor) else load_model(model, scale=scale))
    if desc.scale != scale:
        raise ConfigError(f"model {desc.name} is x{desc.scale}; evaluate it with --scale {desc.scale}")
    border = scale if crop_border is None else int(crop_border)
    mode = resolve_precision(precision, desc)
    pairs = pair_images(
        list_images(hr, storage_options), list_images(lr, storage_options) if lr is not None else None
    )
    up = Upscaler(desc, device=device, dtype=dtype, tiling=TilingConfig(tile=tile), self_ensemble=self_ensemble)
    lp = None
    if lpips_weights:
        from srbatch.metrics.lpips import load_lpips, lpips_distance

        lp = load_lpips(lpips_weights, storage_options=storage_options, device=up.device)
    rows: list[EvalRow] = []
    t_all = time.perf_counter()
    for key, hr_uri, lr_uri in pairs:
        hr_img = decode_image(read_bytes(hr_uri, storage_options), name=hr_uri)
        lr_given = decode_image(read_bytes(lr_uri, storage_options), name=lr_uri) if lr_uri is not None else None
        grey = is_grey(hr_img, lr_given)
        lr_img, hr_px = reference_pair(hr_img, lr_given, scale, name=key, hr_uri=hr_uri, lr_uri=lr_uri,
                                       grey_as_rgb=grey_as_rgb, noise_sigma=sigma)  # fmt: skip
        h, w = hr_px.shape[:2]
        t0 = time.perf_counter()
        m, sr, _ = upscale_and_measure(up, lr_img, hr_px, border=border, precision=mode)
        secs = time.perf_counter() - t0
        lp_value = lpips_distance(lp, sr, hr_px, crop_border=border) if lp is not None else None
        row = EvalRow(
            image=key,
            hr_uri=hr_uri,
            lr_uri=lr_uri,
            height=h,
            width=w,
            channels=int(hr_px.shape[2]),
            psnr_y=m.psnr_y,
            ssim_y=m.ssim_y,
            psnr_rgb=m.psnr_rgb,
            ssim_rgb=m.ssim_rgb,
            seconds=secs,
            grey=grey,
            lpips=lp_value,
        )
        rows.append(row)
        if progress is not None:
            progress(row)
    n = len(rows)
    return EvalResult(
        model=desc.name,
        architecture=desc.architecture,
        scale=scale,
        n_images=n,
        psnr_y=float(np.mean([r.psnr_y for r in rows])),
        ssim_y=float(np.mean([r.ssim_y for r in rows])),
        psnr_rgb=float(np.mean([r.psnr_rgb for r in rows])),
        ssim_rgb=float(np.mean([r.ssim_rgb for r in rows])),
        crop_border=border,
        seconds=time.perf_counter() - t_all,
        device=str(up.device),
        precision=mode,
        rows=rows,
        convention=describe_convention(grey_as_rgb, sigma, lp.net if lp is not None else None),
        grey_as_rgb=bool(grey_as_rgb),
        noise_sigma=sigma,
        lpips=float(np.mean([r.lpips for r in rows])) if lp is not None and rows else None,
        lpips_net=lp.net if lp is not None else None,
    )


def upscale_and_measure(
    up: Any, lr_img: Any, hr: np.ndarray, *, border: int, precision: str = "auto"
) -> tuple[Measurement, np.ndarray, float]:
    """Upscale ``lr_img`` (a :class:`~srbatch.io.images.DecodedImage` without alpha) with the
    :class:`~srbatch.inference.Upscaler` ``up`` and measure it against ``hr`` (same size as the output) in the paper
    convention at ``precision`` (one of :data:`PRECISION_MODES`). Returns the figures, the SR pixels (HWC, the
    image's integer type) and the seconds the upscaling itself took. :func:`evaluate` and the comparison job measure
    through this one function."""
    mode = resolve_precision(precision, up.descriptor)
    y_model = up.descriptor.color_space == "Y"
    if mode == "float" and y_model and hr.shape[2] == 3 and hr.dtype == np.uint8 and lr_img.pixels.shape[2] == 3:
        return _measure_y_float(up, lr_img.pixels, hr, border)
    t0 = time.perf_counter()
    sr = up.upscale_image(lr_img).pixels
    secs = time.perf_counter() - t0
    return measure(sr, hr, crop_border=border), sr, secs


def _measure_y_float(up: Any, lr: np.ndarray, hr: np.ndarray, border: int) -> tuple[Measurement, np.ndarray, float]:
    """A Y-channel model measured on its own float output: Y in, Y out, nothing rounded (clipped to [0, 255]).

    The RGB figures use the 8-bit RGB image made from that Y and the MATLAB-bicubic CbCr, as ``upscale_image`` does.
    """
    import torch

    from srbatch.inference.colorspace import from_model_space, to_model_space
    from srbatch.metrics.color import rgb_to_y

    x = torch.from_numpy(lr.astype(np.float64) / 255.0).permute(2, 0, 1)[None]
    t0 = time.perf_counter()
    y_sr = up.upscale_tensor(to_model_space(x, "Y").float()).double().clamp(0, 1).cpu()
    secs = time.perf_counter() - t0
    y_hr = rgb_to_y(hr, round_output=False)
    y_sr_255 = y_sr[0, 0].numpy() * 255.0
    rgb = from_model_space(y_sr, "Y", source=x)[0].permute(1, 2, 0).clamp(0, 1).numpy()
    sr_rgb = np.floor(rgb * 255.0 + 0.5).astype(np.uint8)
    return Measurement(
        psnr_y=psnr(y_sr_255, y_hr, crop_border=border, data_range=255.0),
        ssim_y=ssim(y_sr_255, y_hr, crop_border=border, data_range=255.0),
        psnr_rgb=psnr(sr_rgb, hr, crop_border=border),
        ssim_rgb=ssim(sr_rgb, hr, crop_border=border),
    ), sr_rgb, secs


def write_parquet(result: EvalResult, uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write the per-image rows (with ``grey`` and ``lpips`` per image; ``lpips`` null without LPIPS weights) plus the
    model, architecture, scale, crop_border, device, precision, grey_as_rgb, noise_sigma and lpips_net columns as
    Parquet; returns the file URI.

    ``uri`` ending in ``.parquet`` is the file; otherwise it is a folder/prefix and ``evaluation.parquet`` goes in it.
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    target = uri if uri.endswith(".parquet") else uri.rstrip("/") + "/evaluation.parquet"
    cols: dict[str, list[Any]] = {k: [getattr(r, k) for r in result.rows] for k in EvalRow.__dataclass_fields__}
    n = len(result.rows)
    cols.update(
        model=[result.model] * n,
        architecture=[result.architecture] * n,
        scale=[result.scale] * n,
        crop_border=[result.crop_border] * n,
        device=[result.device] * n,
        precision=[result.precision] * n,
        grey_as_rgb=[result.grey_as_rgb] * n,
        noise_sigma=[result.noise_sigma] * n,
        lpips_net=[result.lpips_net] * n,
    )
    types = {"lpips": pa.float64(), "lpips_net": pa.string()}  # typed even when every value is null
    buf = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()}), buf)
    write_bytes(target, buf.getvalue(), storage_options)
    return target
