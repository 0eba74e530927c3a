"""VDSR (Kim et al.): a deep plain network (20 3x3 convolutions, 64 features, no bias, ReLU) with a global residual.

It takes the bicubic-upscaled image and predicts the residual to add to it; one network serves every scale, so
``scale`` only describes the job (the loader fills it from the user's ``--scale``; :func:`detect` returns None for it).

Key layouts recognised:

- ours and twtygqyy/pytorch-vdsr's current ``vdsr.py``: ``input.weight``, ``residual_layer.{i}.conv.weight``,
  ``output.weight``;
- twtygqyy's earlier single ``nn.Sequential``: ``features.{0, 2, ..., 2L-2}.weight`` (remapped to ours).

Colour convention (twtygqyy ``eval.py``): the input is the Y channel of MATLAB ``rgb2ycbcr`` of the
MATLAB-bicubic-upscaled LR image divided by 255, the output is Y in the same range (``color_space="Y"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
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
)

__all__ = ["ARCH", "VDSR", "detect", "info"]


class _ConvReLU(nn.Module):
    """3x3 convolution without bias followed by ReLU (keeps the ``.conv.weight`` key of the authors' layout)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(features, features, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class VDSR(nn.Module):
    """VDSR with ``num_layers`` convolutions of ``num_features`` channels; output = input + predicted residual.

    ``num_layers`` counts every convolution (>= 2); ``scale`` is informational.
    """

    def __init__(
        self, *, scale: int | None = None, channels: int = 1, num_features: int = 64, num_layers: int = 20
    ) -> None:
        super().__init__()
        self.scale = scale
        self.channels = check_channels("vdsr", channels)
        num_features = positive_int("vdsr", "num_features", num_features)
        num_layers = positive_int("vdsr", "num_layers", num_layers, minimum=2)
        self.input = nn.Conv2d(channels, num_features, 3, padding=1, bias=False)
        self.residual_layer = nn.Sequential(*(_ConvReLU(num_features) for _ in range(num_layers - 2)))
        self.output = nn.Conv2d(num_features, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bicubic-upscaled ``(N, C, H, W)`` in [0, 1] -> ``(N, C, H, W)``, not clamped."""
        return x + self.output(self.residual_layer(F.relu(self.input(x))))


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: bicubic-upscaled Y in and out; the halo is one pixel per layer."""
    scale = require_scale("vdsr", hparams)
    channels = int(hparams.get("channels", 1))
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space="Y" if channels == 1 else "RGB",
        input_upsampled=True,
        receptive_halo=int(hparams.get("num_layers", 20)),
        tile_hint=512,
    )


_SEQ_KEY = re.compile(r"features\.(\d+)\.weight")


def _from_sequential(sd: StateDict) -> dict[str, torch.Tensor] | None:
    """Remap ``features.{2i}.weight`` (conv, ReLU, conv, ReLU, ..., conv) to our key names; None if not that layout."""
    idx: list[int] = []
    for k in sd:
        match = _SEQ_KEY.fullmatch(k)
        if match is None:
            return None
        idx.append(int(match.group(1)))
    idx.sort()
    if len(idx) < 2 or idx != list(range(0, 2 * len(idx), 2)):
        return None
    out = {"input.weight": sd["features.0.weight"], "output.weight": sd[f"features.{idx[-1]}.weight"]}
    for j, i in enumerate(idx[1:-1]):
        out[f"residual_layer.{j}.conv.weight"] = sd[f"features.{i}.weight"]
    return out


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise VDSR in either layout; infer channels, features and depth. ``scale`` is left None."""
    sd = dict(state_dict) if "input.weight" in state_dict else _from_sequential(state_dict)
    w_in = None if sd is None else conv_shape(sd, "input.weight")
    if sd is None or w_in is None:
        return None
    hparams: dict[str, Any] = {
        "scale": None,
        "channels": w_in[1],
        "num_features": w_in[0],
        "num_layers": 2 + sum(1 for k in sd if k.startswith("residual_layer.")),
    }
    return confirm_layout(VDSR, hparams, sd)


ARCH = Architecture(
    name="vdsr",
    build=VDSR,
    info=info,
    detect=detect,
    variants={},
    paper=(
        "J. Kim, J. K. Lee, K. M. Lee, Accurate Image Super-Resolution Using Very Deep Convolutional Networks, "
        "CVPR 2016 (arXiv:1511.04587)"
    ),
)
