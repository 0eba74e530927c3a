"""PSNR and SSIM with explicit conventions, and the paper convention used by published SR tables.

Paper convention (see ``shared/refs/EXPECTED.md``): 8-bit SR output, Y of MATLAB ``rgb2ycbcr`` (rounded to 8-bit as
MATLAB does for uint8), ``scale`` pixels shaved from each border, PSNR with peak 255, SSIM of Wang et al. (11x11
Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, population covariance, valid region only). This SSIM equals
scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from srbatch.errors import ConfigError
from srbatch.metrics.color import rgb_to_y

__all__ = ["psnr", "ssim", "Measurement", "measure"]


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ConfigError(f"images to compare differ in shape: {a.shape} vs {b.shape}")
    if crop_border < 0:
        raise ConfigError(f"crop_border must be >= 0; got {crop_border}")
    if crop_border:
        if a.shape[0] <= 2 * crop_border or a.shape[1] <= 2 * crop_border:
            raise ConfigError(f"image {a.shape[:2]} is too small for crop_border={crop_border}")
        a = a[crop_border:-crop_border, crop_border:-crop_border, ...]
        b = b[crop_border:-crop_border, crop_border:-crop_border, ...]
    return a.astype(np.float64), b.astype(np.float64)


def _default_range(a: np.ndarray) -> float:
    if a.dtype == np.uint8:
        return 255.0
    if a.dtype == np.uint16:
        return 65535.0
    raise ConfigError(f"data_range is required for {a.dtype} images (e.g. 1.0 for floats in [0, 1])")


def psnr(a: np.ndarray, b: np.ndarray, *, crop_border: int = 0, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape images ``(H, W)`` or ``(H, W, C)``.

    ``data_range`` defaults to 255 for uint8 and 65535 for uint16. Identical images give ``inf``.
    """
    rng = float(data_range) if data_range is not None else _default_range(a)
    x, y = _prepare(a, b, crop_border)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(rng * rng / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g


def _ssim_2d(x: np.ndarray, y: np.ndarray, rng: float, win: int, sigma: float) -> float:
    g = _gaussian_window(win, sigma)
    kh, kw = g.view(1, 1, win, 1), g.view(1, 1, 1, win)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh), kw)  # valid region only

    tx = torch.from_numpy(x)[None, None]
    ty = torch.from_numpy(y)[None, None]
    mx, my = filt(tx), filt(ty)
    sxx = filt(tx * tx) - mx * mx
    syy = filt(ty * ty) - my * my
    sxy = filt(tx * ty) - mx * my
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    *,
    crop_border: int = 0,
    data_range: float | None = None,
    win_size: int = 11,
    sigma: float = 1.5,
) -> float:
    """SSIM (Wang et al. 2004) of two same-shape images; the mean over channels for ``(H, W, C)``."""
    rng = float(data_range) if data_range is not None else _default_range(a)
    x, y = _prepare(a, b, crop_border)
    if x.shape[0] < win_size or x.shape[1] < win_size:
        raise ConfigError(f"image {x.shape[:2]} is smaller than the SSIM window {win_size}")
    if x.ndim == 2:
        return _ssim_2d(x, y, rng, win_size, sigma)
    return float(np.mean([_ssim_2d(x[..., c], y[..., c], rng, win_size, sigma) for c in range(x.shape[2])]))


@dataclass(frozen=True)
class Measurement:
    """PSNR/SSIM of one image pair: on Y (paper convention; grey images as they are) and on all channels."""

    psnr_y: float
    ssim_y: float
    psnr_rgb: float
    ssim_rgb: float


def _luma(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3 and img.shape[2] == 3:
        if img.dtype != np.uint8:
            raise ConfigError("the Y-channel convention is defined for 8-bit RGB; measure 16-bit images without y")
        return rgb_to_y(img, round_output=True)
    return (img[..., 0] if img.ndim == 3 else img).astype(np.float64)


def measure(sr: np.ndarray, hr: np.ndarray, *, crop_border: int, data_range: float | None = None) -> Measurement:
    """All four figures for an integer SR output and its HR reference, shaving ``crop_border`` pixels."""
    rng = float(data_range) if data_range is not None else _default_range(hr)
    if sr.shape != hr.shape:
        raise ConfigError(f"SR output {sr.shape} and HR reference {hr.shape} differ in shape")
    if hr.ndim == 3 and hr.shape[2] == 3 and hr.dtype == np.uint8:
        ys, yh = _luma(sr), _luma(hr)
    else:
        ys, yh = (sr[..., 0] if sr.ndim == 3 else sr), (hr[..., 0] if hr.ndim == 3 else hr)
        if hr.ndim == 3 and hr.shape[2] == 3:  # 16-bit colour: Y figures on the same weights, unrounded
            ys = 16 * rng / 255 + (65.481 * sr[..., 0] + 128.553 * sr[..., 1] + 24.966 * sr[..., 2]) / 255.0
            yh = 16 * rng / 255 + (65.481 * hr[..., 0] + 128.553 * hr[..., 1] + 24.966 * hr[..., 2]) / 255.0
    return Measurement(
        psnr_y=psnr(ys, yh, crop_border=crop_border, data_range=rng),
        ssim_y=ssim(ys, yh, crop_border=crop_border, data_range=rng),
        psnr_rgb=psnr(sr, hr, crop_border=crop_border, data_range=rng),
        ssim_rgb=ssim(sr, hr, crop_border=crop_border, data_range=rng),
    )
