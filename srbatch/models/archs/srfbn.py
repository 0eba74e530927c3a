"""SRFBN and SRFBN-S, the super-resolution feedback network (Li et al., CVPR 2019), in the authors' key layout.

Layout (``Paper99/SRFBN_CVPR19``; key names from ``networks/srfbn_arch.py`` classes ``SRFBN`` and ``FeedbackBlock``,
built from ``networks/blocks.py``, whose ``ConvBlock``/``DeconvBlock`` are ``nn.Sequential(conv, PReLU)`` with keys
``.0`` (the convolution) and ``.1`` (one PReLU slope, initialised to 0.2), or ``nn.Sequential(conv)`` without an
activation):

- ``sub_mean`` / ``add_mean``: 1x1 ``MeanShift`` convs (``blocks.py``) subtracting / adding ``255 * DIV2K mean``;
- ``conv_in.{0,1}``: 3x3 conv, RGB -> ``4 * num_features``, PReLU; ``feat_in.{0,1}``: 1x1 conv -> ``num_features``,
  PReLU (the LR feature extraction block);
- ``block.*``, the feedback block: ``compress_in.{0,1}`` (1x1, ``2m -> m``, on the features concatenated with the
  hidden state), then ``num_groups`` projection groups: ``upBlocks.{g}`` (transposed conv, LR -> HR),
  ``downBlocks.{g}`` (strided conv, HR -> LR), and for ``g >= 1`` the dense 1x1 fusions
  ``uptranBlocks.{g-1}`` / ``downtranBlocks.{g-1}`` (``(g+1) m -> m``); ``compress_out.{0,1}`` (1x1, ``G m -> m``);
  every one followed by a PReLU. Kernel / stride / padding per scale: x2 6/2/2, x3 7/3/2, x4 8/4/2, x8 12/8/2;
- ``out.{0,1}``: transposed conv to HR + PReLU; ``conv_out.0``: 3x3 conv -> RGB (no activation).

The checkpoints (``solvers/SRSolver.py::save_checkpoint``) are ``{'epoch', 'state_dict', 'optimizer', 'best_pred',
'best_epoch', 'records'}`` with the network wrapped in ``nn.DataParallel`` (``networks/__init__.py::define_net``), so
every key starts with ``module.``; :func:`srbatch.weights.checkpoint.canonicalize` unwraps both before
:func:`detect` sees the dict. Upstream's test-time loader (``SRSolver.load``) also takes a bare state dict (it
unwraps ``state_dict`` only when present), and so does ``canonicalize``.

Forward (``SRFBN.forward`` upstream): the network works on ``0..255`` (``rgb_range`` 255; ``data/common.py``
``np2Tensor``); the global residual is the mean-subtracted input upscaled by **bilinear** interpolation
(``align_corners=False``). The feedback block runs ``num_steps`` times with shared weights; its hidden state starts
as a copy of the block's input and is the block's output of the previous step. Upstream returns one image per step
(for the curriculum loss); the authors' test code keeps the **last** one (``SRSolver.test``: ``SR[-1]``), and so does
:meth:`SRFBN.forward` (:meth:`SRFBN.forward_steps` returns all of them). The hidden state is a local variable of each
call, never module state: nothing leaks between images, batches or tiles (upstream keeps it on the module and resets
it at the start of every forward). This module takes and returns ``[0, 1]`` and converts inside.

Sizes. The defaults are the authors' test options (``options/test/test_SRFBN_x4_BI.json``: ``num_features`` 64,
``num_steps`` 4, ``num_groups`` 6; ``test_SRFBN-S_x4_BI.json``: 32, 4, 3). Trainable parameters at x4: SRFBN 3,631,454
and SRFBN-S 483,122 (upstream's ``print_network`` also counts the 24 frozen MeanShift values); the paper (Li et al.,
CVPR 2019, the parameters-versus-PSNR figure on Set5 x4) reports 3,631K and 483K.

``num_steps`` does not change any tensor shape, so :func:`detect` cannot read it: it returns the authors' 4.

Receptive field. It grows with ``T * G`` (:func:`receptive_radius`). Measured as the support of the gradient of one
output pixel with respect to the input (random weights, float64, every sub-pixel position): SRFBN x4 26 input
pixels, SRFBN-S x4 14, SRFBN-S x2 27, each equal to :func:`receptive_radius`; ``receptive_halo`` is that plus 2
(28 for SRFBN x4, 53 for SRFBN x2), so tiles reproduce the untiled output.
"""

from __future__ import annotations

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
)
from srbatch.models.archs.edsr import MeanShift, fill_mean_shift, infer_rgb_range

__all__ = [
    "ARCH",
    "KERNELS",
    "SRFBN",
    "VARIANTS",
    "FeedbackBlock",
    "detect",
    "info",
    "receptive_radius",
    "srfbn",
    "srfbn_s",
]

KERNELS: dict[int, tuple[int, int, int]] = {2: (6, 2, 2), 3: (7, 3, 2), 4: (8, 4, 2), 8: (12, 8, 2)}
"""Scale -> (kernel, stride, padding) of the projection (de)convolutions, as upstream hard-codes them."""

_DEFAULTS: dict[str, Any] = {"scale": 4, "num_features": 64, "num_steps": 4, "num_groups": 6, "rgb_range": 255.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "srfbn": {"num_features": 64, "num_steps": 4, "num_groups": 6},
    "srfbn-s": {"num_features": 32, "num_steps": 4, "num_groups": 3},
}
_AUTHORS_STEPS = 4
_PRELU_INIT = 0.2  # blocks.py::activation(slope=0.2)


def _act_block(layer: nn.Module, channels: int | None) -> nn.Sequential:
    """``ConvBlock``/``DeconvBlock`` without normalisation: ``(layer, PReLU)``, or ``(layer,)`` when ``channels`` is
    None (keys ``.0`` and ``.1``)."""
    if channels is None:
        return nn.Sequential(layer)
    return nn.Sequential(layer, nn.PReLU(num_parameters=1, init=_PRELU_INIT))


def _conv(
    cin: int, cout: int, k: int, *, stride: int = 1, padding: int | None = None, act: bool = True
) -> nn.Sequential:
    pad = (k - 1) // 2 if padding is None else padding
    return _act_block(nn.Conv2d(cin, cout, k, stride=stride, padding=pad), cout if act else None)


def _deconv(cin: int, cout: int, k: int, stride: int, padding: int) -> nn.Sequential:
    return _act_block(nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=padding), cout)


class FeedbackBlock(nn.Module):
    """The feedback block: ``forward(x, hidden) -> new hidden``; stateless (the caller carries the hidden state)."""

    def __init__(self, num_features: int, num_groups: int, scale: int) -> None:
        super().__init__()
        k, s, p = KERNELS[scale]
        m = num_features
        self.num_groups = num_groups
        self.compress_in = _conv(2 * m, m, 1)
        self.upBlocks = nn.ModuleList([_deconv(m, m, k, s, p) for _ in range(num_groups)])
        self.downBlocks = nn.ModuleList([_conv(m, m, k, stride=s, padding=p) for _ in range(num_groups)])
        self.uptranBlocks = nn.ModuleList([_conv(m * (g + 1), m, 1) for g in range(1, num_groups)])
        self.downtranBlocks = nn.ModuleList([_conv(m * (g + 1), m, 1) for g in range(1, num_groups)])
        self.compress_out = _conv(num_groups * m, m, 1)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        low = [self.compress_in(torch.cat((x, hidden), dim=1))]
        high: list[torch.Tensor] = []
        for g in range(self.num_groups):
            inp = low[0] if g == 0 else self.uptranBlocks[g - 1](torch.cat(low, dim=1))
            high.append(self.upBlocks[g](inp))
            inp = high[0] if g == 0 else self.downtranBlocks[g - 1](torch.cat(high, dim=1))
            low.append(self.downBlocks[g](inp))
        return self.compress_out(torch.cat(low[1:], dim=1))  # the block input (low[0]) is left out, as upstream


class SRFBN(nn.Module):
    """SRFBN (RGB, ``[0, 1]`` in and out, not clamped; ``rgb_range`` inside). Returns the last step's image.

    Args:
        scale: upscaling factor, 2, 3, 4 or 8 (the kernel sizes upstream defines).
        num_features: base number of filters ``m`` (64 for SRFBN, 32 for SRFBN-S).
        num_steps: feedback iterations ``T`` (4); weights are shared across steps.
        num_groups: projection groups ``G`` in the feedback block (6 for SRFBN, 3 for SRFBN-S).
        rgb_range: pixel range the weights were trained on (255 upstream).
    """

    def __init__(
        self,
        *,
        scale: int = 4,
        num_features: int = 64,
        num_steps: int = 4,
        num_groups: int = 6,
        rgb_range: float = 255.0,
    ) -> None:
        super().__init__()
        if isinstance(scale, bool) or scale not in KERNELS:
            raise ConfigError(f"SRFBN: `scale` must be one of {sorted(KERNELS)} (the authors' kernels); got {scale!r}")
        m = positive_int("SRFBN", "num_features", num_features)
        self.num_steps = positive_int("SRFBN", "num_steps", num_steps)
        positive_int("SRFBN", "num_groups", num_groups)
        if isinstance(rgb_range, bool) or not isinstance(rgb_range, (int, float)) or not rgb_range > 0:
            raise ConfigError(f"SRFBN: `rgb_range` must be a positive number (255 upstream); got {rgb_range!r}")
        self.scale, self.rgb_range = scale, float(rgb_range)
        k, s, p = KERNELS[scale]
        self.sub_mean = MeanShift(self.rgb_range, sign=-1)
        self.conv_in = _conv(3, 4 * m, 3)
        self.feat_in = _conv(4 * m, m, 1)
        self.block = FeedbackBlock(m, num_groups, scale)
        self.out = _deconv(m, m, k, s, p)
        self.conv_out = _conv(m, 3, 3, act=False)
        self.add_mean = MeanShift(self.rgb_range, sign=1)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.sub_mean(x * self.rgb_range)
        residual = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.feat_in(self.conv_in(x)), residual

    def _reconstruct(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.add_mean(residual + self.conv_out(self.out(hidden))) / self.rgb_range

    def forward_steps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The image after every feedback step (upstream's list of outputs, for a curriculum loss), ``[0, 1]``."""
        feat, residual = self._prepare(x)
        hidden, outs = feat, []
        for _ in range(self.num_steps):
            hidden = self.block(feat, hidden)
            outs.append(self._reconstruct(hidden, residual))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last step's image (what the authors' test code keeps); earlier steps are not reconstructed."""
        feat, residual = self._prepare(x)
        hidden = feat  # upstream: the hidden state starts as a copy of the block input
        for _ in range(self.num_steps):
            hidden = self.block(feat, hidden)
        return self._reconstruct(hidden, residual)


def srfbn(*, scale: int = 4, rgb_range: float = 255.0) -> SRFBN:
    """SRFBN as published: ``m`` 64, ``T`` 4, ``G`` 6 (3.63 M parameters at x4)."""
    return SRFBN(scale=scale, rgb_range=rgb_range, **VARIANTS["srfbn"])


def srfbn_s(*, scale: int = 4, rgb_range: float = 255.0) -> SRFBN:
    """SRFBN-S, the small variant: ``m`` 32, ``T`` 4, ``G`` 3 (0.48 M parameters at x4)."""
    return SRFBN(scale=scale, rgb_range=rgb_range, **VARIANTS["srfbn-s"])


def receptive_radius(scale: int, num_steps: int, num_groups: int) -> int:
    """Exact receptive-field radius in input pixels: the largest ``|x - y // scale|`` over the input columns ``x``
    that output column ``y`` depends on.

    ``conv_in`` (3x3) adds 1. An up/down projection pair reaches ``(k - 1) // s`` input pixels each way (the deconv's
    output ``y = s x - p + j``, ``0 <= j < k``, read back by the strided conv over ``[s x' - p, s x' - p + k - 1]``);
    the dense connections make the longest path ``G`` pairs per step, and the hidden state chains the ``T`` steps.
    The tail (``out`` deconv, then ``conv_out`` 3x3 at output resolution) reaches the columns computed below; the
    bilinear residual (one input pixel) is never wider.
    """
    k, s, p = KERNELS[scale]
    tail = 1  # bilinear
    for o in range(s):  # output column y = s * c + o, with the conv_out taps y - 1 .. y + 1
        lo = -((-(o - 1 + p - k + 1)) // s)  # ceil((y - 1 + p - k + 1) / s) - c
        hi = (o + 1 + p) // s  # floor((y + 1 + p) / s) - c
        tail = max(tail, -lo, hi)
    return 1 + num_steps * num_groups * ((k - 1) // s) + tail


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: RGB, any input size; halo = :func:`receptive_radius` + 2 (it grows with ``T * G``)."""
    hp = {**_DEFAULTS, **hparams}
    scale, feats = int(hp["scale"]), int(hp["num_features"])
    radius = receptive_radius(scale, int(hp["num_steps"]), int(hp["num_groups"])) if scale in KERNELS else 0
    return ArchInfo(
        scale=scale,
        in_channels=3,
        out_channels=3,
        color_space="RGB",
        size_multiple=1,
        receptive_halo=radius + 2,
        # the feedback block concatenates G feature maps at output resolution: SRFBN needs small tiles
        tile_hint=192 if feats >= 64 else 256,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise an SRFBN / SRFBN-S state dict (upstream's keys, ``module.`` and ``state_dict`` already removed).

    ``num_features`` and RGB from ``conv_in.0``, ``num_groups`` from ``block.upBlocks.*``, ``scale`` from the
    projection kernel size (:data:`KERNELS`), ``rgb_range`` from ``sub_mean.bias``; ``num_steps`` cannot be read
    from shapes and is the authors' 4. Missing MeanShift tensors are filled with upstream's constants.
    """
    conv_in = conv_shape(state_dict, "conv_in.0.weight")
    up = conv_shape(state_dict, "block.upBlocks.0.0.weight")
    if conv_in is None or up is None or conv_in[1] != 3 or conv_in[0] % 4:
        return None
    m = conv_in[0] // 4
    scale = next((s for s, (k, _, _) in KERNELS.items() if up[2:] == (k, k)), None)
    groups = numbered_children(state_dict, "block.upBlocks.")
    if scale is None or not groups or m < 1:
        return None
    rgb_range = infer_rgb_range(state_dict)
    hparams: dict[str, Any] = {
        "scale": scale,
        "num_features": m,
        "num_steps": _AUTHORS_STEPS,
        "num_groups": groups,
        "rgb_range": rgb_range,
    }
    return confirm_layout(SRFBN, hparams, fill_mean_shift(state_dict, rgb_range))


ARCH = Architecture(
    name="srfbn",
    build=SRFBN,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "Z. Li, J. Yang, Z. Liu, X. Yang, G. Jeon, W. Wu. Feedback Network for Image Super-Resolution. CVPR 2019. "
        "arXiv:1903.09814"
    ),
)
