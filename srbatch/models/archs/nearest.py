"""Nearest-neighbour upscaling (pixel replication), weight-free: a near-zero-cost model for throughput ceilings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srbatch.models.arch_api import ArchInfo, Architecture, positive_int
from srbatch.models.archs.bicubic import detect, interpolation_info

__all__ = ["ARCH", "Nearest", "detect", "info"]


class Nearest(nn.Module):
    """Each input pixel of ``(N, C, H, W)`` becomes a ``scale`` x ``scale`` block: exact in any dtype (no arithmetic).

    ``scale`` and ``channels`` are positive integers (1 for grey, 3 for RGB).
    """

    def __init__(self, *, scale: int, channels: int = 3) -> None:
        super().__init__()
        self.scale = positive_int("nearest", "scale", scale)
        self.channels = positive_int("nearest", "channels", channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` replicated ``scale`` times along height and width (one copy, through a broadcast view)."""
        n, c, h, w = x.shape
        s = self.scale
        return x[:, :, :, None, :, None].expand(n, c, h, s, w, s).reshape(n, c, h * s, w * s)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, channels={self.channels}"


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: RGB (or single-channel ``L``) in and out, no halo (each output pixel is one input pixel)."""
    return interpolation_info("nearest", hparams, halo=0, local=True)


ARCH = Architecture(
    name="nearest",
    build=Nearest,
    info=info,
    detect=detect,
    variants={},
    needs_weights=False,
    paper="nearest-neighbour interpolation (pixel replication); no paper",
)
