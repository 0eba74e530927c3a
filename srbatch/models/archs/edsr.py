"""EDSR and EDSR-baseline (Lim et al., CVPRW 2017) in the key layout of the official EDSR-PyTorch release.

Layout (``sanghyun-son/EDSR-PyTorch``, ``src/model/edsr.py``):

- ``sub_mean`` / ``add_mean``: 1x1 "MeanShift" convolutions that subtract / add the DIV2K mean times ``rgb_range``;
- ``head.0``: 3x3 conv, colours -> ``n_feats``;
- ``body.{i}.body.0`` / ``body.{i}.body.2``: the two convs of residual block ``i`` (ReLU between, output scaled by
  ``res_scale``); ``body.{n_resblocks}``: the conv closing the trunk (a long skip goes around the body);
- ``tail.0.{2j}``: upsampler convs (``4 * n_feats`` outputs + pixel shuffle x2 each, or one ``9 * n_feats`` conv for
  x3); ``tail.1``: 3x3 conv back to colours.

The official network works on pixel values in ``0..rgb_range`` (255); this module takes and returns ``[0, 1]`` and
converts inside. Official checkpoints sometimes lack the MeanShift tensors: :func:`detect` fills them with the
defaults the official code initialises them with (they are never trained).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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

__all__ = ["ARCH", "EDSR", "VARIANTS", "MeanShift", "ResBlock", "detect", "edsr", "edsr_baseline", "info"]

DIV2K_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)
"""RGB mean of DIV2K used by the official MeanShift layers."""

_DEFAULTS: dict[str, Any] = {"scale": 4, "n_resblocks": 16, "n_feats": 64, "res_scale": None, "rgb_range": 255.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "edsr": {"n_resblocks": 32, "n_feats": 256, "res_scale": 0.1},
    "edsr-baseline": {"n_resblocks": 16, "n_feats": 64, "res_scale": 1.0},
}


def default_res_scale(n_feats: int) -> float:
    """The residual scaling the authors trained with: 0.1 for the 256-feature EDSR, 1 for everything else.

    It changes the output but cannot be read from tensor shapes, so :func:`detect` uses this rule.
    """
    return 0.1 if n_feats >= 256 else 1.0


class MeanShift(nn.Conv2d):
    """A frozen 1x1 conv adding ``sign * rgb_range * mean`` to each RGB channel (official key names)."""

    def __init__(self, rgb_range: float, sign: int, mean: tuple[float, ...] = DIV2K_MEAN) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(mean))
        for p in self.parameters():
            p.requires_grad_(False)


class ResBlock(nn.Module):
    """conv -> ReLU -> conv, scaled by ``res_scale``, plus identity (keys ``body.0``, ``body.2``)."""

    def __init__(self, n_feats: int, res_scale: float, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.body = nn.Sequential(
            nn.Conv2d(n_feats, n_feats, kernel_size, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(n_feats, n_feats, kernel_size, padding=pad),
        )
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul(self.res_scale) + x


def upsampler(scale: int, n_feats: int) -> nn.Sequential:
    """The EDSR/MDSR upsampler: ``log2(scale)`` x (conv to ``4 * n_feats``, pixel shuffle x2), or one x3 step."""
    layers: list[nn.Module] = []
    if scale == 3:
        layers += [nn.Conv2d(n_feats, 9 * n_feats, 3, padding=1), nn.PixelShuffle(3)]
    elif scale >= 2 and scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(n_feats, 4 * n_feats, 3, padding=1), nn.PixelShuffle(2)]
    else:
        raise ConfigError(f"EDSR/MDSR support scale 2, 3, 4, 8, ... (3 or a power of two); got scale={scale}")
    return nn.Sequential(*layers)


def upsampler_scale(state_dict: StateDict, prefix: str, n_feats: int) -> int | None:
    """Scale of an :func:`upsampler` stored under ``prefix`` (e.g. ``tail.0.``), from its convs; None if malformed."""
    convs = sorted(
        int(k[len(prefix) :].split(".")[0])
        for k in state_dict
        if k.startswith(prefix) and k.endswith(".weight") and k[len(prefix) :].split(".")[0].isdigit()
    )
    if not convs or convs != list(range(0, 2 * len(convs), 2)):
        return None
    weights = [state_dict[f"{prefix}{i}.weight"] for i in convs]
    if not all(isinstance(w, torch.Tensor) and w.ndim == 4 for w in weights):
        return None
    outs = [int(w.shape[0]) for w in weights]
    if len(convs) == 1 and outs[0] == 9 * n_feats:
        return 3
    if all(o == 4 * n_feats for o in outs):
        return 2 ** len(convs)
    return None


def upsampler_halo(scale: int) -> float:
    """Receptive-field radius (input pixels) added by :func:`upsampler` followed by one 3x3 conv at output size."""
    steps = [3] if scale == 3 else [2] * int(math.log2(scale))
    radius, res = 0.0, 1
    for s in steps:
        radius += 1 / res  # the conv runs before the shuffle, at the current resolution
        res *= s
    return radius + 1 / res


class EDSR(nn.Module):
    """Enhanced Deep Super-Resolution network (RGB, ``[0, 1]`` in and out, ``rgb_range`` inside).

    Args:
        scale: upscaling factor (2, 3, 4, 8).
        n_resblocks: residual blocks in the trunk (32 for EDSR, 16 for the baseline).
        n_feats: feature channels (256 for EDSR, 64 for the baseline).
        res_scale: residual scaling; None picks the authors' value for ``n_feats`` (:func:`default_res_scale`).
        rgb_range: pixel range the weights were trained on (255 for the official checkpoints).
    """

    def __init__(
        self,
        *,
        scale: int = 4,
        n_resblocks: int = 16,
        n_feats: int = 64,
        res_scale: float | None = None,
        rgb_range: float = 255.0,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.rgb_range = float(rgb_range)
        res_scale = default_res_scale(n_feats) if res_scale is None else float(res_scale)
        self.sub_mean = MeanShift(self.rgb_range, sign=-1)
        self.add_mean = MeanShift(self.rgb_range, sign=1)
        self.head = nn.Sequential(nn.Conv2d(3, n_feats, 3, padding=1))
        self.body = nn.Sequential(
            *[ResBlock(n_feats, res_scale) for _ in range(n_resblocks)], nn.Conv2d(n_feats, n_feats, 3, padding=1)
        )
        self.tail = nn.Sequential(upsampler(scale, n_feats), nn.Conv2d(n_feats, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.sub_mean(x * self.rgb_range))
        x = self.body(x) + x
        return self.add_mean(self.tail(x)) / self.rgb_range


def edsr(*, scale: int = 4, rgb_range: float = 255.0) -> EDSR:
    """EDSR as published: 32 blocks, 256 features, residual scaling 0.1."""
    return EDSR(scale=scale, rgb_range=rgb_range, **VARIANTS["edsr"])


def edsr_baseline(*, scale: int = 4, rgb_range: float = 255.0) -> EDSR:
    """EDSR-baseline: 16 blocks, 64 features, no residual scaling."""
    return EDSR(scale=scale, rgb_range=rgb_range, **VARIANTS["edsr-baseline"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: RGB in/out, any input size; halo = the trunk's exact receptive-field radius, rounded up + 2."""
    hp = {**_DEFAULTS, **hparams}
    scale, n, feats = int(hp["scale"]), int(hp["n_resblocks"]), int(hp["n_feats"])
    radius = 1 + 2 * n + 1 + upsampler_halo(scale)  # head, blocks, trunk conv, upsampler + tail
    return ArchInfo(
        scale=scale,
        in_channels=3,
        out_channels=3,
        color_space="RGB",
        size_multiple=1,
        receptive_halo=math.ceil(radius) + 2,
        tile_hint=192 if feats >= 256 else 384,
    )


def fill_mean_shift(state_dict: StateDict, rgb_range: float = 255.0) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with ``sub_mean`` / ``add_mean`` added (official defaults) where they are missing."""
    out = dict(state_dict)
    for name, sign in (("sub_mean", -1), ("add_mean", 1)):
        if f"{name}.weight" not in out and f"{name}.bias" not in out:
            ms = MeanShift(rgb_range, sign=sign)
            out[f"{name}.weight"] = ms.weight.detach().clone()
            out[f"{name}.bias"] = ms.bias.detach().clone()
    return out


def infer_rgb_range(state_dict: StateDict) -> float:
    """``rgb_range`` from a stored ``sub_mean.bias`` (= -rgb_range * mean); 255 when absent, implausible or not
    readable (a meta tensor). EDSR and SRFBN share the official MeanShift and this rule."""
    bias = state_dict.get("sub_mean.bias")
    if isinstance(bias, torch.Tensor) and bias.shape == (3,) and bias.device.type != "meta":
        value = -float(bias[0]) / DIV2K_MEAN[0]
        for candidate in (255.0, 1.0):
            if abs(value - candidate) < 1e-3 * candidate:
                return candidate
    return 255.0


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise an official EDSR / EDSR-baseline state dict; infer every hyper-parameter from the tensors.

    ``res_scale`` cannot be inferred from shapes: it defaults to :func:`default_res_scale`. Missing MeanShift
    tensors are filled with the official defaults. Returns None for any other layout (MDSR, RCAN, ...).
    """
    head = conv_shape(state_dict, "head.0.weight")
    if head is None or head[1] != 3:
        return None
    n_feats = head[0]
    trunk = numbered_children(state_dict, "body.")  # n_resblocks blocks and the conv closing the trunk
    scale = upsampler_scale(state_dict, "tail.0.", n_feats)
    if not trunk or scale is None:
        return None
    rgb_range = infer_rgb_range(state_dict)
    hparams: dict[str, Any] = {
        "scale": scale,
        "n_resblocks": trunk - 1,
        "n_feats": n_feats,
        "res_scale": default_res_scale(n_feats),
        "rgb_range": rgb_range,
    }
    return confirm_layout(EDSR, hparams, fill_mean_shift(state_dict, rgb_range))


ARCH = Architecture(
    name="edsr",
    build=EDSR,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "B. Lim, S. Son, H. Kim, S. Nah, K. M. Lee. Enhanced Deep Residual Networks for Single Image "
        "Super-Resolution. CVPR Workshops (NTIRE), 2017. arXiv:1707.02921"
    ),
)
