"""MDSR, the multi-scale EDSR (Lim et al., CVPRW 2017), in the key layout of the official EDSR-PyTorch release.

Layout (``sanghyun-son/EDSR-PyTorch``, ``src/model/mdsr.py``): ``sub_mean`` / ``add_mean`` (MeanShift), ``head.0``,
``pre_process.{b}.{0,1}.body.{0,2}`` (two residual blocks of 5x5 convs per scale branch ``b``), a shared trunk
``body.{i}.body.{0,2}`` closed by ``body.{n_resblocks}``, ``upsample.{b}.{2j}`` (upsampler convs per branch) and a
shared ``tail.0``.

One module holds every branch; the ``scale`` hyper-parameter picks the branch :meth:`MDSR.forward` runs (it must be one
of ``scales``). It changes no tensor, so :func:`detect` picks 4 when available, else the largest scale, and the loader
may rebuild the module with the scale the user asked for (``build(**{**hparams, "scale": s})`` with the same weights).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.models.arch_api import (
    ArchInfo,
    Architecture,
    Detection,
    StateDict,
    confirm_layout,
    conv_shape,
    numbered_children,
)
from srbatch.models.archs.edsr import (
    MeanShift,
    ResBlock,
    fill_mean_shift,
    infer_rgb_range,
    upsampler,
    upsampler_halo,
    upsampler_scale,
)

__all__ = ["ARCH", "MDSR", "VARIANTS", "default_scale", "detect", "info", "mdsr", "mdsr_baseline"]

_DEFAULTS: dict[str, Any] = {"scales": (2, 3, 4), "scale": None, "n_resblocks": 16, "n_feats": 64, "rgb_range": 255.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "mdsr": {"scales": [2, 3, 4], "n_resblocks": 80, "n_feats": 64},
    "mdsr-baseline": {"scales": [2, 3, 4], "n_resblocks": 16, "n_feats": 64},
}


def default_scale(scales: Sequence[int]) -> int:
    """The branch used when none is asked for: 4 if the model has it, else its largest scale."""
    return 4 if 4 in scales else max(scales)


class MDSR(nn.Module):
    """Multi-scale deep super-resolution network (RGB, ``[0, 1]`` in and out, ``rgb_range`` inside).

    Args:
        scales: the scale of each branch, in the checkpoint's branch order (official: 2, 3, 4).
        scale: the branch the forward pass uses; None -> :func:`default_scale`.
        n_resblocks: residual blocks in the shared trunk (80 for MDSR, 16 for the baseline).
        n_feats: feature channels (64).
        rgb_range: pixel range the weights were trained on (255 for the official checkpoints).
    """

    def __init__(
        self,
        *,
        scales: Sequence[int] = (2, 3, 4),
        scale: int | None = None,
        n_resblocks: int = 16,
        n_feats: int = 64,
        rgb_range: float = 255.0,
    ) -> None:
        super().__init__()
        self.scales = [int(s) for s in scales]
        if not self.scales:
            raise ConfigError("MDSR needs at least one scale branch; got scales=[]")
        self.scale = default_scale(self.scales) if scale is None else int(scale)
        if self.scale not in self.scales:
            raise ConfigError(f"MDSR scale {self.scale} is not one of its branches {self.scales}; pick one of those")
        self.scale_idx = self.scales.index(self.scale)
        self.rgb_range = float(rgb_range)
        self.sub_mean = MeanShift(self.rgb_range, sign=-1)
        self.add_mean = MeanShift(self.rgb_range, sign=1)
        self.head = nn.Sequential(nn.Conv2d(3, n_feats, 3, padding=1))
        self.pre_process = nn.ModuleList(
            [nn.Sequential(ResBlock(n_feats, 1.0, 5), ResBlock(n_feats, 1.0, 5)) for _ in self.scales]
        )
        self.body = nn.Sequential(
            *[ResBlock(n_feats, 1.0) for _ in range(n_resblocks)], nn.Conv2d(n_feats, n_feats, 3, padding=1)
        )
        self.upsample = nn.ModuleList([upsampler(s, n_feats) for s in self.scales])
        self.tail = nn.Sequential(nn.Conv2d(n_feats, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x * self.rgb_range))
        x = self.pre_process[self.scale_idx](x)
        x = self.body(x) + x
        x = self.tail(self.upsample[self.scale_idx](x))
        return self.add_mean(x) / self.rgb_range


def mdsr(*, scale: int | None = None, rgb_range: float = 255.0) -> MDSR:
    """MDSR as published: branches x2/x3/x4, 80 shared residual blocks, 64 features."""
    return MDSR(scale=scale, rgb_range=rgb_range, **VARIANTS["mdsr"])


def mdsr_baseline(*, scale: int | None = None, rgb_range: float = 255.0) -> MDSR:
    """MDSR-baseline: branches x2/x3/x4, 16 shared residual blocks, 64 features."""
    return MDSR(scale=scale, rgb_range=rgb_range, **VARIANTS["mdsr-baseline"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts for the selected branch; halo = exact receptive-field radius of that branch, rounded up + 2."""
    hp = {**_DEFAULTS, **hparams}
    scales = [int(s) for s in hp["scales"]]
    scale = default_scale(scales) if hp["scale"] is None else int(hp["scale"])
    # head 3x3, two 5x5 residual blocks (4 convs of radius 2), trunk, trunk conv, upsampler + tail.
    radius = 1 + 4 * 2 + 2 * int(hp["n_resblocks"]) + 1 + upsampler_halo(scale)
    return ArchInfo(
        scale=scale,
        in_channels=3,
        out_channels=3,
        color_space="RGB",
        size_multiple=1,
        receptive_halo=math.ceil(radius) + 2,
        tile_hint=384,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise an official MDSR state dict: scales from the ``upsample`` branches, sizes from shapes.

    The returned ``scale`` is :func:`default_scale` of the branches; callers may override it.
    """
    head = conv_shape(state_dict, "head.0.weight")
    if head is None or head[1] != 3:
        return None
    if "pre_process.0.0.body.0.weight" not in state_dict:
        return None
    n_feats = head[0]
    branches = numbered_children(state_dict, "upsample.")
    trunk = numbered_children(state_dict, "body.")  # n_resblocks blocks and the conv closing the trunk
    if not branches or not trunk:
        return None
    found = [upsampler_scale(state_dict, f"upsample.{b}.", n_feats) for b in range(branches)]
    scales = [s for s in found if s is not None]
    if len(scales) != branches:
        return None
    rgb_range = infer_rgb_range(state_dict)
    hparams: dict[str, Any] = {
        "scales": scales,
        "scale": default_scale(scales),
        "n_resblocks": trunk - 1,
        "n_feats": n_feats,
        "rgb_range": rgb_range,
    }
    return confirm_layout(MDSR, hparams, fill_mean_shift(state_dict, rgb_range))


ARCH = Architecture(
    name="mdsr",
    build=MDSR,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "B. Lim, S. Son, H. Kim, S. Nah, K. M. Lee. Enhanced Deep Residual Networks for Single Image "
        "Super-Resolution (MDSR, the multi-scale model). CVPR Workshops (NTIRE), 2017. arXiv:1707.02921"
    ),
)
