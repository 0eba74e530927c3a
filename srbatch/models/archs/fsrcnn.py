"""FSRCNN (Dong et al.): feature extraction, shrinking, mapping, expanding on the LR image, then a 9x9 deconvolution.

Key layout (ours and Nhat-Thanh/FSRCNN-Pytorch's ``neuralnet.py``, which are the same): ``feature_extract`` (5x5),
``activation_1`` (PReLU, per channel), ``shrink`` (1x1), ``activation_2``, ``map_1`` .. ``map_m`` (3x3),
``activation_3``, ``expand`` (1x1), ``activation_4``, ``deconv`` (``ConvTranspose2d`` 9x9, stride = scale, padding 4,
output_padding = scale - 1, so the output is exactly ``scale`` x the input).

As in those checkpoints, the ``m`` mapping convolutions are linear with a single PReLU after the last one (the paper
puts a PReLU after each); convolutions use zero 'same' padding as upstream.

The deconvolution kernel is 9x9 for every scale, so ``scale`` cannot be read from the weights: :func:`detect` returns
``"scale": None`` and the loader fills it from the user's ``--scale``.

Colour convention: 3-channel models (the Nhat-Thanh checkpoints) work on YCbCr in [0, 1] (``color_space="YCbCr"``,
MATLAB ``rgb2ycbcr``; upstream uses a clipped full-range JFIF conversion, see :mod:`srbatch.models.archs.srcnn` for
why and by how much the two differ); 1-channel models (the paper's setting) on MATLAB Y. Output is not clamped
(upstream clips to [0, 1]).
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
    positive_int,
    require_scale,
    ycbcr_or_y,
)

__all__ = ["ARCH", "FSRCNN", "VARIANTS", "detect", "fsrcnn", "fsrcnn_s", "info"]

VARIANTS: dict[str, dict[str, Any]] = {"fsrcnn": {"d": 56, "s": 12, "m": 4}, "fsrcnn-s": {"d": 32, "s": 5, "m": 1}}


class FSRCNN(nn.Module):
    """FSRCNN(d, s, m) for an integer ``scale``: ``(N, C, H, W)`` in [0, 1] -> ``(N, C, scale*H, scale*W)``.

    ``scale`` is required (a :class:`ConfigError` says to pass ``--scale`` when it is None); ``channels`` is 1 or 3.
    """

    def __init__(self, *, scale: int | None, channels: int = 3, d: int = 56, s: int = 12, m: int = 4) -> None:
        super().__init__()
        self.scale = scale = require_scale("fsrcnn", {"scale": scale})
        self.channels = check_channels("fsrcnn", channels)
        d, s, m = positive_int("fsrcnn", "d", d), positive_int("fsrcnn", "s", s), positive_int("fsrcnn", "m", m)
        self.m = m
        self.feature_extract = nn.Conv2d(channels, d, 5, padding=2)
        self.activation_1 = nn.PReLU(d)
        self.shrink = nn.Conv2d(d, s, 1)
        self.activation_2 = nn.PReLU(s)
        for i in range(1, m + 1):
            self.add_module(f"map_{i}", nn.Conv2d(s, s, 3, padding=1))
        self.activation_3 = nn.PReLU(s)
        self.expand = nn.Conv2d(s, d, 1)
        self.activation_4 = nn.PReLU(d)
        self.deconv = nn.ConvTranspose2d(d, channels, 9, stride=scale, padding=4, output_padding=scale - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """LR ``(N, C, H, W)`` -> SR ``(N, C, scale*H, scale*W)``, not clamped."""
        x = self.activation_1(self.feature_extract(x))
        x = self.activation_2(self.shrink(x))
        for i in range(1, self.m + 1):
            x = getattr(self, f"map_{i}")(x)
        x = self.activation_3(x)
        x = self.activation_4(self.expand(x))
        return self.deconv(x)


def fsrcnn(*, scale: int | None, channels: int = 3) -> FSRCNN:
    """FSRCNN as published: d = 56, s = 12, m = 4."""
    return FSRCNN(scale=scale, channels=channels, **VARIANTS["fsrcnn"])


def fsrcnn_s(*, scale: int | None, channels: int = 3) -> FSRCNN:
    """FSRCNN-s, the small model: d = 32, s = 5, m = 1."""
    return FSRCNN(scale=scale, channels=channels, **VARIANTS["fsrcnn-s"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: LR input, output ``scale`` x larger; halo = 5x5 + m 3x3 convs + the deconv's reach."""
    scale = require_scale("fsrcnn", hparams)
    channels = int(hparams.get("channels", 3))
    m = int(hparams.get("m", 4))
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space=ycbcr_or_y(channels),
        input_upsampled=False,
        receptive_halo=2 + m + math.ceil(4 / scale),
        tile_hint=None,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise the Nhat-Thanh/srbatch layout, inferring channels, d, s and m; ``scale`` is left None."""
    fe, sh = conv_shape(state_dict, "feature_extract.weight"), conv_shape(state_dict, "shrink.weight")
    if fe is None or sh is None:
        return None
    m = sum(1 for k in state_dict if k.startswith("map_") and k.endswith(".weight"))
    hparams: dict[str, Any] = {"scale": None, "channels": fe[1], "d": fe[0], "s": sh[0], "m": m}
    return confirm_layout(FSRCNN, hparams, state_dict, probe={"scale": 2})


ARCH = Architecture(
    name="fsrcnn",
    build=FSRCNN,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "C. Dong, C. C. Loy, X. Tang, Accelerating the Super-Resolution Convolutional Neural Network, "
        "ECCV 2016 (arXiv:1608.00367)"
    ),
)
