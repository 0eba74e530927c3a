"""SRCNN (Dong et al.): three convolutions on the bicubic-upscaled image, variants 9-1-5, 9-3-5 and 9-5-5.

Key layout (ours and Nhat-Thanh/SRCNN-Pytorch's ``neuralnet.py``, which are the same): ``patch_extraction``,
``nonlinear_map``, ``recon`` (``.weight``/``.bias`` each).

Colour convention. 1-channel models are the paper's setting: MATLAB Y in [0, 1] (``color_space="Y"``).
3-channel models (the Nhat-Thanh checkpoints for SRCNN, FSRCNN and ESPCN) are YCbCr models in [0, 1]
(``color_space="YCbCr"``: the engine feeds MATLAB ``rgb2ycbcr`` of the image, divided by 255, and converts back).
Upstream (``utils/common.py::rgb2ycbcr``, used by ``demo.py``/``test.py``/``utils/dataset.py``) converts with the
full-range JFIF matrix (Y = 0.299 R + 0.587 G + 0.114 B, Cb/Cr offset 128), then clips Y to [16, 235] and Cb/Cr to
[16, 240] and truncates to uint8, then divides by 255. That clip crushes highlights and shadows: measured on Set5
(MATLAB-bicubic LR, Y-PSNR with ``scale`` pixels shaved), the upstream conversion with its clip is 1.3-2.7 dB *below*
the same conversion without the clip, while MATLAB YCbCr is within 0.6 dB of the unclipped JFIF matrix (0.1 dB
better on average over the 15 scale/model pairs). MATLAB YCbCr is therefore used: it is one of srbatch's standard
colour spaces and needs no private conversion. The upstream demo's slight Gaussian blur of the LR image
(sigma 0.3/0.2, 3x3) changes no 8-bit pixel on Set5 and is not reproduced.

Padding. Upstream convolutions are *valid* (the output is ``6 + f2 // 2`` pixels smaller on each side). Here the input
is reflection-padded once by that halo (replicate when the image is smaller than the halo) and the convolutions stay
valid, so the output has the input's size and interior pixels equal the upstream network's output exactly. This beats
per-layer zero 'same' padding by 0.0-0.9 dB on Set5 (the PSNR convention shaves only ``scale`` border pixels).
Output is not clamped (upstream clips to [0, 1]; srbatch clamps when encoding).
"""

from __future__ import annotations

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
    odd_int,
    positive_int,
    require_scale,
    square_kernel,
    ycbcr_or_y,
)

__all__ = ["ARCH", "SRCNN", "VARIANTS", "detect", "info", "srcnn_915", "srcnn_935", "srcnn_955"]

VARIANTS: dict[str, dict[str, Any]] = {"srcnn-915": {"f2": 1}, "srcnn-935": {"f2": 3}, "srcnn-955": {"f2": 5}}
_LAYERS = ("patch_extraction", "nonlinear_map", "recon")


class SRCNN(nn.Module):
    """SRCNN ``f1-f2-f3`` with ``n1``/``n2`` filters; input is the bicubic-upscaled image, output the same size.

    ``scale`` is informational (SRCNN is scale-agnostic); kernel sizes must be odd, ``channels`` 1 (Y) or 3 (YCbCr).
    """

    def __init__(
        self,
        *,
        scale: int | None = None,
        channels: int = 3,
        f1: int = 9,
        f2: int = 1,
        f3: int = 5,
        n1: int = 64,
        n2: int = 32,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.channels = check_channels("srcnn", channels)
        f1, f2, f3 = (odd_int("srcnn", name, k) for name, k in (("f1", f1), ("f2", f2), ("f3", f3)))
        n1, n2 = positive_int("srcnn", "n1", n1), positive_int("srcnn", "n2", n2)
        self.halo = f1 // 2 + f2 // 2 + f3 // 2
        self.patch_extraction = nn.Conv2d(channels, n1, f1)
        self.nonlinear_map = nn.Conv2d(n1, n2, f2)
        self.recon = nn.Conv2d(n2, channels, f3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in [0, 1] (bicubic-upscaled) -> ``(N, C, H, W)``, not clamped."""
        p = self.halo
        mode = "reflect" if min(x.shape[-2:]) > p else "replicate"
        x = F.pad(x, (p, p, p, p), mode=mode)
        x = F.relu(self.patch_extraction(x))
        x = F.relu(self.nonlinear_map(x))
        return self.recon(x)


def srcnn_915(*, scale: int | None = None, channels: int = 3) -> SRCNN:
    """SRCNN 9-1-5, the paper's base network."""
    return SRCNN(scale=scale, channels=channels, **VARIANTS["srcnn-915"])


def srcnn_935(*, scale: int | None = None, channels: int = 3) -> SRCNN:
    """SRCNN 9-3-5."""
    return SRCNN(scale=scale, channels=channels, **VARIANTS["srcnn-935"])


def srcnn_955(*, scale: int | None = None, channels: int = 3) -> SRCNN:
    """SRCNN 9-5-5, the paper's best."""
    return SRCNN(scale=scale, channels=channels, **VARIANTS["srcnn-955"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts; ``scale`` must be set (the loader fills it from the user's ``--scale``)."""
    scale = require_scale("srcnn", hparams)
    channels = int(hparams.get("channels", 3))
    halo = sum(int(hparams.get(k, d)) // 2 for k, d in (("f1", 9), ("f2", 1), ("f3", 5)))
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space=ycbcr_or_y(channels),
        input_upsampled=True,
        receptive_halo=halo,
        tile_hint=512,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise the ``patch_extraction``/``nonlinear_map``/``recon`` layout; ``scale`` is left None for the caller."""
    w1, w2, w3 = (conv_shape(state_dict, f"{m}.weight") for m in _LAYERS)
    f1, f2, f3 = square_kernel(w1), square_kernel(w2), square_kernel(w3)
    if w1 is None or w2 is None or f1 is None or f2 is None or f3 is None:
        return None
    hparams: dict[str, Any] = {
        "scale": None, "channels": w1[1], "f1": f1, "f2": f2, "f3": f3, "n1": w1[0], "n2": w2[0]
    }  # fmt: skip
    return confirm_layout(SRCNN, hparams, state_dict)


ARCH = Architecture(
    name="srcnn",
    build=SRCNN,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "C. Dong, C. C. Loy, K. He, X. Tang, Image Super-Resolution Using Deep Convolutional Networks, "
        "IEEE TPAMI 38(2), 2016 (arXiv:1501.00092)"
    ),
)
