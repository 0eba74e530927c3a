"""MATLAB-exact ``imresize`` (bicubic, a = -0.5, antialiasing on downscale, symmetric padding).

PIL, OpenCV and PyTorch bicubic are different functions; published SR numbers use this one. :func:`imresize` is
computed as two dense matrix products (one per axis) in float64, so it runs on any torch device and matches MATLAB to
floating-point precision. Axes are processed in MATLAB's order (the axis with the smaller scale first).

:func:`imresize_fast` is the same function with the same weights, computed in the input's float dtype with a few taps
per output (:func:`banded_weights`) instead of dense matrices: a polyphase convolution for integer up- and
downscales, a gather of the taps otherwise. In float32 it differs from :func:`imresize` by float32 rounding only
(about 1e-7 of the value range). :func:`resize_axis` resizes a region of an axis with the same taps, for tiled
engines.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from srbatch.errors import ConfigError

__all__ = ["banded_weights", "imresize", "imresize_fast", "imresize_uint8", "resize_axis", "resize_weights"]


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
    idx0, w = _taps(in_len, out_len, scale, antialias)
    mat = torch.zeros(out_len, in_len, dtype=torch.float64)
    mat.scatter_add_(1, idx0, w)
    return mat


def _taps(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MATLAB's taps: 0-based input positions (mirrored inside ``[0, in_len)``) and normalised weights per output."""
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
    return idx0, w


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


# --------------------------------------------------------------------------------- the fast path: banded taps

_CHUNK = 1 << 18  # output elements per chunk (1 MB in float32): temporaries stay in cache (measured on 2 threads)


@lru_cache(maxsize=64)
def _banded_cpu(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False):  # cached: a normal tensor even when first built under inference mode
        idx, w = _taps(in_len, out_len, scale, antialias)
        used = (w != 0).any(dim=0).nonzero().flatten()  # MATLAB's window has zero taps at both ends: drop them
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 1)
        return idx[:, lo:hi].contiguous(), w[:, lo:hi].contiguous()


def banded_weights(
    in_len: int, out_len: int, scale: float, antialias: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resize_weights` as ``K`` taps per output: ``(idx, w)``, both ``(out_len, K)``.

    ``idx`` (int64) holds 0-based input positions with MATLAB's symmetric padding already applied (always inside
    ``[0, in_len)``; a position may repeat in a row near the borders), ``w`` (float64) the weights, so that
    ``out[i] = sum_k w[i, k] * in[idx[i, k]]`` is ``resize_weights(in_len, out_len, scale, antialias) @ in``. ``K`` is
    4 for upscales and about ``4 / scale`` for antialiased downscales. Cached: do not modify the tensors.
    """
    return _banded_cpu(int(in_len), int(out_len), float(scale), bool(antialias))


def resize_axis(
    x: torch.Tensor, axis: int, idx: torch.Tensor, w: torch.Tensor, *, offset: int = 0
) -> torch.Tensor:
    """Resize axis ``axis`` (-1 or -2) of a float tensor with the taps ``(idx, w)`` of :func:`banded_weights`.

    ``x``'s slice along ``axis`` holds input positions ``offset .. offset + x.shape[axis] - 1``, so a region can be
    resized: for output positions ``a..b-1`` pass ``idx[a:b], w[a:b]`` and the crop of the input from position
    ``offset = idx[a:b].min()`` to ``idx[a:b].max()`` (at least). Computed in ``x``'s dtype (weights cast to it); the
    result has ``idx.shape[0]`` positions along ``axis``. Raises :class:`ConfigError` when a tap lies outside the crop.
    """
    if axis not in (-1, -2):
        raise ConfigError(f"resize_axis resizes axis -1 or -2; got {axis}")
    if x.ndim < 2 or not x.is_floating_point():
        raise ConfigError(f"resize_axis needs a float tensor (..., H, W); got {x.dtype} of shape {tuple(x.shape)}")
    if idx.ndim != 2 or idx.shape != w.shape or idx.shape[1] < 1:
        raise ConfigError(f"resize_axis needs taps idx and w of one shape (n, K); got {tuple(idx.shape)} and "
                          f"{tuple(w.shape)}")  # fmt: skip
    n = x.shape[axis]
    if idx.shape[0] == 0:  # an empty region
        return x.narrow(axis, 0, 0).clone()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < offset or hi >= offset + n:
        raise ConfigError(
            f"resize_axis: these output positions need input positions {lo}..{hi}, but the crop holds "
            f"{offset}..{offset + n - 1}; crop the input to at least idx.min()..idx.max() and pass offset=idx.min()"
        )
    rel = (idx - offset).to(x.device)
    wt = w.to(device=x.device, dtype=x.dtype).unsqueeze(-1)  # (n, K, 1): broadcast along the other axis
    if axis == -2:
        return _gather_rows(x, rel, wt)
    # Along W, gathering single elements is slow: transpose chunks of rows, gather whole (short) rows, transpose back.
    h = x.shape[-2]
    x3 = x.reshape(-1, h, n)
    out = torch.empty(x3.shape[0], h, idx.shape[0], dtype=x.dtype, device=x.device)
    step = max(1, _CHUNK // max(1, x3.shape[0] * idx.shape[0]))
    for m0 in range(0, h, step):
        m1 = min(h, m0 + step)
        out[:, m0:m1].copy_(_gather_rows(x3[:, m0:m1].transpose(1, 2).contiguous(), rel, wt).transpose(1, 2))
    return out.reshape(*x.shape[:-1], idx.shape[0])


def _gather_rows(x: torch.Tensor, rel: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``out[..., i, :] = sum_k wt[i, k] * x[..., rel[i, k], :]``."""
    out = torch.index_select(x, -2, rel[:, 0]).mul_(wt[:, 0])
    for k in range(1, rel.shape[1]):
        out.addcmul_(torch.index_select(x, -2, rel[:, k]), wt[:, k])
    return out


def _mirror(pos: torch.Tensor, n: int) -> torch.Tensor:
    """0-based positions (any integers) mirrored into ``[0, n)`` like MATLAB's symmetric padding (edge repeated)."""
    pos = pos % (2 * n)
    return torch.where(pos < n, pos, 2 * n - 1 - pos)


@lru_cache(maxsize=64)
def _polyphase_plan(
    in_len: int, out_len: int, scale: float, antialias: bool
) -> tuple[int, int, int, torch.Tensor] | None:
    """``(P, S, start, kernel)`` when the axis is an integer up- (``P`` = scale, ``S`` = 1) or downscale (``P`` = 1,
    ``S`` = 1 / scale): output ``q * P + r`` is ``sum_t kernel[r, t] * in[q * S + start + t]`` (mirrored). None
    otherwise. The kernel is read off an interior row of each phase of MATLAB's weights for a longer axis."""
    if scale >= 2 and scale == round(scale) and out_len == int(scale) * in_len:
        p, s = int(scale), 1
    elif scale < 1 and round(1 / scale) >= 2 and abs(scale * round(1 / scale) - 1) <= 1e-12:
        p, s = 1, int(round(1 / scale))
        if in_len != s * out_len:
            return None
    else:
        return None
    blocks = 32  # long enough that the middle block's taps (at most 2 * S + 1 inputs away) are never mirrored
    with torch.inference_mode(False):
        idx, w = _taps(blocks * s, blocks * p, scale, antialias)
        q0 = blocks // 2
        rows = [(idx[q0 * p + r] - q0 * s, w[q0 * p + r]) for r in range(p)]
        nonzero = torch.cat([off[wr != 0] for off, wr in rows])
        start, stop = int(nonzero.min()), int(nonzero.max()) + 1
        kernel = torch.zeros(p, stop - start, dtype=torch.float64)
        for r, (off, wr) in enumerate(rows):
            kernel[r].scatter_add_(0, off[wr != 0] - start, wr[wr != 0])
    return p, s, start, kernel


def _polyphase_axis(x: torch.Tensor, axis: int, out_len: int, plan: tuple[int, int, int, torch.Tensor]) -> torch.Tensor:
    """Resize axis -2 or -1 of ``x`` (B, H, W) by the polyphase ``plan``, chunk by chunk into one output tensor."""
    p, s, start, kernel64 = plan
    b, h, w = x.shape
    in_len = h if axis == -2 else w
    nq, klen = out_len // p, kernel64.shape[1]
    kernel = kernel64.to(device=x.device, dtype=x.dtype)
    if axis == -2:
        out = torch.empty(b, out_len, w, dtype=x.dtype, device=x.device)
        phases = out.view(b, nq, p, w)
        weight = kernel.view(p, 1, klen, 1)
        step = max(1, _CHUNK // max(1, b * p * w))
        for q0 in range(0, nq, step):
            q1 = min(nq, q0 + step)
            pos = torch.arange(q0 * s + start, (q1 - 1) * s + start + klen, device=x.device)
            rows = x.index_select(1, _mirror(pos, in_len)).unsqueeze(1)  # (B, 1, rows, W)
            y = F.conv2d(rows, weight, stride=(s, 1))  # (B, P, q1 - q0, W)
            phases[:, q0:q1].copy_(y.permute(0, 2, 1, 3))
        return out
    out = torch.empty(b, h, out_len, dtype=x.dtype, device=x.device)
    weight = kernel.view(p, 1, 1, klen)
    pos = _mirror(torch.arange(start, (nq - 1) * s + start + klen, device=x.device), in_len)
    step = max(1, _CHUNK // max(1, b * out_len))
    for m0 in range(0, h, step):
        m1 = min(h, m0 + step)
        cols = x[:, m0:m1].index_select(2, pos).unsqueeze(1)  # (B, 1, rows, W + pad)
        y = F.conv2d(cols, weight, stride=(1, s))  # (B, P, rows, nq)
        out[:, m0:m1].view(b, m1 - m0, nq, p).copy_(y.permute(0, 2, 3, 1))
    return out


def _fast_axis(x: torch.Tensor, axis: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    in_len = x.shape[axis]
    if out_len == in_len and scale == 1:
        return x.clone()  # MATLAB's weights are exactly the identity here; a new tensor, as on every other path
    # The convolution on CPU only: on CUDA, cuDNN's default TF32 would round the weights to 10 bits; gathering the
    # taps is elementwise work, in full float32 everywhere.
    plan = _polyphase_plan(in_len, out_len, scale, antialias) if x.device.type == "cpu" else None
    if plan is not None:
        return _polyphase_axis(x, axis, out_len, plan)
    idx, w = banded_weights(in_len, out_len, scale, antialias)
    return resize_axis(x, axis, idx, w)


def imresize_fast(
    x: torch.Tensor,
    scale: float | tuple[float, float] | None = None,
    *,
    output_shape: tuple[int, int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """:func:`imresize` (same arguments, same MATLAB weights and axis order) computed in ``x``'s float dtype.

    float32 and float64 inputs are computed in their own dtype, float16/bfloat16 in float32 (cast back), integer
    inputs in float32 (the result stays float32). No float64 copy of the image is made: each axis is resized chunk by
    chunk into one new tensor, with a polyphase convolution for integer up- and downscales on CPU (mirror-padded
    chunks, the taps of MATLAB's weights) and :func:`resize_axis` otherwise. The result is ``(..., H', W')``, contiguous; not
    rounded or clamped. In float32 on [0, 1] data it is within about 1e-6 of :func:`imresize`.
    """
    if x.ndim < 2:
        raise ConfigError(f"imresize needs a tensor with at least 2 dims (..., H, W); got shape {tuple(x.shape)}")
    h, w = x.shape[-2], x.shape[-1]
    (sh, sw), (oh, ow) = _resolve(h, w, scale, output_shape)
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    lead = x.shape[:-2]
    y = x.reshape(-1, h, w).to(compute)
    for axis in ([0, 1] if sh <= sw else [1, 0]):  # MATLAB: the axis with the smaller scale first; ties -> rows
        if axis == 0:
            y = _fast_axis(y, -2, oh, sh, antialias)
        else:
            y = _fast_axis(y, -1, ow, sw, antialias)
    return y.reshape(*lead, oh, ow).to(out_dtype)
