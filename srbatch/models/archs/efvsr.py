"""EFVSR: a small sliding-window video SR network with early fusion of the frames t-r .. t+r (VESPCN-style, without
the motion-compensation module).

The ``T = 2 * radius + 1`` LR frames are stacked on the channel axis and fused by the first 3x3 convolution; a few
residual blocks (conv 3x3 - ReLU - conv 3x3, identity skip), a 3x3 convolution to ``C * scale^2`` channels and a
pixel shuffle give the residual added to the bilinearly upscaled centre frame::

    x (N, T, C, H, W) -> reshape (N, T*C, H, W) -> head conv3x3 -> ReLU -> n_blocks x [x + conv(relu(conv(x)))]
      -> tail conv3x3 (C*s^2) -> pixel shuffle (s) -> + bilinear_upscale(x[:, radius])   (align_corners=False)

Why this design: it trains in minutes on two CPU cores (about 0.1 M parameters at the defaults), it is local (every
output pixel depends only on a bounded LR neighbourhood in every frame, so tiles cut identically across the frames
match the untiled output) and the per-frame baseline of the same size is the same builder with ``radius=0``
(only the head's input channels differ). Without explicit alignment it relies on the receptive field
(``2 + 2 * n_blocks`` convolutions, i.e. +-10 LR pixels at the defaults) to match content that moved between frames:
adequate for the slow sub-pixel motion of typical footage, not for large motion (EDVR/TDAN-style deformable
alignment would be the next step).

Input forms (all in ``[0, 1]``, zero 'same' padding):

- ``(N, T, C, H, W)``: the frame window, centre frame ``x[:, radius]``;
- ``(N, T*C, H, W)``: the same window packed on the channel axis (frame-major); this is how the inference engine
  tiles it, every tile cut at the same place in all frames;
- ``(N, C, H, W)``: one frame, repeated ``T`` times (a still image; what the registry smoke tests feed).

Key layout (ours): ``head``, ``blocks.{i}.conv1``, ``blocks.{i}.conv2``, ``tail`` (``.weight``/``.bias``). Channels,
radius, width, depth and scale are inferred: ``head`` in = ``T * C``, ``tail`` out = ``C * scale^2`` (``3 k^2`` is
never a square, so C is unambiguous).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
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
    positive_int,
    require_scale,
)

__all__ = ["ARCH", "EFVSR", "VARIANTS", "detect", "efvsr_frame", "efvsr_r1", "info"]


class _Block(nn.Module):
    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_feats, n_feats, 3, padding=1)
        self.conv2 = nn.Conv2d(n_feats, n_feats, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class EFVSR(nn.Module):
    """Early-fusion video SR for an integer ``scale``: frames ``t-radius .. t+radius`` -> the centre frame upscaled,
    ``(N, C, scale*H, scale*W)``, not clamped. ``radius=0`` is the per-frame (single-image) model of the same size.

    ``channels`` is 3 (RGB) or 1 (grey/Y, colour space ``L``).
    """

    def __init__(
        self, *, scale: int, channels: int = 3, radius: int = 1, n_feats: int = 32, n_blocks: int = 4
    ) -> None:
        super().__init__()
        self.scale = scale = require_scale("efvsr", {"scale": scale})
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ConfigError(f"efvsr: `channels` must be 1 (grey) or 3 (RGB); got {channels!r}")
        self.channels = channels
        self.radius = positive_int("efvsr", "radius", radius, minimum=0)
        self.frames = 2 * self.radius + 1
        n_feats = positive_int("efvsr", "n_feats", n_feats)
        n_blocks = positive_int("efvsr", "n_blocks", n_blocks, minimum=0)
        self.head = nn.Conv2d(self.frames * channels, n_feats, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(n_feats) for _ in range(n_blocks)])
        self.tail = nn.Conv2d(n_feats, channels * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        with torch.no_grad():  # start close to the bilinear upscale of the centre frame (a small residual)
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Any accepted input form -> the packed ``(N, T*C, H, W)`` window; a :class:`ConfigError` otherwise."""
        t, c = self.frames, self.channels
        if x.ndim == 5 and x.shape[1] == t and x.shape[2] == c:
            return x.flatten(1, 2)
        if x.ndim == 4 and x.shape[1] == t * c:
            return x
        if x.ndim == 4 and x.shape[1] == c:
            return x.repeat(1, t, 1, 1)
        raise ConfigError(
            f"efvsr (radius {self.radius}, {c} channel(s)) expects (N, {t}, {c}, H, W) frames, (N, {t * c}, H, W) "
            f"packed frames or one (N, {c}, H, W) frame; got {tuple(x.shape)}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Frames -> SR centre frame ``(N, C, scale*H, scale*W)``."""
        x = self.pack(x)
        c, r = self.channels, self.radius
        centre = x[:, r * c : (r + 1) * c]
        f = F.relu(self.head(x))
        f = self.blocks(f)
        res = self.shuffle(self.tail(f))
        if self.scale == 1:
            return centre + res
        return F.interpolate(centre, scale_factor=self.scale, mode="bilinear", align_corners=False) + res


VARIANTS: dict[str, dict[str, Any]] = {
    "efvsr-r1": {"radius": 1, "n_feats": 32, "n_blocks": 4},
    "efvsr-frame": {"radius": 0, "n_feats": 32, "n_blocks": 4},
}
"""``efvsr-r1``: frames t-1, t, t+1; ``efvsr-frame``: the same network on one frame (the per-frame baseline)."""


def efvsr_r1(*, scale: int = 4, channels: int = 3) -> EFVSR:
    """The temporal model: frames t-1, t, t+1, 32 features, 4 residual blocks."""
    return EFVSR(scale=scale, channels=channels, **VARIANTS["efvsr-r1"])


def efvsr_frame(*, scale: int = 4, channels: int = 3) -> EFVSR:
    """The per-frame baseline of the same size (``radius=0``)."""
    return EFVSR(scale=scale, channels=channels, **VARIANTS["efvsr-frame"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """LR input; halo = one pixel per 3x3 convolution plus one for the bilinear upscale; ``temporal_radius``."""
    scale = require_scale("efvsr", hparams)
    channels = int(hparams.get("channels", 3))
    n_blocks = int(hparams.get("n_blocks", 4))
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space="RGB" if channels == 3 else "L",
        input_upsampled=False,
        receptive_halo=2 + 2 * n_blocks + 1,
        tile_hint=None,
        temporal_radius=int(hparams.get("radius", 1)),
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise ``head``/``blocks.*``/``tail``; infer channels, radius, width, depth and scale from the shapes."""
    head, tail = conv_shape(state_dict, "head.weight"), conv_shape(state_dict, "tail.weight")
    if head is None or tail is None or head[2:] != (3, 3) or tail[2:] != (3, 3):
        return None
    n_blocks = numbered_children(state_dict, "blocks.")
    if n_blocks is None:
        return None
    for channels in (3, 1):
        scale = math.isqrt(tail[0] // channels)
        if tail[0] % channels or scale < 1 or scale * scale * channels != tail[0]:
            continue
        if head[1] % channels or (head[1] // channels) % 2 == 0:
            continue
        hparams: dict[str, Any] = {"scale": scale, "channels": channels, "radius": (head[1] // channels - 1) // 2,
                                   "n_feats": head[0], "n_blocks": n_blocks}  # fmt: skip
        return confirm_layout(EFVSR, hparams, state_dict)
    return None


ARCH = Architecture(
    name="efvsr",
    build=EFVSR,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "early fusion after J. Caballero, C. Ledig, A. Aitken, A. Acosta, J. Totz, Z. Wang, W. Shi, Real-Time Video "
        "Super-Resolution with Spatio-Temporal Networks and Motion Compensation (VESPCN), CVPR 2017 "
        "(arXiv:1611.05250); srbatch's small residual variant, no motion compensation"
    ),
)
