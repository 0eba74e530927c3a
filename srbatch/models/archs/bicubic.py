"""Bicubic upscaling as a model: MATLAB ``imresize`` wrapped in a parameter-free ``nn.Module``.

It is the baseline of every SR table (bicubic a = -0.5, symmetric padding; see :mod:`srbatch.metrics.resize`), and
being model-shaped lets the engine, the tiler and the metrics treat it like any network. By default it runs
:func:`~srbatch.metrics.resize.imresize_fast` in the input's dtype (MATLAB's weights, float32 rounding);
``exact=True`` runs the float64 :func:`~srbatch.metrics.resize.imresize`, as ``srbatch evaluate`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.metrics.resize import imresize, imresize_fast
from srbatch.models.arch_api import ArchInfo, Architecture, Detection, StateDict, positive_int

__all__ = ["ARCH", "Bicubic", "detect", "info"]


class Bicubic(nn.Module):
    """Upscale ``(N, C, H, W)`` by an integer ``scale`` with MATLAB ``imresize``.

    ``scale`` and ``channels`` are positive integers (1 for grey, 3 for RGB). ``exact=False`` (the default) computes
    in the input's dtype with :func:`imresize_fast` (float32: within about 1e-6 of the float64 result on [0, 1]
    data); ``exact=True`` computes in float64 (:func:`imresize`), for MATLAB-exact evaluation. The output has the
    input's dtype and is not clamped (bicubic overshoots slightly near edges).
    """

    def __init__(self, *, scale: int, channels: int = 3, exact: bool = False) -> None:
        super().__init__()
        self.scale = positive_int("bicubic", "scale", scale)
        self.channels = positive_int("bicubic", "channels", channels)
        if not isinstance(exact, bool):
            raise ConfigError(f"bicubic: exact must be true or false; got {exact!r}")
        self.exact = exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``imresize(x, scale)`` (float64, when ``exact``) or ``imresize_fast(x, scale)``, in ``x.dtype``."""
        if self.exact:
            return imresize(x, self.scale).to(x.dtype)
        return imresize_fast(x, self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, channels={self.channels}" + (", exact=True" if self.exact else "")


def interpolation_info(name: str, hparams: Mapping[str, Any], *, halo: int, local: bool | None = None) -> ArchInfo:
    """Static facts of a weight-free interpolation ``name``: RGB (or single-channel ``L``) in and out at
    ``hparams["scale"]``, no upsampled input, a ``halo``-pixel context for tiling."""
    scale = positive_int(name, "scale", hparams.get("scale"))
    channels = int(hparams.get("channels", 3))
    extra = {} if local is None else {"local": local}
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space="RGB" if channels == 3 else "L",
        input_upsampled=False,
        size_multiple=1,
        receptive_halo=halo,
        tile_hint=None,
        **extra,
    )


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: RGB (or single-channel ``L``) in and out, no upsampled input, a 4-pixel halo for tiling."""
    return interpolation_info("bicubic", hparams, halo=4)


def detect(state_dict: StateDict) -> Detection | None:
    """Always None: an interpolation has no weights, so no checkpoint is ever recognised as one."""
    del state_dict
    return None


ARCH = Architecture(
    name="bicubic",
    build=Bicubic,
    info=info,
    detect=detect,
    variants={},
    needs_weights=False,
    paper="R. Keys, Cubic convolution interpolation for digital image processing, IEEE TASSP 29(6), 1981",
)
