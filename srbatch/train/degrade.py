"""Synthesise low-resolution training inputs from high-resolution crops, on the fly.

Three pipelines, chosen by :attr:`DegradationConfig.kind`:

- ``bicubic``: MATLAB-exact bicubic downscale (:func:`srbatch.metrics.resize.imresize`, antialiased), kept in float.
  This is the convention of the published benchmark tables (Set5, DIV2K ...).
- ``classic``: blur -> bicubic downscale -> noise -> JPEG, each step applied with its own probability.
- ``realesrgan``: the second-order degradation of Real-ESRGAN (Wang et al., ICCVW 2021), simplified.

Every random draw comes from the ``torch.Generator`` passed in, so a seeded generator reproduces a degradation exactly.
Images are float32 ``(C, H, W)`` tensors in ``[0, 1]``; C is 1 (grey, e.g. microscopy) or 3 (RGB).

JPEG compression quantises to 8 bits. For 16-bit data (microscopy) use ``jpeg_prob=0`` (the ``microscopy`` preset
does); a positive ``jpeg_prob`` is honoured as asked.
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from srbatch.errors import ConfigError
from srbatch.metrics.resize import imresize

__all__ = [
    "DegradationConfig",
    "degrade",
    "degrade_batch",
    "PRESET_DEGRADATIONS",
    "REALESRGAN_RESIZE_PROB1",
    "REALESRGAN_RESIZE_UP1",
    "REALESRGAN_RESIZE_DOWN1",
    "REALESRGAN_RESIZE_PROB2",
    "REALESRGAN_RESIZE_UP2",
    "REALESRGAN_RESIZE_DOWN2",
    "REALESRGAN_RESIZE_MODES",
    "REALESRGAN_FINAL_RESIZE_FIRST_PROB",
]

# Real-ESRGAN random resize (options/train_realesrnet_x4plus.yml). Probabilities are (up, down, keep); the scale is
# drawn uniformly in the up or down range. Round 1 scales the HR size, round 2 scales the target (LR) size.
REALESRGAN_RESIZE_PROB1: tuple[float, float, float] = (0.2, 0.7, 0.1)
"""Round 1: probabilities of resizing up, down, or keeping the size."""
REALESRGAN_RESIZE_UP1: tuple[float, float] = (1.0, 1.5)
"""Round 1: range of the up-scaling factor (relative to the HR size)."""
REALESRGAN_RESIZE_DOWN1: tuple[float, float] = (0.15, 1.0)
"""Round 1: range of the down-scaling factor (relative to the HR size)."""
REALESRGAN_RESIZE_PROB2: tuple[float, float, float] = (0.3, 0.4, 0.3)
"""Round 2: probabilities of resizing up, down, or keeping the size."""
REALESRGAN_RESIZE_UP2: tuple[float, float] = (1.0, 1.2)
"""Round 2: range of the up-scaling factor (relative to the target LR size)."""
REALESRGAN_RESIZE_DOWN2: tuple[float, float] = (0.3, 1.0)
"""Round 2: range of the down-scaling factor (relative to the target LR size)."""
REALESRGAN_RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
"""``torch.nn.functional.interpolate`` modes, drawn uniformly at each resize (antialias on for bilinear/bicubic)."""
REALESRGAN_FINAL_RESIZE_FIRST_PROB: float = 0.5
"""Final step: probability of resizing to the target size before the last JPEG (otherwise JPEG, then resize)."""

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, for grey Poisson noise on RGB images


class DegradationConfig(BaseModel):
    """How :func:`degrade` turns an HR crop into its LR training input. Frozen; unknown fields are errors.

    ``bicubic`` ignores every field but ``kind``. ``classic`` and ``realesrgan`` use all of them
    (``second_order_prob`` only matters for ``realesrgan``). A range ``(lo, hi)`` is sampled uniformly; set
    ``lo == hi`` for a fixed value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["bicubic", "classic", "realesrgan"] = Field(
        "bicubic",
        description="bicubic: MATLAB bicubic downscale only (float, no quantisation); classic: blur -> bicubic "
        "downscale -> noise -> JPEG; realesrgan: Real-ESRGAN's second-order degradation (no sinc filter)",
    )
    blur_prob: float = Field(1.0, ge=0, le=1, description="probability of a Gaussian blur (per blur step)")
    blur_sigma: tuple[float, float] = Field(
        (0.2, 3.0), description="range of the Gaussian blur's sigma, in pixels of the image being blurred (HR)"
    )
    blur_anisotropic_prob: float = Field(
        0.5,
        ge=0,
        le=1,
        description="probability that a blur is anisotropic: two sigmas drawn in blur_sigma and a rotation "
        "angle uniform in [0, pi)",
    )
    blur_kernel_size: int = Field(
        21, ge=3, le=63, description="side of the square blur kernel in pixels (odd; sigma up to ~size/6)"
    )
    noise_prob: float = Field(1.0, ge=0, le=1, description="probability of adding noise (per noise step)")
    gaussian_sigma: tuple[float, float] = Field(
        (1.0, 15.0), description="range of the Gaussian noise's standard deviation, in 8-bit units (x/255)"
    )
    poisson_prob: float = Field(
        0.0, ge=0, le=1, description="fraction of noise draws that are Poisson (shot) noise instead of Gaussian"
    )
    poisson_scale: tuple[float, float] = Field(
        (0.05, 3.0),
        description="range of the Poisson noise multiplier (Real-ESRGAN convention): noise = (poisson(img * vals) "
        "/ vals - img) * scale, vals = the image's count of distinct 8-bit levels rounded up to a power of 2",
    )
    gray_noise_prob: float = Field(
        0.0, ge=0, le=1, description="probability that the noise is grey (the same on every channel)"
    )
    jpeg_prob: float = Field(
        1.0, ge=0, le=1, description="probability of a JPEG round trip (quantises to 8 bits: use 0 for 16-bit data)"
    )
    jpeg_quality: tuple[int, int] = Field((30, 95), description="range of the JPEG quality, within [1, 100]")
    second_order_prob: float = Field(
        1.0, ge=0, le=1, description="realesrgan only: probability of the second blur/resize/noise round"
    )

    @field_validator("blur_sigma", "gaussian_sigma", "poisson_scale", "jpeg_quality")
    @classmethod
    def _ordered(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"must be finite numbers; got {v}")
        if lo > hi:
            raise ValueError(f"lower bound {lo} is above upper bound {hi}; give (lo, hi) with lo <= hi: ({hi}, {lo})")
        name = info.field_name
        if name == "blur_sigma" and lo <= 0:
            raise ValueError(f"sigmas must be > 0; got {v}; use blur_prob=0 to turn blurring off")
        if name in ("gaussian_sigma", "poisson_scale") and lo < 0:
            raise ValueError(f"must be >= 0; got {v}; use noise_prob=0 to turn noise off")
        if name == "jpeg_quality" and (lo < 1 or hi > 100):
            raise ValueError(f"qualities must be within [1, 100]; got {v}; use jpeg_prob=0 to turn JPEG off")
        return v

    @field_validator("blur_kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd so the kernel has a centre pixel; got {v}, use {v + 1}")
        return v


PRESET_DEGRADATIONS: dict[str, DegradationConfig] = {
    # The benchmark convention: MATLAB bicubic, nothing else.
    "bicubic": DegradationConfig(kind="bicubic"),
    # Light degradations for faces and clean photos: a little blur, faint noise, good-quality JPEG.
    "mild": DegradationConfig(
        kind="classic",
        blur_prob=0.5,
        blur_sigma=(0.2, 1.5),
        noise_prob=0.5,
        gaussian_sigma=(1.0, 5.0),
        jpeg_prob=0.7,
        jpeg_quality=(60, 95),
    ),
    # Grey (fluorescence) microscopy: a mild isotropic-or-not PSF, grey Poisson (shot) or Gaussian (read) noise on
    # each draw, and no JPEG so 16-bit data keep their precision.
    "microscopy": DegradationConfig(
        kind="classic",
        blur_prob=0.5,
        blur_sigma=(0.2, 1.5),
        noise_prob=1.0,
        gaussian_sigma=(1.0, 8.0),
        poisson_prob=0.5,
        gray_noise_prob=1.0,
        jpeg_prob=0.0,
    ),
    # Real-ESRGAN's round-1 ranges (options/train_realesrnet_x4plus.yml): noise is Gaussian or Poisson with equal
    # odds (gaussian_noise_prob 0.5), grey 40% of the time. Anisotropic 31% of blurs: their non-sinc kernel mix
    # (iso .45, aniso .25, generalized .12/.03, plateau .12/.03) with every shape mapped to a Gaussian.
    "realesrgan": DegradationConfig(
        kind="realesrgan",
        blur_prob=1.0,
        blur_sigma=(0.2, 3.0),
        blur_anisotropic_prob=0.31,
        blur_kernel_size=21,
        noise_prob=1.0,
        gaussian_sigma=(1.0, 30.0),
        poisson_prob=0.5,
        poisson_scale=(0.05, 3.0),
        gray_noise_prob=0.4,
        jpeg_prob=1.0,
        jpeg_quality=(30, 95),
        second_order_prob=1.0,
    ),
    # Restoration at scale 1 (denoising): strong Gaussian noise, sometimes JPEG, no blur.
    "denoise": DegradationConfig(
        kind="classic",
        blur_prob=0.0,
        noise_prob=1.0,
        gaussian_sigma=(5.0, 50.0),
        jpeg_prob=0.3,
    ),
}
"""Named degradation settings: ``bicubic`` (benchmark convention), ``mild`` (faces), ``microscopy`` (grey, Poisson +
Gaussian noise, no JPEG), ``realesrgan`` (blind real-world SR) and ``denoise`` (scale-1 restoration)."""


# ---------------------------------------------------------------------------------------------------------------
# Random draws (all from the caller's generator)


def _rand(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, device=g.device).item())


def _chance(g: torch.Generator, p: float) -> bool:
    return _rand(g) < p


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand(g)


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (both included)."""
    return int(torch.randint(lo, hi + 1, (), generator=g, device=g.device).item())


# ---------------------------------------------------------------------------------------------------------------
# Steps


def _gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """A ``(size, size)`` float64 Gaussian kernel summing to 1, covariance ``R diag(sx^2, sy^2) R^T``, ``R`` = rotation
    by ``theta`` (radians, counter-clockwise in x-right/y-down pixel coordinates)."""
    r = size // 2
    ax = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    # Coordinates in the kernel's principal axes.
    u = c * xx + s * yy
    v = -s * xx + c * yy
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel of ``x`` ``(C, H, W)`` with ``kernel`` (odd square), reflect padding."""
    c, h, w = x.shape
    r = kernel.shape[-1] // 2
    fit = min(h, w) - 1  # reflect padding needs pad < size: crop the kernel on tiny images
    if r > fit:
        kernel = kernel[r - fit : r + fit + 1, r - fit : r + fit + 1]
        kernel = kernel / kernel.sum()
        r = fit
    if r == 0:
        return x
    weight = kernel.to(dtype=x.dtype, device=x.device).expand(c, 1, 2 * r + 1, 2 * r + 1)
    padded = F.pad(x[None], (r, r, r, r), mode="reflect")
    return F.conv2d(padded, weight, groups=c)[0]


def _random_blur(x: torch.Tensor, cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    lo, hi = cfg.blur_sigma
    sigma_x = _uniform(g, lo, hi)
    if _chance(g, cfg.blur_anisotropic_prob):
        sigma_y = _uniform(g, lo, hi)
        theta = _uniform(g, 0.0, math.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    return _blur(x, _gaussian_kernel(cfg.blur_kernel_size, sigma_x, sigma_y, theta))


def _gaussian_noise(x: torch.Tensor, sigma: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    c, h, w = x.shape
    shape = (1, h, w) if gray else (c, h, w)
    noise = torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(x.device)
    return noise * (sigma / 255.0)


def _poisson_noise(x: torch.Tensor, scale: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    src = x.clamp(0, 1)
    if gray and src.shape[0] == 3:
        luma = torch.tensor(_LUMA, dtype=src.dtype, device=src.device).view(3, 1, 1)
        src = (src * luma).sum(dim=0, keepdim=True)
    # Real-ESRGAN: vals = number of distinct 8-bit levels rounded up to a power of 2 (a proxy for the photon count).
    # Unlike theirs, the noise is taken about the unquantised image, so 16-bit data keep their precision.
    levels = int(torch.unique(torch.round(src * 255.0)).numel())
    vals = float(2 ** math.ceil(math.log2(max(levels, 1))))
    counts = torch.poisson((src * vals).to(g.device), generator=g).to(src.device)
    noise = (counts / vals - src) * scale
    if gray:
        noise = noise[:1]  # (1, H, W): broadcast to every channel
    return noise


def _random_noise(x: torch.Tensor, cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    gray = _chance(g, cfg.gray_noise_prob)
    if _chance(g, cfg.poisson_prob):
        noise = _poisson_noise(x, _uniform(g, *cfg.poisson_scale), gray, g)
    else:
        noise = _gaussian_noise(x, _uniform(g, *cfg.gaussian_sigma), gray, g)
    return (x + noise).clamp(0, 1)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip with Pillow at ``quality`` (mode L for 1 channel, RGB for 3); the result is on the 8-bit grid."""
    c = x.shape[0]
    arr = torch.round(x.detach().clamp(0, 1) * 255.0).to(torch.uint8).cpu().numpy()
    img = Image.fromarray(arr[0] if c == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as dec:
        out = np.asarray(dec.convert("L" if c == 1 else "RGB"))
    t = torch.from_numpy(out.copy()).to(device=x.device, dtype=torch.float32) / 255.0
    return t[None] if c == 1 else t.permute(2, 0, 1).contiguous()


def _random_jpeg(x: torch.Tensor, cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    return _jpeg(x, _randint(g, *cfg.jpeg_quality))


def _interpolate(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x[None], size=size, mode="area")[0]
    return F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=True)[0]


def _random_resize(
    x: torch.Tensor,
    base: tuple[int, int],
    probs: tuple[float, float, float],
    up: tuple[float, float],
    down: tuple[float, float],
    g: torch.Generator,
) -> torch.Tensor:
    u = _rand(g)
    if u < probs[0]:
        s = _uniform(g, *up)
    elif u < probs[0] + probs[1]:
        s = _uniform(g, *down)
    else:
        s = 1.0
    mode = REALESRGAN_RESIZE_MODES[_randint(g, 0, len(REALESRGAN_RESIZE_MODES) - 1)]
    size = (max(1, int(base[0] * s)), max(1, int(base[1] * s)))
    return _interpolate(x, size, mode)


# ---------------------------------------------------------------------------------------------------------------
# Pipelines


def _bicubic_down(x: torch.Tensor, scale: int) -> torch.Tensor:
    if scale == 1:
        return x.clone()
    h, w = x.shape[-2:]
    return imresize(x, 1.0 / scale, output_shape=(h // scale, w // scale))


def _classic(hr: torch.Tensor, scale: int, cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    x = hr
    if _chance(g, cfg.blur_prob):
        x = _random_blur(x, cfg, g)
    x = _bicubic_down(x, scale)
    if _chance(g, cfg.noise_prob):
        x = _random_noise(x, cfg, g)
    if _chance(g, cfg.jpeg_prob):
        x = _random_jpeg(x, cfg, g)
    return x


def _realesrgan(hr: torch.Tensor, scale: int, cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    h, w = hr.shape[-2:]
    target = (h // scale, w // scale)
    x = hr
    # Round 1, at HR resolution.
    if _chance(g, cfg.blur_prob):
        x = _random_blur(x, cfg, g)
    x = _random_resize(x, (h, w), REALESRGAN_RESIZE_PROB1, REALESRGAN_RESIZE_UP1, REALESRGAN_RESIZE_DOWN1, g)
    if _chance(g, cfg.noise_prob):
        x = _random_noise(x, cfg, g)
    if _chance(g, cfg.jpeg_prob):
        x = _random_jpeg(x, cfg, g)
    # Round 2, around the target resolution; its JPEG is the final one below.
    if _chance(g, cfg.second_order_prob):
        if _chance(g, cfg.blur_prob):
            x = _random_blur(x, cfg, g)
        x = _random_resize(x, target, REALESRGAN_RESIZE_PROB2, REALESRGAN_RESIZE_UP2, REALESRGAN_RESIZE_DOWN2, g)
        if _chance(g, cfg.noise_prob):
            x = _random_noise(x, cfg, g)
    # Final: resize to the target size and JPEG, in random order.
    mode = REALESRGAN_RESIZE_MODES[_randint(g, 0, len(REALESRGAN_RESIZE_MODES) - 1)]
    resize_first = _chance(g, REALESRGAN_FINAL_RESIZE_FIRST_PROB)
    if resize_first:
        x = _interpolate(x, target, mode)
    if _chance(g, cfg.jpeg_prob):
        x = _random_jpeg(x, cfg, g)
    if not resize_first:
        x = _interpolate(x, target, mode)
    return x


def _check(hr: torch.Tensor, scale: int, batched: bool) -> None:
    want = "(N, C, H, W)" if batched else "(C, H, W)"
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ConfigError(f"scale must be an integer >= 1 (1 for restoration); got {scale!r}")
    if not isinstance(hr, torch.Tensor) or hr.ndim != (4 if batched else 3):
        shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
        raise ConfigError(f"expected an HR tensor {want}; got {shape}")
    if not hr.is_floating_point():
        raise ConfigError(f"expected a float HR tensor in [0, 1]; got {hr.dtype}; divide by 255 (or 65535) first")
    c, h, w = hr.shape[-3:]
    if c not in (1, 3):
        raise ConfigError(f"expected 1 (grey) or 3 (RGB) channels; got {c} in shape {tuple(hr.shape)}")
    if h % scale or w % scale or h < scale or w < scale:
        raise ConfigError(
            f"HR height and width must be positive multiples of scale {scale}; got {h}x{w}; crop to "
            f"{h - h % scale}x{w - w % scale}"
        )


def _degrade(hr: torch.Tensor, scale: int, cfg: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    x = hr.to(torch.float32)
    if cfg.kind == "bicubic":
        lr = _bicubic_down(x, scale)
    elif cfg.kind == "classic":
        lr = _classic(x, scale, cfg, generator)
    else:
        lr = _realesrgan(x, scale, cfg, generator)
    return lr.clamp(0, 1)


def degrade(hr: torch.Tensor, scale: int, cfg: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """Synthesise the LR training input of one HR crop.

    ``hr`` is float ``(C, H, W)`` in ``[0, 1]``, C in {1, 3}, H and W multiples of ``scale``. Returns float32
    ``(C, H // scale, W // scale)`` clamped to ``[0, 1]`` (on the 8-bit grid only if a JPEG step came last), on
    ``hr``'s device. The result depends only on ``hr``, ``cfg`` and the state of ``generator`` (which it advances).
    ``scale == 1`` (restoration, denoising) applies the same degradations without downscaling.

    ``bicubic`` equals ``imresize(hr, 1 / scale)`` clamped to ``[0, 1]``; so does ``classic`` with every probability 0.

    ``classic``: Gaussian blur (isotropic, or anisotropic with two sigmas and a rotation) at HR resolution, MATLAB
    bicubic downscale, Gaussian or Poisson noise (colour or grey), JPEG round trip at a random quality.

    ``realesrgan`` (Real-ESRGAN's second-order degradation, simplified): round 1 = blur -> random resize
    (:data:`REALESRGAN_RESIZE_PROB1`, area/bilinear/bicubic) -> noise -> JPEG; round 2 (with
    ``second_order_prob``) = blur -> random resize around the target size (:data:`REALESRGAN_RESIZE_PROB2`) -> noise;
    then, in random order, a resize to exactly ``(H // scale, W // scale)`` and the final JPEG. Simplifications:
    Gaussian kernels only (no sinc, generalized or plateau kernels), a fixed kernel size, the same config ranges in
    both rounds (Real-ESRGAN narrows blur sigma, noise and Poisson scale in round 2), JPEG with Pillow rather than
    their differentiable JPEG, and no final 8-bit rounding when the last step is a resize.
    """
    _check(hr, scale, batched=False)
    return _degrade(hr, int(scale), cfg, generator)


def degrade_batch(hr: torch.Tensor, scale: int, cfg: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """:func:`degrade` each image of ``(N, C, H, W)`` independently (in order, from one generator); returns
    ``(N, C, H // scale, W // scale)`` float32."""
    _check(hr, scale, batched=True)
    return torch.stack([_degrade(img, int(scale), cfg, generator) for img in hr])
