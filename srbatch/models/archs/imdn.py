"""IMDN, the information multi-distillation network (Hui et al., ACM MM 2019), in the official key layout.

Layout (``Zheng222/IMDN``, ``model/architecture.py`` class ``IMDN`` and ``model/block.py``):

- ``fea_conv``: 3x3 conv, colours -> ``nf``;
- ``IMDB1`` .. ``IMDB{num_modules}``: information multi-distillation blocks. ``c1``..``c3`` (3x3) each keep a quarter
  of their output channels (distillation rate 0.25) and pass the rest on; ``c4`` (3x3) makes the last quarter;
  the four distilled parts are concatenated, weighted by contrast-aware channel attention ``cca.conv_du.{0,2}``
  (1x1 convs, reduction 16, on per-channel std + mean), fused by ``c5`` (1x1) and added to the block input.
  LeakyReLU(0.05) after ``c1``..``c3``;
- ``c.0``: 1x1 conv fusing all block outputs (+ LeakyReLU 0.05); ``LR_conv``: 3x3 conv, plus a long skip from
  ``fea_conv``; ``upsampler.0``: 3x3 conv to ``out_nc * scale**2`` + pixel shuffle.

RGB in ``[0, 1]`` in and out (the authors' test script divides by 255). The channel attention pools over the whole
image, so a tiled output can never equal the untiled one exactly: ``receptive_halo`` only covers the convolutions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.models.arch_api import ArchInfo, Architecture, Detection, StateDict, confirm_layout, conv_shape

__all__ = ["ARCH", "IMDN", "VARIANTS", "detect", "imdn", "info"]

_DEFAULTS: dict[str, Any] = {"scale": 4, "in_nc": 3, "out_nc": 3, "nf": 64, "num_modules": 6}
VARIANTS: dict[str, dict[str, Any]] = {"imdn": {"nf": 64, "num_modules": 6}}
_SLOPE = 0.05
_DISTILLATION_RATE = 0.25
_CCA_REDUCTION = 16


class _CCALayer(nn.Module):
    """Contrast-aware channel attention: sigmoid(MLP(std + mean over H, W)) scales each channel."""

    def __init__(self, channels: int, reduction: int = _CCA_REDUCTION) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()  # population std, as upstream
        return x * self.conv_du(std + mean)


class _IMDModule(nn.Module):
    """One information multi-distillation block (official ``IMDModule``)."""

    def __init__(self, nf: int) -> None:
        super().__init__()
        self.distilled = int(nf * _DISTILLATION_RATE)
        self.remaining = nf - self.distilled
        self.c1 = nn.Conv2d(nf, nf, 3, padding=1)
        self.c2 = nn.Conv2d(self.remaining, nf, 3, padding=1)
        self.c3 = nn.Conv2d(self.remaining, nf, 3, padding=1)
        self.c4 = nn.Conv2d(self.remaining, self.distilled, 3, padding=1)
        self.act = nn.LeakyReLU(_SLOPE, inplace=True)
        self.c5 = nn.Conv2d(nf, nf, 1)
        self.cca = _CCALayer(self.distilled * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = (self.distilled, self.remaining)
        d1, r1 = torch.split(self.act(self.c1(x)), split, dim=1)
        d2, r2 = torch.split(self.act(self.c2(r1)), split, dim=1)
        d3, r3 = torch.split(self.act(self.c3(r2)), split, dim=1)
        out = torch.cat([d1, d2, d3, self.c4(r3)], dim=1)
        return self.c5(self.cca(out)) + x


class IMDN(nn.Module):
    """IMDN (``[0, 1]`` in and out, not clamped).

    Args:
        scale: upscaling factor (any integer >= 1; one pixel-shuffle layer).
        in_nc, out_nc: image channels in and out (3 for the official RGB models).
        nf: feature channels (64); must be a multiple of 4 and ``nf >= 16`` (channel attention reduction 16).
        num_modules: number of IMDB blocks (6).
    """

    def __init__(self, *, scale: int = 4, in_nc: int = 3, out_nc: int = 3, nf: int = 64, num_modules: int = 6) -> None:
        super().__init__()
        if nf < 16 or nf % 4 or num_modules < 1 or scale < 1:
            raise ConfigError(
                f"IMDN needs nf a multiple of 4 and >= 16, num_modules >= 1 and scale >= 1; "
                f"got nf={nf}, num_modules={num_modules}, scale={scale}"
            )
        self.scale, self.num_modules = scale, num_modules
        self.fea_conv = nn.Conv2d(in_nc, nf, 3, padding=1)
        for i in range(1, num_modules + 1):
            setattr(self, f"IMDB{i}", _IMDModule(nf))
        self.c = nn.Sequential(nn.Conv2d(nf * num_modules, nf, 1), nn.LeakyReLU(_SLOPE, inplace=True))
        self.LR_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.upsampler = nn.Sequential(nn.Conv2d(nf, out_nc * scale**2, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.fea_conv(x)
        outs: list[torch.Tensor] = []
        h = fea
        for i in range(1, self.num_modules + 1):
            h = getattr(self, f"IMDB{i}")(h)
            outs.append(h)
        return self.upsampler(self.LR_conv(self.c(torch.cat(outs, dim=1))) + fea)


def imdn(*, scale: int = 4) -> IMDN:
    """IMDN as published: 6 blocks, 64 features, RGB."""
    return IMDN(scale=scale, **VARIANTS["imdn"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts; halo = radius of the convolutions (4 per block + 3), rounded up + 2 (attention is global)."""
    hp = {**_DEFAULTS, **hparams}
    radius = 1 + 4 * int(hp["num_modules"]) + 1 + 1
    in_nc = int(hp["in_nc"])
    return ArchInfo(
        scale=int(hp["scale"]),
        in_channels=in_nc,
        out_channels=int(hp["out_nc"]),
        color_space="RGB" if in_nc == 3 else "L",
        size_multiple=1,
        receptive_halo=math.ceil(radius) + 2,
        # Contrast-aware channel attention pools over the whole input, so tiles cannot reproduce the untiled
        # output exactly with trained weights: run whole images by default (the engine still splits on OOM).
        tile_hint=None,
        local=False,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise an official IMDN state dict (``fea_conv``, ``IMDB{i}``, ``c.0``, ``LR_conv``, ``upsampler.0``).

    ``nf``, ``num_modules``, channels and ``scale`` (``sqrt(upsampler out / out_nc)``, with ``out_nc = in_nc``) come
    from the tensors. IMDN_AS (strided ``fea_conv``), IMDN_RTC and IMDN_RTE have other layouts and give None.
    """
    fea, up = conv_shape(state_dict, "fea_conv.weight"), conv_shape(state_dict, "upsampler.0.weight")
    if fea is None or up is None or fea[1] < 1:
        return None
    nf, in_nc = fea[0], fea[1]
    scale = math.isqrt(up[0] // in_nc)
    if scale < 1 or in_nc * scale**2 != up[0]:
        return None
    num_modules = len({int(m.group(1)) for k in state_dict if (m := re.match(r"IMDB(\d+)\.", k))})
    hparams: dict[str, Any] = {"scale": scale, "in_nc": in_nc, "out_nc": in_nc, "nf": nf, "num_modules": num_modules}
    return confirm_layout(IMDN, hparams, state_dict)


ARCH = Architecture(
    name="imdn",
    build=IMDN,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "Z. Hui, X. Gao, Y. Yang, X. Wang. Lightweight Image Super-Resolution with Information Multi-distillation "
        "Network. ACM Multimedia 2019. arXiv:1909.11856"
    ),
)
