"""MATLAB-exact ``imresize`` (bicubic, a = -0.5, antialiasing on downscale, symmetric padding).

PIL, OpenCV and PyTorch bicubic are different functions; published SR numbers use this one. The resize is computed
as two dense matrix products (one per axis) in float64, so it runs on any torch device and matches MATLAB to
floating-point precision. Axes are processed in MATLAB's order (the axis with the smaller scale first).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from srbatch.errors import ConfigError

__all__ = ["imresize", "imresize_uint8", "resize_weights"]


def _cubic(x: torch.Tensor) -> torch.Tensor:
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


@lru_cache(maxsize=64)
def _weights_cpu(in_len: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    # Cached: build it as a normal tensor even when first called under torch.inference_mode(), so it can later
    # be used in computations that need autograd.
    with torch.inference_mode(False):
        return _build_weights(in_len, out_len, scale, antialias)


def _build_weights(in_len: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    kernel_width = 4.0
    if scale < 1 and antialias:
        kernel_width = kernel_width / scale

        def kernel(x: torch.Tensor) -> torch.Tensor:
            return scale * _cubic(scale * x)
    else:
        kernel = _cubic
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    p = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(p, dtype=torch.float64)[None, :]  # 1-based MATLAB indices
    w = kernel(u[:, None] - idx)
    w = w / w.sum(dim=1, keepdim=True)
    # Symmetric padding: index i (1-based) outside [1, in_len] mirrors back, edge repeated.
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    idx0 = mirror[((idx - 1).long()) % (2 * in_len)]
    mat = torch.zeros(out_len, in_len, dtype=torch.float64)
    mat.scatter_add_(1, idx0, w)
    return mat


def resize_weights(in_len: int, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """The ``(out_len, in_len)`` float64 matrix that resizes one axis like MATLAB's ``imresize``."""
    return _weights_cpu(int(in_len), int(out_len), float(scale), bool(antialias))


def _resolve(
    h: int, w: int, scale: float | tuple[float, float] | None, output_shape: tuple[int, int] | None
) -> tuple[tuple[float, float], tuple[int, int]]:
    if scale is None and output_shape is None:
        raise ConfigError("imresize needs `scale` or `output_shape`; got neither")
    if output_shape is not None:
        oh, ow = int(output_shape[0]), int(output_shape[1])
        if oh <= 0 or ow <= 0:
            raise ConfigError(f"imresize output_shape must be positive; got {output_shape}")
        if scale is None:
            return (oh / h, ow / w), (oh, ow)
    assert scale is not None
    sh, sw = (float(scale), float(scale)) if not isinstance(scale, tuple) else (float(scale[0]), float(scale[1]))
    if sh <= 0 or sw <= 0:
        raise ConfigError(f"imresize scale must be positive; got {scale}")
    if output_shape is None:
        output_shape = (int(math.ceil(h * sh)), int(math.ceil(w * sw)))
    return (sh, sw), (int(output_shape[0]), int(output_shape[1]))


def imresize(
    x: torch.Tensor,
    scale: float | tuple[float, float] | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resize the last two axes of a float tensor ``(..., H, W)`` like MATLAB ``imresize(x, scale, 'bicubic')``.

    Computation is float64 on ``x``'s device; the result has ``x``'s dtype (float64 when ``x`` is an integer tensor).
    No rounding or clamping is applied: see :func:`imresize_uint8` for MATLAB's uint8 behaviour.
    """
    if x.ndim < 2:
        raise ConfigError(f"imresize needs a tensor with at least 2 dims (..., H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[-2], x.shape[-1]
    (sh, sw), (oh, ow) = _resolve(h, w, scale, output_shape)
    out_dtype = x.dtype if x.is_floating_point() else torch.float64
    y = x.to(torch.float64)
    # MATLAB: dimension with the smallest scale first; ties -> rows first.
    order = [0, 1] if sh <= sw else [1, 0]
    for axis in order:
        if axis == 0:
            mat = resize_weights(h, oh, sh, antialias).to(y.device)
            y = torch.matmul(mat, y)
        else:
            mat = resize_weights(w, ow, sw, antialias).to(y.device)
            y = torch.matmul(y, mat.T)
    return y.to(out_dtype)


def imresize_uint8(
    img: np.ndarray,
    scale: float | tuple[float, float] | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
    antialias: bool = True,
) -> np.ndarray:
    """MATLAB ``imresize`` on an integer image ``(H, W)`` or ``(H, W, C)``: result rounded and clipped to its dtype.

    Works for uint8 and uint16 (MATLAB keeps the class of the input and rounds half away from zero).
    """
    if img.dtype not in (np.uint8, np.uint16):
        raise ConfigError(f"imresize_uint8 takes uint8 or uint16 images; got {img.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float64)
    if img.ndim == 3:
        t = t.permute(2, 0, 1)
    y = imresize(t, scale, output_shape=output_shape, antialias=antialias)
    if img.ndim == 3:
        y = y.permute(1, 2, 0)
    maxv = float(np.iinfo(img.dtype).max)
    # MATLAB rounds half away from zero; values here are >= 0 after clamping.
    y = torch.floor(y.clamp(0, maxv) + 0.5)
    return y.numpy().astype(img.dtype)
