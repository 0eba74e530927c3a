"""D-DBPN, the dense deep back-projection network (Haris, Shakhnarovich, Ukita, CVPR 2018), in the authors' key layout.

Layout (``alterzero/DBPN-Pytorch``; every key name below is an attribute name in their code):

- ``feat0``, ``feat1`` (``dbpn.py`` class ``Net``): ``ConvBlock`` s (``base_networks.py``: ``.conv`` a ``Conv2d``,
  ``.act`` a one-parameter ``PReLU``): 3x3 conv colours -> ``feat`` (n0), then 1x1 conv -> ``base_filter`` (nR);
- ``up1``, ``down1``, ``up2`` (``base_networks.py`` ``UpBlock`` / ``DownBlock``): back-projection units.
  An up unit is ``up_conv1`` (``DeconvBlock``: ``.deconv`` a ``ConvTranspose2d`` + ``.act``), ``up_conv2``
  (``ConvBlock``, strided) and ``up_conv3`` (``DeconvBlock``): ``h0 = up_conv1(x)``, ``l0 = up_conv2(h0)``,
  ``out = up_conv3(l0 - x) + h0``. A down unit is ``down_conv1`` (strided ``ConvBlock``), ``down_conv2``
  (``DeconvBlock``), ``down_conv3`` (strided ``ConvBlock``): ``l0 = down_conv1(x)``, ``h0 = down_conv2(l0)``,
  ``out = down_conv3(h0 - x) + l0``;
- ``down{k}`` and ``up{k+1}`` for ``k = 2 .. num_stages - 1`` (``D_DownBlock`` / ``D_UpBlock``): the same units
  preceded by ``.conv``, a 1x1 ``ConvBlock`` (PReLU) squeezing the concatenation of the ``k`` previous HR (for down)
  or LR (for up) unit outputs, newest first, to ``base_filter`` channels;
- ``output_conv`` (``ConvBlock`` without activation): 3x3 conv on the concatenation of all ``num_stages`` HR
  outputs (newest first) -> colours.

Checkpoints: ``main.py``'s ``checkpoint()`` saves ``model.state_dict()`` of the ``nn.DataParallel`` wrapper, so every
key starts with ``module.``; :func:`srbatch.weights.checkpoint.canonicalize` strips it before :func:`detect` runs.
Every conv and deconv has a bias. Projection kernels per scale (``dbpn.py``): x2: 6x6, stride 2, padding 2; x4: 8x8,
stride 4, padding 2; x8: 12x12, stride 8, padding 2; the other scales are not defined by the authors (a
:class:`~srbatch.errors.ConfigError` names ``scale``). With these, every LR size works (``size_multiple`` 1).

Variants (builder arguments of the authors' ``main.py`` / ``eval.py``): ``d-dbpn`` = ``Net(num_channels=3,
base_filter=64, feat=256, num_stages=7)`` from ``dbpn.py`` (the paper's D-DBPN, their default ``model_type``);
``dbpn-ll`` = ``num_stages=10`` from ``dbpn_v1.py`` (their ``DBPNLL``, the NTIRE2018 x8 entry). Their ``dbpns.py``
(``up1``, ``down1``, ``up2``, output from both HR maps) is this module with ``num_stages=2`` and is recognised too;
``dbpn_iterative.py`` (DBPN-RES-MR64-3, shared weights), ``dbpn_v2.py`` and ``dbpn_resnet.py`` have other layouts and
are not recognised.

Parameters. The count follows from the layers above and equals that of the authors' module list exactly (the tests
rebuild it key by key): D-DBPN has 10,426,358 parameters at x4 (5,953,526 at x2, 23,205,878 at x8); DBPNLL
15,348,302 at x4. The DBPN papers quote D-DBPN at about 10.4M parameters for x4 (Haris et al., CVPR 2018 and the
TPAMI 2020 extension, arXiv:1904.05677); that figure is cited from memory of those papers, whose text is not in this
project's reference index, so the exact key-by-key match with the authors' code is the stronger check. The published
small networks (DBPN-SS/S/M/L) are not registered as variants for the same reason (their widths are given only in the
papers); build them with ``num_stages``/``feat``/``base_filter``.

Input range: the authors' ``data.py`` feeds ``ToTensor()`` output (RGB in ``[0, 1]``, no mean subtraction) and
``eval.py`` saves ``clamp(0, 1) * 255``, so the network works on ``[0, 1]`` as srbatch does; nothing is converted.

Residual option. ``main.py`` (commit fee9466) trains with ``--residual`` on by default (``prediction =
model(input) + bicubic``), while ``eval.py`` defaults to off (``type=bool`` flags: any non-empty value turns them on).
A checkpoint does not record which was used, so :func:`detect` returns ``residual=False``, the eval script's
behaviour; pass ``residual=True`` (e.g. ``build_model("dbpn", residual=True, ...)`` and load the state dict) for
networks trained by ``main.py``'s default.
The authors' bicubic is PIL's (``dataset.py`` ``rescale_img``: ``Image.resize(..., Image.BICUBIC)`` on the 8-bit LR
image, then ``ToTensor``); this module uses MATLAB ``imresize`` (:func:`~srbatch.metrics.resize.imresize_fast`).
For integer upscaling both use the cubic kernel with a = -0.5 and the same pixel-centre alignment, so they agree
inside the image; within two LR pixels of a border PIL drops the taps that fall outside and renormalises the rest,
while MATLAB mirrors the image (symmetric padding), and PIL rounds its result to 8 bits.

Receptive field: every deconv/strided-conv pair widens it by ``floor((kernel - 1) / stride)`` LR pixels, and the
longest path runs through all ``3 * (2 * num_stages - 1)`` projection layers; :func:`receptive_radius` follows every
path exactly (interval arithmetic over the graph). D-DBPN: 21 LR pixels at x4 and x8, 41 at x2 (checked against the
gradient of one output pixel in the tests); ``receptive_halo`` adds 2.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.metrics.resize import imresize_fast
from srbatch.models.arch_api import (
    ArchInfo,
    Architecture,
    Detection,
    StateDict,
    check_channels,
    confirm_layout,
    conv_shape,
    positive_int,
)

__all__ = ["ARCH", "DBPN", "PROJECTION", "VARIANTS", "d_dbpn", "dbpn_ll", "detect", "info", "receptive_radius"]

PROJECTION: dict[int, tuple[int, int, int]] = {2: (6, 2, 2), 4: (8, 4, 2), 8: (12, 8, 2)}
"""``scale -> (kernel, stride, padding)`` of every projection conv/deconv (the authors' ``dbpn.py``)."""

_DEFAULTS: dict[str, Any] = {
    "scale": 4, "channels": 3, "feat": 256, "base_filter": 64, "num_stages": 7, "residual": False,
}  # fmt: skip
VARIANTS: dict[str, dict[str, Any]] = {
    "d-dbpn": {"feat": 256, "base_filter": 64, "num_stages": 7},
    "dbpn-ll": {"feat": 256, "base_filter": 64, "num_stages": 10},
}
_NAME = "dbpn"


class _ConvBlock(nn.Module):
    """``conv`` (+ ``act``, a one-parameter PReLU): the authors' ``ConvBlock`` without normalisation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.act = nn.PReLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.act is None else self.act(x)


class _DeconvBlock(nn.Module):
    """``deconv`` + ``act``: the authors' ``DeconvBlock`` (transposed conv, PReLU)."""

    def __init__(self, channels: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel, stride, padding)
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.deconv(x))


class _UpProjection(nn.Module):
    """Up-projection unit (``UpBlock``; ``D_UpBlock`` when ``inputs > 1``: a 1x1 ``conv`` squeezes the input first)."""

    def __init__(self, nf: int, kernel: int, stride: int, padding: int, inputs: int = 1) -> None:
        super().__init__()
        if inputs > 1:
            self.conv = _ConvBlock(nf * inputs, nf, 1, 1, 0)
        self.up_conv1 = _DeconvBlock(nf, kernel, stride, padding)
        self.up_conv2 = _ConvBlock(nf, nf, kernel, stride, padding)
        self.up_conv3 = _DeconvBlock(nf, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            x = self.conv(x)
        h0 = self.up_conv1(x)
        return self.up_conv3(self.up_conv2(h0) - x) + h0


class _DownProjection(nn.Module):
    """Down-projection unit (``DownBlock``; ``D_DownBlock`` when ``inputs > 1``)."""

    def __init__(self, nf: int, kernel: int, stride: int, padding: int, inputs: int = 1) -> None:
        super().__init__()
        if inputs > 1:
            self.conv = _ConvBlock(nf * inputs, nf, 1, 1, 0)
        self.down_conv1 = _ConvBlock(nf, nf, kernel, stride, padding)
        self.down_conv2 = _DeconvBlock(nf, kernel, stride, padding)
        self.down_conv3 = _ConvBlock(nf, nf, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            x = self.conv(x)
        l0 = self.down_conv1(x)
        return self.down_conv3(self.down_conv2(l0) - x) + l0


def _check_scale(scale: Any) -> int:
    if isinstance(scale, bool) or scale not in PROJECTION:
        raise ConfigError(
            f"{_NAME}: `scale` must be one of {sorted(PROJECTION)} (the authors define the projection kernels only "
            f"for these); got {scale!r}"
        )
    return int(scale)


class DBPN(nn.Module):
    """(Dense) deep back-projection network (``[0, 1]`` in and out, not clamped).

    Args:
        scale: 2, 4 or 8 (the authors' projection kernels: 6/2/2, 8/4/2, 12/8/2).
        channels: image channels, 3 (RGB, the authors' models) or 1 (luma, as in the paper's small networks).
        feat: channels of the first 3x3 conv (n0; 256).
        base_filter: channels of every projection unit (nR; 64).
        num_stages: up-projection units T (7 for D-DBPN, 10 for DBPNLL, 2 for ``dbpns.py``); ``T - 1`` down units.
        residual: add the bicubic upscale of the input to the output (the authors' ``--residual``).
    """

    def __init__(
        self,
        *,
        scale: int = 4,
        channels: int = 3,
        feat: int = 256,
        base_filter: int = 64,
        num_stages: int = 7,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.scale = _check_scale(scale)
        check_channels(_NAME, channels)
        positive_int(_NAME, "feat", feat)
        nf = positive_int(_NAME, "base_filter", base_filter)
        self.num_stages = positive_int(_NAME, "num_stages", num_stages, minimum=2)
        if not isinstance(residual, bool):
            raise ConfigError(f"{_NAME}: `residual` must be true or false; got {residual!r}")
        self.residual = residual
        k, s, p = PROJECTION[self.scale]
        self.feat0 = _ConvBlock(channels, feat, 3, 1, 1)
        self.feat1 = _ConvBlock(feat, nf, 1, 1, 0)
        self.up1 = _UpProjection(nf, k, s, p)
        self.down1 = _DownProjection(nf, k, s, p)
        self.up2 = _UpProjection(nf, k, s, p)
        for i in range(2, self.num_stages):
            setattr(self, f"down{i}", _DownProjection(nf, k, s, p, inputs=i))
            setattr(self, f"up{i + 1}", _UpProjection(nf, k, s, p, inputs=i))
        self.output_conv = _ConvBlock(self.num_stages * nf, channels, 3, 1, 1, act=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """The authors' initialisation (``dbpn.py``): He-normal conv and deconv weights, zero biases, PReLU 0.25.

        With ``residual`` the output conv starts at zero instead, so an untrained network is exactly the bicubic
        upscale and training only adds detail (a short-training aid; loaded weights replace it anyway)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if self.residual:
            nn.init.zeros_(self.output_conv.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat1(self.feat0(x))
        h1 = self.up1(f)
        l1 = self.down1(h1)
        cat_h = torch.cat((self.up2(l1), h1), 1)  # newest first, as the authors concatenate
        cat_l = l1
        for i in range(2, self.num_stages):
            cat_l = torch.cat((getattr(self, f"down{i}")(cat_h), cat_l), 1)
            cat_h = torch.cat((getattr(self, f"up{i + 1}")(cat_l), cat_h), 1)
        out = self.output_conv(cat_h)
        if self.residual:
            out = out + imresize_fast(x, self.scale).to(out.dtype)
        return out


def d_dbpn(*, scale: int = 4, residual: bool = False) -> DBPN:
    """D-DBPN as published (``dbpn.py``: T = 7, n0 = 256, nR = 64, RGB)."""
    return DBPN(scale=scale, residual=residual, **VARIANTS["d-dbpn"])


def dbpn_ll(*, scale: int = 8, residual: bool = False) -> DBPN:
    """DBPNLL (``dbpn_v1.py``: T = 10, n0 = 256, nR = 64, RGB), the authors' NTIRE2018 network."""
    return DBPN(scale=scale, residual=residual, **VARIANTS["dbpn-ll"])


# ------------------------------------------------------------------------------------------- receptive field

_Interval = tuple[int, int]


def _hull(a: _Interval | None, b: _Interval) -> _Interval:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def receptive_radius(scale: int, num_stages: int) -> int:
    """Exact receptive-field radius in LR pixels: the farthest LR input any output pixel depends on.

    Walks the network backwards from one HR output pixel (each of the ``scale`` phases), keeping for every feature map
    the interval of positions needed (a strided conv maps LR ``[a, b]`` to HR ``[s a - p, s b - p + k - 1]``, a
    deconv maps HR ``[a, b]`` to LR ``[ceil((a + p - k + 1) / s), floor((b + p) / s)]``).
    """
    k, s, p = PROJECTION[_check_scale(scale)]

    def conv_in(iv: _Interval) -> _Interval:  # strided conv: LR output -> HR input
        return s * iv[0] - p, s * iv[1] - p + k - 1

    def deconv_in(iv: _Interval) -> _Interval:  # deconv: HR output -> LR input
        return -((-(iv[0] + p - k + 1)) // s), (iv[1] + p) // s

    def up_in(iv: _Interval) -> _Interval:  # out = D3(C2(D1(x)) - x) + D1(x)
        j = deconv_in(iv)
        return _hull(j, deconv_in(_hull(iv, conv_in(j))))

    def down_in(iv: _Interval) -> _Interval:  # out = C3(D2(C1(x)) - x) + C1(x)
        hr = conv_in(iv)
        return _hull(hr, conv_in(_hull(iv, deconv_in(hr))))

    radius = 0
    for phase in range(s):  # HR output pixel `phase` lies in LR pixel 0
        need: dict[str, _Interval | None] = {f"h{i}": (phase - 1, phase + 1) for i in range(1, num_stages + 1)}
        need.update({f"l{i}": None for i in range(1, num_stages)})
        for i in range(num_stages, 1, -1):  # h_i = up_i(l_{i-1}, ..., l_1); l_{i-1} = down_{i-1}(h_{i-1}, ..., h_1)
            iv = up_in(need[f"h{i}"])  # type: ignore[arg-type]
            for j in range(1, i):
                need[f"l{j}"] = _hull(need[f"l{j}"], iv)
            iv = down_in(need[f"l{i - 1}"])  # type: ignore[arg-type]
            for j in range(1, i):
                need[f"h{j}"] = _hull(need[f"h{j}"], iv)
        lo, hi = up_in(need["h1"])  # type: ignore[arg-type]
        radius = max(radius, -(lo - 1), hi + 1)  # feat1 is 1x1, feat0 3x3
    return radius


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts; halo = :func:`receptive_radius` + 2 (the residual bicubic needs 2, well inside)."""
    hp = {**_DEFAULTS, **hparams}
    scale, channels = _check_scale(hp["scale"]), int(hp["channels"])
    return ArchInfo(
        scale=scale,
        in_channels=channels,
        out_channels=channels,
        color_space="RGB" if channels == 3 else "Y",
        size_multiple=1,
        receptive_halo=receptive_radius(scale, int(hp["num_stages"])) + 2,
        # num_stages * base_filter HR feature maps are alive at the end: keep tiles to about 512 HR pixels a side
        tile_hint=max(64, 512 // scale),
    )


_UNIT = re.compile(r"(up|down)(\d+)\.")


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise the authors' D-DBPN / DBPNLL / DBPN-S layout (after ``module.`` is stripped by canonicalize).

    ``channels`` and ``feat`` come from ``feat0.conv.weight``, ``base_filter`` from ``feat1.conv.weight``, ``scale``
    from the projection kernel (6, 8, 12 -> 2, 4, 8), ``num_stages`` from the highest ``up{T}``. ``residual`` cannot be
    read from tensors: False, as in the authors' ``eval.py``.
    """
    f0, f1 = conv_shape(state_dict, "feat0.conv.weight"), conv_shape(state_dict, "feat1.conv.weight")
    up, out = conv_shape(state_dict, "up1.up_conv1.deconv.weight"), conv_shape(state_dict, "output_conv.conv.weight")
    if f0 is None or f1 is None or up is None or out is None or up[2] != up[3]:
        return None
    scale = next((sc for sc, (k, _, _) in PROJECTION.items() if k == up[2]), None)
    ups = {int(m.group(2)) for key in state_dict if (m := _UNIT.match(key)) and m.group(1) == "up"}
    if scale is None or not ups or ups != set(range(1, max(ups) + 1)):
        return None
    hparams: dict[str, Any] = {
        "scale": scale,
        "channels": f0[1],
        "feat": f0[0],
        "base_filter": f1[0],
        "num_stages": max(ups),
        "residual": False,
    }
    return confirm_layout(DBPN, hparams, state_dict)


ARCH = Architecture(
    name=_NAME,
    build=DBPN,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "M. Haris, G. Shakhnarovich, N. Ukita. Deep Back-Projection Networks for Super-Resolution. CVPR 2018. "
        "arXiv:1803.02735"
    ),
)
