"""WDSR-A and WDSR-B (Yu et al., "Wide Activation for Efficient and Accurate Image Super-Resolution", 2018).

Both networks are a head conv, a trunk of residual blocks with *wide activation* (many channels before the ReLU, few
on the identity path), a tail conv to ``3 * scale**2`` channels and a second branch, one 5x5 conv of the input to
``3 * scale**2`` channels, added before a pixel shuffle. Every conv is weight-normalised (``w = g * v / ||v||``).

- WDSR-A block: 3x3 conv ``n_feats -> block_feats``, ReLU, 3x3 conv ``block_feats -> n_feats``;
- WDSR-B block: 1x1 conv ``n_feats -> block_feats`` (6x), ReLU, 1x1 *linear low-rank* conv ``block_feats ->
  linear_feats`` (``int(0.8 * n_feats)``), 3x3 conv ``linear_feats -> n_feats``.
Each block's output is scaled by ``res_scale`` and added to its input.

Key layouts recognised by :func:`detect` (read from the authors' public module definitions, not copied):

(a) ``JiahuiYu/wdsr_ntire2018``, ``wdsr_a.py`` / ``wdsr_b.py`` (class ``MODEL``, trained in the EDSR-PyTorch framework,
    which saves the bare network: ``torch.save(self.model.state_dict(), ...)`` in ``sanghyun-son/EDSR-PyTorch``
    ``src/model/__init__.py`` ``Model.save``; a ``module.`` prefix is stripped by canonicalisation): ``head.0``,
    ``body.{i}.body.{0,2}`` (A) or ``body.{i}.body.{0,2,3}`` (B; index 1 is the ReLU), ``tail.0``, ``skip.0``;
    each conv wrapped in ``torch.nn.utils.weight_norm``, so it stores ``weight_g`` (shape ``(out, 1, 1, 1)``),
    ``weight_v`` and ``bias``. The mean is not in the state dict:
    ``rgb_mean`` is a plain attribute set from ``--r_mean/--g_mean/--b_mean`` = 0.4488, 0.4371, 0.4040 (DIV2K; the
    values the authors give in their issue #7). The network works on 0..255: ``(x - 255 * mean) / 127.5`` in,
    ``y * 127.5 + 255 * mean`` out, i.e. ``2 * (x01 - mean)`` in [0, 1] terms (``input_scale = 2``).
(b) ``ychfan/wdsr`` (the maintained "reloaded" re-implementation), ``models/wdsr.py`` (class ``MODEL``; WDSR-A blocks
    only), saved by ``trainer.py`` under ``model_state_dict`` (unwrapped by canonicalisation): ``body.0`` (head),
    ``body.{1..n}.body.{0,2}`` (blocks), ``body.{n+1}`` (tail), ``skip.0``; ``weight_g/weight_v/bias`` as above. Its
    input is ``to_tensor`` (0..1) minus ``image_mean = 0.5`` (``datasets/_isr.py``), output plus 0.5, no res_scale
    in the forward (``1/sqrt(n)`` goes into the initial ``weight_g`` instead), so ``rgb_mean = [0.5] * 3``,
    ``input_scale = 1``, ``res_scale = 1``. Its scale-1 models (no ``skip`` conv) are not supported.
(c) Either of the above with weight norm folded into plain ``weight`` tensors (``weight_norm=False``), or stored as
    ``parametrizations.weight.original0/1`` by ``torch.nn.utils.parametrizations.weight_norm`` (renamed to
    ``weight_g``/``weight_v``).

Weight norm is kept in the module at train time, as the authors train: each conv holds ``weight_g`` and ``weight_v``
as its own parameters (the authors' key names, so layout (a) loads without renaming) and computes the weight in
``forward``. ``weight_norm=False`` builds plain convs; :func:`fold_weight_norm` converts a state dict.

The input convention cannot be read from tensor shapes, so :func:`detect` records it in the hyper-parameters
(``rgb_mean``, ``input_scale``) from the layout: the module takes and returns ``[0, 1]`` and converts inside, so the
engine feeds every layout the same thing. ``res_scale`` is not in the shapes either: 1.0 (EDSR-PyTorch's default, and
ychfan's forward) is assumed; the authors' NTIRE 2018 x8/wild models used 0.1 (their issue #31).

Parameter counts (trainable, ``weight_g`` included, as the authors print them):
- WDSR-A, 16 blocks, ``n_feats=32``, ``block_feats=128`` ("WDSR baseline"): 1,190,100 at x2 (JiahuiYu README,
  "Overall Performance"; ychfan/wdsr README "WDSR x2"), 1,195,605 at x3 and 1,203,312 at x4 (ychfan/wdsr README).
- WDSR-B: the JiahuiYu README ("More results") lists WDSR-B with 1, 3 and 8 blocks at 0.08M, 0.23M and 0.60M
  parameters (x2), as many as WDSR-A; with ``wdsr_b.py``'s fixed 6x expansion and 0.8 low-rank ratio that budget
  means ``n_feats=64`` (84,250 / 233,318 / 605,988). No 16-block WDSR-B count is published; the ``wdsr-b`` variant
  (16 blocks, ``n_feats=64``) has 1,202,260 at x2, 1% above the WDSR baseline it is meant to match.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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

__all__ = ["ARCH", "DIV2K_MEAN", "VARIANTS", "WDSR", "detect", "fold_weight_norm", "info", "wdsr_a", "wdsr_b"]

DIV2K_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)
"""RGB mean of DIV2K, the authors' ``--r_mean/--g_mean/--b_mean`` (JiahuiYu/wdsr_ntire2018 issue #7)."""
_EXPANSION_B = 6
_LINEAR_B = 0.8
_NAME = "WDSR"

VARIANTS: dict[str, dict[str, Any]] = {
    "wdsr-a": {"block": "a", "n_resblocks": 16, "n_feats": 32, "block_feats": 128},
    "wdsr-b": {"block": "b", "n_resblocks": 16, "n_feats": 64, "block_feats": 64 * _EXPANSION_B},
}
_DEFAULTS: dict[str, Any] = {"scale": 4, **VARIANTS["wdsr-a"]}


class _WNConv2d(nn.Module):
    """A weight-normalised conv with the key names of ``torch.nn.utils.weight_norm``: ``weight_g``, ``weight_v``,
    ``bias``; the weight is ``g * v / ||v||`` (norm over all dimensions but the output channel)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.padding = kernel // 2
        self.weight_g = nn.Parameter(torch.empty(cout, 1, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(cout))

    @property
    def weight(self) -> torch.Tensor:
        norm = torch.linalg.vector_norm(self.weight_v, dim=(1, 2, 3), keepdim=True)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


def _conv(cin: int, cout: int, kernel: int, weight_norm: bool) -> nn.Module:
    return _WNConv2d(cin, cout, kernel) if weight_norm else nn.Conv2d(cin, cout, kernel, padding=kernel // 2)


def _init(conv: nn.Module, gain: float) -> None:
    """ychfan/wdsr's initialisation: default (Kaiming-uniform) direction, norm ``gain`` per output channel, zero
    bias; the same effective weight whether or not the conv is weight-normalised."""
    if conv.bias.is_meta:
        return
    with torch.no_grad():
        v = torch.empty_like(conv.weight_v if isinstance(conv, _WNConv2d) else conv.weight)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        conv.bias.zero_()
        if isinstance(conv, _WNConv2d):
            conv.weight_v.copy_(v)
            conv.weight_g.fill_(gain)
        else:
            conv.weight.copy_(v * (gain / torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)))


def _init_nearest(conv: nn.Module, scale: int) -> None:
    """The 5x5 skip conv as nearest-neighbour upscaling: every sub-pixel of colour ``c`` copies ``c``'s centre tap.

    Our choice, not the authors' (default init): a short training run then starts from a sensible image."""
    if conv.bias.is_meta:
        return
    w = torch.zeros_like(conv.weight_v if isinstance(conv, _WNConv2d) else conv.weight)
    for c in range(3):
        w[c * scale * scale : (c + 1) * scale * scale, c, 2, 2] = 1.0
    with torch.no_grad():
        conv.bias.zero_()
        if isinstance(conv, _WNConv2d):
            conv.weight_v.copy_(w)
            conv.weight_g.fill_(1.0)
        else:
            conv.weight.copy_(w)


class _Block(nn.Module):
    """A wide-activation residual block (keys ``body.0``, ``body.2`` (A) and ``body.3`` (B); index 1 is the ReLU)."""

    def __init__(
        self, block: str, n_feats: int, block_feats: int, linear_feats: int, res_scale: float, weight_norm: bool
    ) -> None:
        super().__init__()
        self.res_scale = res_scale
        wide = 3 if block == "a" else 1
        layers: list[nn.Module] = [_conv(n_feats, block_feats, wide, weight_norm), nn.ReLU(inplace=True)]
        if block == "a":
            layers.append(_conv(block_feats, n_feats, 3, weight_norm))
        else:  # the linear low-rank 1x1, then the 3x3 back to the identity path
            layers += [_conv(block_feats, linear_feats, 1, weight_norm), _conv(linear_feats, n_feats, 3, weight_norm)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.res_scale + x


class WDSR(nn.Module):
    """WDSR-A / WDSR-B (RGB, ``[0, 1]`` in and out; the layout's input convention applied inside).

    Args:
        scale: upscaling factor (>= 1; one pixel shuffle).
        block: ``"a"`` (two 3x3 convs) or ``"b"`` (1x1 wide, 1x1 low-rank linear, 3x3).
        n_resblocks: residual blocks in the trunk.
        n_feats: channels on the identity path.
        block_feats: channels before the ReLU (A: the authors' ``--block_feats``; B: ``6 * n_feats`` in their code).
        linear_feats: WDSR-B's low-rank width; None means ``int(0.8 * n_feats)`` as in ``wdsr_b.py``. Must be None
            for WDSR-A.
        res_scale: residual scaling inside each block.
        rgb_mean: per-channel mean subtracted from the ``[0, 1]`` input and added back to the output.
        input_scale: the network sees ``(x - rgb_mean) * input_scale`` and its output is divided by it (2 for the
            authors' 0..255 code with its ``/127.5``; 1 for ychfan/wdsr).
        weight_norm: True for weight-normalised convs (``weight_g``/``weight_v``), False for folded plain convs.
    """

    def __init__(
        self,
        *,
        scale: int = 4,
        block: str = "a",
        n_resblocks: int = 16,
        n_feats: int = 32,
        block_feats: int = 128,
        linear_feats: int | None = None,
        res_scale: float = 1.0,
        rgb_mean: Sequence[float] = DIV2K_MEAN,
        input_scale: float = 2.0,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        scale = positive_int(_NAME, "scale", scale)
        n_resblocks = positive_int(_NAME, "n_resblocks", n_resblocks)
        n_feats = positive_int(_NAME, "n_feats", n_feats)
        block_feats = positive_int(_NAME, "block_feats", block_feats)
        if block not in ("a", "b"):
            raise ConfigError(f"{_NAME}: `block` must be 'a' (WDSR-A) or 'b' (WDSR-B); got {block!r}")
        if block == "a" and linear_feats is not None:
            raise ConfigError(f"{_NAME}: `linear_feats` is WDSR-B's low-rank width; leave it None for block='a'")
        if block == "b":
            default = int(n_feats * _LINEAR_B)
            linear_feats = positive_int(_NAME, "linear_feats", default if linear_feats is None else linear_feats)
        mean = [float(m) for m in rgb_mean] if isinstance(rgb_mean, Sequence) and not isinstance(rgb_mean, str) else []
        if len(mean) != 3:
            raise ConfigError(f"{_NAME}: `rgb_mean` must be three numbers (R, G, B in [0, 1]); got {rgb_mean!r}")
        if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) or not input_scale > 0:
            raise ConfigError(f"{_NAME}: `input_scale` must be a positive number (2 or 1); got {input_scale!r}")
        if isinstance(res_scale, bool) or not isinstance(res_scale, (int, float)) or not res_scale > 0:
            raise ConfigError(f"{_NAME}: `res_scale` must be a positive number; got {res_scale!r}")
        if not isinstance(weight_norm, bool):
            raise ConfigError(f"{_NAME}: `weight_norm` must be true or false; got {weight_norm!r}")
        self.scale, self.input_scale = scale, float(input_scale)
        self.register_buffer("rgb_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        out = 3 * scale * scale
        self.head = nn.Sequential(_conv(3, n_feats, 3, weight_norm))
        self.body = nn.Sequential(
            *[_Block(block, n_feats, block_feats, linear_feats or 0, float(res_scale), weight_norm)
              for _ in range(n_resblocks)]  # fmt: skip
        )
        self.tail = nn.Sequential(_conv(n_feats, out, 3, weight_norm), nn.PixelShuffle(scale))
        self.skip = nn.Sequential(_conv(3, out, 5, weight_norm), nn.PixelShuffle(scale))
        _init(self.head[0], 1.0)
        _init(self.tail[0], 0.02)  # the trunk starts as a small correction ...
        _init_nearest(self.skip[0], scale)  # ... to a skip branch that starts as nearest-neighbour upscaling
        for blk in self.body:
            convs = [m for m in blk.body if not isinstance(m, nn.ReLU)]
            _init(convs[0], 2.0)
            for conv in convs[1:-1]:
                _init(conv, 1.0)
            _init(convs[-1], 1.0 / math.sqrt(n_resblocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.rgb_mean) * self.input_scale
        y = self.tail(self.body(self.head(x))) + self.skip(x)
        return y / self.input_scale + self.rgb_mean


def wdsr_a(*, scale: int = 4) -> WDSR:
    """The WDSR baseline (WDSR-A, 16 blocks, 32 -> 128 -> 32), the authors' convention (DIV2K mean, 0..255)."""
    return WDSR(scale=scale, **VARIANTS["wdsr-a"])


def wdsr_b(*, scale: int = 4) -> WDSR:
    """WDSR-B, 16 blocks, 64 -> 384 (1x1) -> 51 (1x1) -> 64 (3x3): the WDSR-A baseline's parameter budget."""
    return WDSR(scale=scale, **VARIANTS["wdsr-b"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: RGB, any input size; halo = conv radius (head 1, per block 2 (A) or 1 (B), tail 1; the skip's
    5x5 has radius 2) rounded up + 2."""
    hp = {**_DEFAULTS, **hparams}
    per_block = 2 if hp["block"] == "a" else 1
    radius = max(1 + per_block * int(hp["n_resblocks"]) + 1, 2)
    return ArchInfo(
        scale=int(hp["scale"]),
        in_channels=3,
        out_channels=3,
        color_space="RGB",
        size_multiple=1,
        receptive_halo=radius + 2,
        tile_hint=256 if int(hp["n_feats"]) >= 128 else 512,
    )


# ---------------------------------------------------------------------------------------------- state-dict layouts

_PARAM_RE = re.compile(r"(.+)\.parametrizations\.weight\.original([01])$")


def _rename_parametrizations(sd: StateDict) -> dict[str, Any]:
    """``X.parametrizations.weight.original0/1`` (torch's newer weight norm) -> ``X.weight_g`` / ``X.weight_v``."""
    out: dict[str, Any] = {}
    for k, v in sd.items():
        m = _PARAM_RE.fullmatch(k)
        out[f"{m.group(1)}.weight_{'gv'[int(m.group(2))]}" if m else k] = v
    return out


def _from_ychfan(sd: Mapping[str, Any]) -> dict[str, Any] | None:
    """ychfan/wdsr keys (``body.0`` head, ``body.{1..n}`` blocks, ``body.{n+1}`` tail) -> ours; None if not that."""
    top = numbered_children(sd, "body.")
    if not top or top < 3:
        return None
    last = top - 1
    out: dict[str, Any] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"body\.(\d+)\.(.+)", k)
        if m is None:
            out[k] = v
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:
            out[f"head.0.{rest}"] = v
        elif i == last:
            out[f"tail.0.{rest}"] = v
        else:
            out[f"body.{i - 1}.{rest}"] = v
    return out


def _conv_out(sd: Mapping[str, Any], prefix: str) -> tuple[int, ...] | None:
    """Shape of the conv under ``prefix`` (``weight_v`` or folded ``weight``)."""
    return conv_shape(sd, f"{prefix}.weight_v") or conv_shape(sd, f"{prefix}.weight")


def _weight_norm_used(sd: Mapping[str, Any]) -> bool | None:
    """True when every conv is weight-normalised, False when every one is folded, None when mixed or neither."""
    wn = any(k.endswith((".weight_g", ".weight_v")) for k in sd)
    plain = any(k.endswith(".weight") for k in sd)
    return None if wn == plain else wn


def fold_weight_norm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every ``weight_g``/``weight_v`` pair replaced by ``weight = g * v / ||v||``
    (what an export that removes weight norm writes); load it with ``weight_norm=False``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith(".weight_g"):
            continue
        if k.endswith(".weight_v"):
            base = k[: -len("_v")]
            g = state_dict[base + "_g"]
            out[base] = v * (g / torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True))
        else:
            out[k] = v
    return out


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise a WDSR-A/B state dict in the JiahuiYu (``head``/``body``/``tail``/``skip``) or ychfan
    (``body.0 .. body.{n+1}``, ``skip``) layout, weight-normalised or folded; infer ``scale``, ``block``,
    ``n_resblocks``, ``n_feats``, ``block_feats``, ``linear_feats`` and ``weight_norm`` from the tensors and record
    the layout's input convention (``rgb_mean``, ``input_scale``). None for any other layout."""
    sd = _rename_parametrizations(state_dict)
    if not any(k.startswith("skip.0.") for k in sd):
        return None
    if any(k.startswith("head.0.") for k in sd):
        mean, input_scale = list(DIV2K_MEAN), 2.0
    else:
        sd = _from_ychfan(sd) or {}
        mean, input_scale = [0.5, 0.5, 0.5], 1.0
    weight_norm = _weight_norm_used(sd)
    head, tail, skip = _conv_out(sd, "head.0"), _conv_out(sd, "tail.0"), _conv_out(sd, "skip.0")
    first = _conv_out(sd, "body.0.body.0")
    n_resblocks = numbered_children(sd, "body.")
    if weight_norm is None or not (head and tail and skip and first and n_resblocks) or head[1] != 3:
        return None
    scale = math.isqrt(skip[0] // 3)
    if scale < 1 or 3 * scale * scale != skip[0]:
        return None
    block = "b" if _conv_out(sd, "body.0.body.3") else "a"
    linear = _conv_out(sd, "body.0.body.2") if block == "b" else None
    hparams: dict[str, Any] = {
        "scale": scale,
        "block": block,
        "n_resblocks": n_resblocks,
        "n_feats": head[0],
        "block_feats": first[0],
        "linear_feats": linear[0] if linear else None,
        "res_scale": 1.0,
        "rgb_mean": mean,
        "input_scale": input_scale,
        "weight_norm": weight_norm,
    }
    return confirm_layout(WDSR, hparams, sd)


ARCH = Architecture(
    name="wdsr",
    build=WDSR,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "J. Yu, Y. Fan, J. Yang, N. Xu, Z. Wang, X. Wang, T. Huang. Wide Activation for Efficient and Accurate Image "
        "Super-Resolution. arXiv:1808.08718, 2018 (BMVC 2019 as 'Wide Activation for Efficient Image and Video "
        "Super-Resolution')"
    ),
)
