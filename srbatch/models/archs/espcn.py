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

from srbatch.errors import ConfigError
from srbatch.models.archs._classic import (
    check_channels,
    color_space,
    conv_shape,
    positive_int,
    require_scale,
    same_layout,
    square_kernel,
)
from srbatch.models.descriptor import ArchInfo
from srbatch.models.registry import Architecture, Detection, StateDict

__all__ = ["ARCH", "ESPCN", "build", "detect", "info"]


class ESPCN(nn.Module):
    """ESPCN for an integer ``scale``: ``(N, C, H, W)`` in [0, 1] -> ``(N, C, scale*H, scale*W)``."""

    def __init__(
        self, *, scale: int, channels: int = 3, n1: int = 64, n2: int = 32, f1: int = 5, f2: int = 3, f3: int = 3
    ) -> None:
        super().__init__()
        self.scale = scale
        self.channels = channels
        self.conv_1 = nn.Conv2d(channels, n1, f1, padding=f1 // 2)
        self.conv_2 = nn.Conv2d(n1, n2, f2, padding=f2 // 2)
        self.conv_3 = nn.Conv2d(n2, channels * scale * scale, f3, padding=f3 // 2)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LR ``(N, C, H, W)`` -> SR ``(N, C, scale*H, scale*W)``, not clamped."""
        x = torch.tanh(self.conv_1(x))
        x = torch.tanh(self.conv_2(x))
        return self.shuffle(self.conv_3(x))


def build(
    *, scale: int, channels: int = 3, n1: int = 64, n2: int = 32, f1: int = 5, f2: int = 3, f3: int = 3
) -> ESPCN:
    """An :class:`ESPCN`; kernel sizes must be odd (zero 'same' padding)."""
    scale = require_scale("espcn", {"scale": scale})
    check_channels("espcn", channels)
    n1, n2 = positive_int("espcn", "n1", n1), positive_int("espcn", "n2", n2)
    for name, k in (("f1", f1), ("f2", f2), ("f3", f3)):
        if positive_int("espcn", name, k) % 2 == 0:
            raise ConfigError(f"espcn: `{name}` must be odd; got {k}")
    return ESPCN(scale=scale, channels=channels, n1=n1, n2=n2, f1=f1, f2=f2, f3=f3)


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: LR input; the halo is the sum of the kernels' half-widths (in LR pixels)."""
    scale = require_scale("espcn", hparams)
    channels = int(hparams.get("channels", 3))
    halo = sum(int(hparams.get(k, d)) // 2 for k, d in (("f1", 5), ("f2", 3), ("f3", 3)))
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space=color_space(channels),
        input_upsampled=False,
        receptive_halo=halo,
        tile_hint=None,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise ``conv_1``/``conv_2``/``conv_3``; infer channels, widths, kernels and the scale from the shapes."""
    w1, w2, w3 = (conv_shape(state_dict, f"conv_{i}.weight") for i in (1, 2, 3))
    if w1 is None or w2 is None or w3 is None or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return None
    f1, f2, f3 = square_kernel(w1), square_kernel(w2), square_kernel(w3)
    channels, n1, n2 = w1[1], w1[0], w2[0]
    if f1 is None or f2 is None or f3 is None or channels not in (1, 3) or w3[0] % channels:
        return None
    scale = math.isqrt(w3[0] // channels)
    if scale < 1 or scale * scale * channels != w3[0]:
        return None
    hparams: dict[str, Any] = {"scale": scale, "channels": channels, "n1": n1, "n2": n2, "f1": f1, "f2": f2, "f3": f3}
    with torch.device("meta"):
        ref = ESPCN(**hparams)
    if not same_layout(ref, state_dict):
        return None
    return Detection(hparams=hparams, state_dict=dict(state_dict))


ARCH = Architecture(
    name="espcn",
    build=build,
    info=info,
    detect=detect,
    variants={},
    paper=(
        "W. Shi, J. Caballero, F. Huszar, J. Totz, A. P. Aitken, R. Bishop, D. Rueckert, Z. Wang, Real-Time Single "
        "Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network, CVPR 2016 "
        "(arXiv:1609.05158)"
    ),
)
