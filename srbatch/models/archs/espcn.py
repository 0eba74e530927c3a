"""ESPCN (Shi et al.): three convolutions on the LR image and a sub-pixel (pixel-shuffle) upscaling layer.

conv 5x5 (n1 = 64) - tanh - conv 3x3 (n2 = 32) - tanh - conv 3x3 (C * r^2) - pixel shuffle (r). No activation after
the last convolution (upstream clips the result to [0, 1]; srbatch leaves it unclamped). Zero 'same' padding.

Key layout (ours and Nhat-Thanh/ESPCN-Pytorch's ``neuralnet.py``, which are the same): ``conv_1``, ``conv_2``,
``conv_3`` (``.weight``/``.bias``). The scale is inferred: ``r^2 = conv_3 out channels / conv_1 in channels``.

Colour convention: 3-channel models (the Nhat-Thanh checkpoints) work on YCbCr in [0, 1] (``color_space="YCbCr"``,
MATLAB ``rgb2ycbcr``). Upstream ``demo.py``/``test.py`` run ``rgb2ycbcr`` -> ``norm01`` -> model -> ``denorm01`` ->
``ycbcr2rgb`` with the same helpers as SRCNN/FSRCNN-Pytorch (a clipped full-range JFIF conversion; see
:mod:`srbatch.models.archs.srcnn` for why MATLAB's YCbCr is used instead). 1-channel models (the paper's setting)
work on MATLAB Y.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srbatch.models.arch_api import (
    ArchInfo,
    Architecture,
    Detection,
    StateDict,
    check_channels,
    confirm_layout,
    conv_shape,
    odd_int,
    positive_int,
    require_scale,
    square_kernel,
    ycbcr_or_y,
)

__all__ = ["ARCH", "ESPCN", "detect", "info"]


class ESPCN(nn.Module):
    """ESPCN for an integer ``scale``: ``(N, C, H, W)`` in [0, 1] -> ``(N, C, scale*H, scale*W)``.

    Kernel sizes must be odd (zero 'same' padding); ``channels`` is 1 (Y) or 3 (YCbCr).
    """

    def __init__(
        self, *, scale: int, channels: int = 3, n1: int = 64, n2: int = 32, f1: int = 5, f2: int = 3, f3: int = 3
    ) -> None:
        super().__init__()
        self.scale = scale = require_scale("espcn", {"scale": scale})
        self.channels = check_channels("espcn", channels)
        n1, n2 = positive_int("espcn", "n1", n1), positive_int("espcn", "n2", n2)
        f1, f2, f3 = (odd_int("espcn", name, k) for name, k in (("f1", f1), ("f2", f2), ("f3", f3)))
        self.conv_1 = nn.Conv2d(channels, n1, f1, padding=f1 // 2)
        self.conv_2 = nn.Conv2d(n1, n2, f2, padding=f2 // 2)
        self.conv_3 = nn.Conv2d(n2, channels * scale * scale, f3, padding=f3 // 2)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LR ``(N, C, H, W)`` -> SR ``(N, C, scale*H, scale*W)``, not clamped."""
        x = torch.tanh(self.conv_1(x))
        x = torch.tanh(self.conv_2(x))
        return self.shuffle(self.conv_3(x))


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: LR input; the halo is the sum of the kernels' half-widths (in LR pixels)."""
    scale = require_scale("espcn", hparams)
    channels = int(hparams.get("channels", 3))
    halo = sum(int(hparams.get(k, d)) // 2 for k, d in (("f1", 5), ("f2", 3), ("f3", 3)))
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space=ycbcr_or_y(channels),
        input_upsampled=False,
        receptive_halo=halo,
        tile_hint=None,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise ``conv_1``/``conv_2``/``conv_3``; infer channels, widths, kernels and the scale from the shapes."""
    w1, w2, w3 = (conv_shape(state_dict, f"conv_{i}.weight") for i in (1, 2, 3))
    if w1 is None or w2 is None or w3 is None or w1[1] not in (1, 3):
        return None
    f1, f2, f3 = square_kernel(w1), square_kernel(w2), square_kernel(w3)
    channels = w1[1]
    scale = math.isqrt(w3[0] // channels)
    if f1 is None or f2 is None or f3 is None or scale < 1 or scale * scale * channels != w3[0]:
        return None
    hparams: dict[str, Any] = {
        "scale": scale, "channels": channels, "n1": w1[0], "n2": w2[0], "f1": f1, "f2": f2, "f3": f3
    }  # fmt: skip
    return confirm_layout(ESPCN, hparams, state_dict)


ARCH = Architecture(
    name="espcn",
    build=ESPCN,
    info=info,
    detect=detect,
    variants={},
    paper=(
        "W. Shi, J. Caballero, F. Huszar, J. Totz, A. P. Aitken, R. Bishop, D. Rueckert, Z. Wang, Real-Time Single "
        "Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network, CVPR 2016 "
        "(arXiv:1609.05158)"
    ),
)
