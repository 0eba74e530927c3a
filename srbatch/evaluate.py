"""Evaluation in the paper convention: pair HR/LR images, upscale, measure PSNR/SSIM, report.

``srbatch evaluate`` is a thin wrapper over :func:`evaluate`.
"""

from __future__ import annotations

import logging
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

    def summary(self) -> dict[str, Any]:
        """The JSON object printed by ``srbatch evaluate --json`` (without per-image rows)."""
        d = asdict(self)
        d["images"] = [{"image": r.image, "psnr_y": r.psnr_y, "ssim_y": r.ssim_y} for r in self.rows]
        d.pop("rows")
        return d

    def table(self) -> str:
        """A plain-text table, one line per image and the mean."""
        head = f"{'image':<28} {'size':>11} {'PSNR_Y':>8} {'SSIM_Y':>7} {'PSNR_RGB':>9} {'SSIM_RGB':>9}"
        lines = [f"model {self.model} ({self.architecture}) x{self.scale} on {self.device}", head, "-" * len(head)]
        for r in self.rows:
            size = f"{r.width}x{r.height}"
            lines.append(
                f"{r.image[:28]:<28} {size:>11} {r.psnr_y:8.3f} {r.ssim_y:7.4f} {r.psnr_rgb:9.3f} {r.ssim_rgb:9.4f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'mean (' + str(self.n_images) + ' images)':<28} {'':>11} {self.psnr_y:8.3f} {self.ssim_y:7.4f} "
            f"{self.psnr_rgb:9.3f} {self.ssim_rgb:9.4f}"
        )
        lines.append(f"convention: crop_border={self.crop_border}; precision={self.precision}; {self.convention}")
        return "\n".join(lines)


def _modcrop(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return img[:h, :w, ...]


def reference_pair(
    hr_img: Any, lr_img: Any | None, scale: int, *, name: str, hr_uri: str = "", lr_uri: str | None = None
) -> tuple[Any, np.ndarray]:
    """The (LR image, HR pixels) pair measured in the paper convention.

    Without ``lr_img`` the HR is cropped to a multiple of ``scale`` and downscaled with MATLAB bicubic; with it, the HR
    must be ``scale`` x the LR (a larger HR by less than ``scale`` pixels is cropped, as benchmark HR files often are).
    Alpha is dropped. Raises :class:`ConfigError` naming the files when sizes or channels do not match.
    """
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
        raise ConfigError(f"{name}: LR has {lr_img.channels} channels but HR has {hr_px.shape[2]}")
    lr_img.alpha = None
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
) -> EvalResult:
    """Evaluate ``model`` at ``scale`` on the HR images named by ``hr`` (folder, glob or URI).

    Without ``lr``, each HR image is cropped to a multiple of ``scale`` and downscaled with MATLAB bicubic. With ``lr``,
    images pair by name (see :func:`pair_images`) and each HR image must be ``scale`` x its LR (a larger HR is cropped
    to it, as benchmark HR files often are). ``crop_border`` defaults to ``scale`` (the paper convention).
    ``precision`` is one of :data:`PRECISION_MODES`.
    """
    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.models.loader import load_model

    if scale < 1:
        raise ConfigError(f"scale must be >= 1; got {scale}")
    desc = paper_model(model if isinstance(model, ModelDescriptor) else load_model(model, scale=scale))
    if desc.scale != scale:
        raise ConfigError(f"model {desc.name} is x{desc.scale}; evaluate it with --scale {desc.scale}")
    border = scale if crop_border is None else int(crop_border)
    mode = resolve_precision(precision, desc)
    pairs = pair_images(
        list_images(hr, storage_options), list_images(lr, storage_options) if lr is not None else None
    )
    up = Upscaler(desc, device=device, dtype=dtype, tiling=TilingConfig(tile=tile), self_ensemble=self_ensemble)
    rows: list[EvalRow] = []
    t_all = time.perf_counter()
    for key, hr_uri, lr_uri in pairs:
        hr_img = decode_image(read_bytes(hr_uri, storage_options), name=hr_uri)
        lr_given = decode_image(read_bytes(lr_uri, storage_options), name=lr_uri) if lr_uri is not None else None
        lr_img, hr_px = reference_pair(hr_img, lr_given, scale, name=key, hr_uri=hr_uri, lr_uri=lr_uri)
        h, w = hr_px.shape[:2]
        t0 = time.perf_counter()
        m, _, _ = upscale_and_measure(up, lr_img, hr_px, border=border, precision=mode)
        secs = time.perf_counter() - t0
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
    """Write the per-image rows (plus model, scale, crop_border columns) as Parquet; returns the file URI.

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
    )
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    write_bytes(target, buf.getvalue(), storage_options)
    return target
