"""The model descriptor: everything the engine and the jobs need to know about a loaded model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

ColorSpace = Literal["RGB", "Y", "YCbCr", "L", "Y-OpenCV"]
"""``RGB``: 3-channel RGB in, RGB out. ``Y``: the luma of MATLAB ``rgb2ycbcr`` in and out (CbCr come from a
bicubic upscale). ``YCbCr``: all three MATLAB ``rgb2ycbcr`` channels in and out. ``Y-OpenCV``: the Y of OpenCV's
full-range ``COLOR_BGR2YCrCb`` in [0, 1] in and out, CrCb from a bilinear upscale, composed as OpenCV's
``dnn_superres`` does (the TensorFlow ESPCN/FSRCNN graphs). ``L``: plain single-channel (grey)
images, e.g. microscopy; a colour image is run channel by channel."""


@dataclass(frozen=True)
class ArchInfo:
    """Static facts an architecture reports about one set of hyper-parameters.

    Every srbatch module takes a float tensor ``(N, C, H, W)`` with values in ``[0, 1]`` and returns the same range
    (not clamped). Modules that work on another range internally (EDSR's 0..255, SRGAN's tanh) convert inside.
    """

    scale: int
    in_channels: int
    out_channels: int
    color_space: ColorSpace = "RGB"
    input_upsampled: bool = False
    """True when the network expects the bicubic-upscaled image (SRCNN, VDSR): then input and output have equal size."""
    size_multiple: int = 1
    """Input height and width must be multiples of this (the engine pads by reflection and crops back)."""
    receptive_halo: int = 16
    """Pixels of context (in input pixels) needed so that tiling matches untiled output; used as the tile overlap."""
    tile_hint: int | None = None
    """A tile size (input pixels) that keeps memory modest; None when the model is cheap enough to never tile."""
    local: bool | None = True
    """True when every output pixel depends only on inputs within ``receptive_halo`` (so tiles with that context
    reproduce the untiled output up to float rounding); False when the model pools over the whole image (IMDN's
    channel attention); None when unknown (spandrel models)."""
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    temporal_radius: int = 0
    """Frames on each side of the centre frame a video model takes (``T = 2 * r + 1``): such a module takes
    ``(N, T, C, H, W)`` (also packed ``(N, T*C, H, W)``, and a single ``(N, C, H, W)`` frame) and returns the centre
    frame upscaled. 0 for every image model."""


@dataclass(frozen=True)
class ModelDescriptor:
    """A loaded model: the module plus what it needs and produces. Returned by :func:`srbatch.load_model`."""

    module: nn.Module
    architecture: str
    """Registry name of the architecture (``edsr``, ``rrdbnet``, ...), or ``spandrel:<Name>`` for spandrel models."""
    info: ArchInfo
    hparams: dict[str, Any] = field(default_factory=dict)
    """Builder keyword arguments; ``build_model(architecture, **hparams)`` rebuilds the same module."""
    name: str = ""
    """Human name: the registry name, a zoo name (``bicubic``, ``default``) or the checkpoint file name."""
    source: str | None = None
    """URI the weights came from, None for models without weights."""
    sha256: str | None = None
    """sha256 of the checkpoint bytes, None for models without weights."""

    # Convenience pass-throughs, so callers can write ``desc.scale``.
    @property
    def scale(self) -> int:
        return self.info.scale

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def out_channels(self) -> int:
        return self.info.out_channels

    @property
    def color_space(self) -> ColorSpace:
        return self.info.color_space

    @property
    def input_upsampled(self) -> bool:
        return self.info.input_upsampled

    def num_parameters(self) -> int:
        """Number of parameters of the module."""
        return sum(p.numel() for p in self.module.parameters())
