"""MATLAB-compatible colour conversions (ITU-R BT.601, studio swing), as used by the SR literature."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["rgb2ycbcr", "ycbcr2rgb", "rgb_to_y"]

# MATLAB rgb2ycbcr for inputs in [0, 1] -> outputs in [0, 255]-scaled studio range divided by 255.
_M = torch.tensor(
    [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=torch.float64
)
_OFF = torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64)


def rgb2ycbcr(x: torch.Tensor) -> torch.Tensor:
    """RGB ``(..., 3, H, W)`` in [0, 1] -> YCbCr ``(..., 3, H, W)`` in [0, 1] (Y in [16, 235]/255), as MATLAB."""
    m = _M.to(device=x.device, dtype=x.dtype) / 255.0
    off = _OFF.to(device=x.device, dtype=x.dtype) / 255.0
    y = torch.einsum("ij,...jhw->...ihw", m, x)
    return y + off[:, None, None]


def ycbcr2rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb2ycbcr` (MATLAB ``ycbcr2rgb``), [0, 1] in and out (not clamped)."""
    m = _M.to(device=x.device, dtype=torch.float64) / 255.0
    inv = torch.linalg.inv(m).to(x.dtype)
    off = _OFF.to(device=x.device, dtype=x.dtype) / 255.0
    return torch.einsum("ij,...jhw->...ihw", inv, x - off[:, None, None])


def rgb_to_y(img: np.ndarray, *, round_output: bool = True) -> np.ndarray:
    """Y of MATLAB ``rgb2ycbcr`` for an 8-bit RGB image ``(H, W, 3)`` -> float64 ``(H, W)`` in 0..255.

    MATLAB returns uint8 for uint8 input, i.e. Y rounded; ``round_output=True`` reproduces that.
    """
    rgb = img.astype(np.float64)
    y = 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0
    return np.floor(y + 0.5) if round_output else y
