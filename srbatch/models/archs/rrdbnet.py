"""RRDBNet, the ESRGAN generator (Wang et al., ECCVW 2018), in the BasicSR / Real-ESRGAN key layout.

Our layout (``xinntao/BasicSR`` ``basicsr/archs/rrdbnet_arch.py``): ``conv_first``;
``body.{i}.rdb{1,2,3}.conv{1..5}`` (residual-in-residual dense blocks); ``conv_body``; ``conv_up{1..n}`` (nearest x2
upsample + conv + LeakyReLU each); ``conv_hr``; ``conv_last``. For scales below ``2 ** n`` the input is
pixel-unshuffled first (Real-ESRGAN x2: ``conv_first`` takes ``4 * num_in_ch`` channels, x1: ``16 * num_in_ch``), so
``scale = 2 ** num_upsample / unshuffle``.

:func:`detect` also converts two older layouts into ours:

- the original ESRGAN release (``xinntao/ESRGAN``, old arch): ``model.0``, ``model.1.sub.{i}.RDB{k}.conv{j}.0``,
  ``model.1.sub.{num_block}``, upsample convs ``model.3``, ``model.6``, ..., then ``model.{3n+2}`` (HR conv) and
  ``model.{3n+4}`` (last). Each upsample conv counts x2 (old-arch x3 models are indistinguishable and unsupported);
- the ESRGAN "new arch" / BSRGAN / RealSR layout: ``RRDB_trunk.{i}.RDB{k}``, ``trunk_conv``, ``upconv{j}``, ``HRconv``.

Input and output are ``[0, 1]``, as the authors trained.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srbatch.errors import ConfigError
from srbatch.models.arch_api import ArchInfo, Architecture, Detection, StateDict, confirm_layout, conv_shape

__all__ = [
    "ARCH", "VARIANTS", "RRDBNet", "detect", "esrgan", "info", "resolve_upsampling", "rrdbnet", "to_old_esrgan"
]  # fmt: skip

_DEFAULTS: dict[str, Any] = {
    "scale": 4,
    "num_in_ch": 3,
    "num_out_ch": 3,
    "num_feat": 64,
    "num_block": 23,
    "num_grow_ch": 32,
    "num_upsample": None,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "rrdbnet": {"num_block": 23, "num_feat": 64, "num_grow_ch": 32},
    "esrgan": {"num_block": 23, "num_feat": 64, "num_grow_ch": 32},
}


def resolve_upsampling(scale: int, num_upsample: int | None) -> tuple[int, int]:
    """``(num_upsample, unshuffle)`` for a scale; ``num_upsample=None`` follows BasicSR (2 x2 steps up to x4).

    BasicSR keeps x4's two upsampling convs for x2 and x1 and pixel-unshuffles the input by 2 or 4 instead.
    """
    if num_upsample is None:
        if scale < 1 or scale & (scale - 1):
            raise ConfigError(f"RRDBNet needs a power-of-two scale (1, 2, 4, 8); got scale={scale}")
        num_upsample = max(2, int(math.log2(scale)))
    factor = 2**num_upsample
    if scale < 1 or factor % scale or (factor // scale) & (factor // scale - 1):
        raise ConfigError(
            f"RRDBNet: scale={scale} cannot be made from {num_upsample} x2 upsampling steps and a pixel unshuffle; "
            "use a power-of-two scale <= 2 ** num_upsample"
        )
    return num_upsample, factor // scale


class _RDB(nn.Module):
    """Residual dense block: five 3x3 convs, each seeing all previous outputs; output scaled by 0.2 plus identity."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        for j in range(1, 6):
            out_ch = num_feat if j == 5 else num_grow_ch
            setattr(self, f"conv{j}", nn.Conv2d(num_feat + (j - 1) * num_grow_ch, out_ch, 3, padding=1))
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for j in range(1, 5):
            feats.append(self.lrelu(getattr(self, f"conv{j}")(torch.cat(feats, 1))))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class _RRDB(nn.Module):
    """Residual in residual dense block: three RDBs, scaled by 0.2, plus identity."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = _RDB(num_feat, num_grow_ch)
        self.rdb2 = _RDB(num_feat, num_grow_ch)
        self.rdb3 = _RDB(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator. Input ``[0, 1]``, output ``[0, 1]`` (not clamped).

    Args:
        scale: upscaling factor (power of two).
        num_in_ch, num_out_ch: image channels (before the pixel unshuffle).
        num_feat: feature channels (64). num_block: RRDB blocks (23). num_grow_ch: dense growth channels (32).
        num_upsample: x2 upsampling convs; None -> BasicSR's choice (2 for scale <= 4, log2(scale) above).
            When ``2 ** num_upsample > scale`` the input is pixel-unshuffled by the ratio first, and its height and
            width must be multiples of that ratio (:attr:`ArchInfo.size_multiple`).
    """

    def __init__(
        self,
        *,
        scale: int = 4,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        num_upsample: int | None = None,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.num_upsample, self.unshuffle = resolve_upsampling(scale, num_upsample)
        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle**2, num_feat, 3, padding=1)
        self.body = nn.Sequential(*[_RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        for j in range(1, self.num_upsample + 1):
            setattr(self, f"conv_up{j}", nn.Conv2d(num_feat, num_feat, 3, padding=1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for j in range(1, self.num_upsample + 1):
            feat = self.lrelu(getattr(self, f"conv_up{j}")(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def rrdbnet(*, scale: int = 4) -> RRDBNet:
    """RRDBNet as in BasicSR / Real-ESRGAN: 23 blocks, 64 features, growth 32."""
    return RRDBNet(scale=scale, **VARIANTS["rrdbnet"])


def esrgan(*, scale: int = 4) -> RRDBNet:
    """The ESRGAN generator as published: 23 RRDB blocks, 64 features, growth 32."""
    return RRDBNet(scale=scale, **VARIANTS["esrgan"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts; halo = exact receptive-field radius in input pixels (15 convs per RRDB), rounded up + 2."""
    hp = {**_DEFAULTS, **hparams}
    scale = int(hp["scale"])
    n_up, unshuffle = resolve_upsampling(scale, hp["num_upsample"])
    # Convs before upsampling run at 1/unshuffle resolution; unshuffling itself mixes a block of `unshuffle` pixels.
    lr_convs = 1 + 15 * int(hp["num_block"]) + 1
    radius = (unshuffle - 1) + lr_convs * unshuffle + sum(unshuffle / 2**j for j in range(1, n_up + 1))
    radius += 2 * unshuffle / 2**n_up  # conv_hr and conv_last at output resolution
    return ArchInfo(
        scale=scale,
        in_channels=int(hp["num_in_ch"]),
        out_channels=int(hp["num_out_ch"]),
        color_space="RGB" if int(hp["num_in_ch"]) == 3 else "L",
        size_multiple=unshuffle,
        receptive_halo=math.ceil(radius) + 2,
        tile_hint=256,
    )


_OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)")
_OLD_TRUNK = re.compile(r"model\.1\.sub\.(\d+)\.(weight|bias)")
_OLD_TOP = re.compile(r"model\.(\d+)\.(weight|bias)")


def _from_old(state_dict: StateDict) -> tuple[dict[str, torch.Tensor], int] | None:
    """Original ESRGAN ``model.*`` keys -> (our keys, num_upsample); None when the keys do not follow that layout."""
    out: dict[str, torch.Tensor] = {}
    top: dict[int, dict[str, torch.Tensor]] = {}
    blocks: set[int] = set()
    trunk: set[int] = set()
    for key, v in state_dict.items():
        if m := _OLD_RDB.fullmatch(key):
            i, k, j, kind = m.groups()
            out[f"body.{i}.rdb{k}.conv{j}.{kind}"] = v
            blocks.add(int(i))
        elif m := _OLD_TRUNK.fullmatch(key):
            out[f"conv_body.{m.group(2)}"] = v
            trunk.add(int(m.group(1)))
        elif m := _OLD_TOP.fullmatch(key):
            top.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            return None
    if trunk != {len(blocks)}:  # the trunk conv closes the block list: model.1.sub.{num_block}
        return None
    idx = sorted(top)
    n_up = len(idx) - 3
    if n_up < 0 or idx != [0] + [3 * j for j in range(1, n_up + 1)] + [3 * n_up + 2, 3 * n_up + 4]:
        return None
    names = ["conv_first"] + [f"conv_up{j}" for j in range(1, n_up + 1)] + ["conv_hr", "conv_last"]
    for name, i in zip(names, idx):
        out.update({f"{name}.{kind}": v for kind, v in top[i].items()})
    return out, n_up


_NEW_ARCH = (
    (re.compile(r"RRDB_trunk\.(\d+)\.RDB([123])\.(.+)"), r"body.\1.rdb\2.\3"),
    (re.compile(r"trunk_conv\.(.+)"), r"conv_body.\1"),
    (re.compile(r"upconv(\d+)\.(.+)"), r"conv_up\1.\2"),
    (re.compile(r"HRconv\.(.+)"), r"conv_hr.\1"),
)


def _from_new_arch(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """ESRGAN new-arch / BSRGAN keys (``RRDB_trunk``, ``trunk_conv``, ``upconv``, ``HRconv``) -> ours."""
    out: dict[str, torch.Tensor] = {}
    for key, v in state_dict.items():
        for pattern, repl in _NEW_ARCH:
            if pattern.fullmatch(key):
                key = pattern.sub(repl, key)
                break
        out[key] = v
    return out


def to_old_esrgan(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Our keys -> the original ESRGAN ``model.*`` layout (the inverse of :func:`detect`'s conversion; export/tests)."""
    n_up = sum(1 for k in state_dict if re.fullmatch(r"conv_up\d+\.weight", k))
    num_block = len({k.split(".")[1] for k in state_dict if k.startswith("body.")})
    names = {"conv_first": 0, "conv_body": None, "conv_hr": 3 * n_up + 2, "conv_last": 3 * n_up + 4}
    names.update({f"conv_up{j}": 3 * j for j in range(1, n_up + 1)})
    out: dict[str, torch.Tensor] = {}
    for key, v in state_dict.items():
        m = re.fullmatch(r"body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)", key)
        if m:
            i, k, j, kind = m.groups()
            out[f"model.1.sub.{i}.RDB{k}.conv{j}.0.{kind}"] = v
            continue
        name, kind = key.rsplit(".", 1)
        idx = names[name]
        out[f"model.1.sub.{num_block}.{kind}" if idx is None else f"model.{idx}.{kind}"] = v
    return out


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise BasicSR/Real-ESRGAN, original ESRGAN or ESRGAN new-arch/BSRGAN RRDBNet weights.

    Infers blocks, features, growth channels, image channels, upsampling convs and the pixel-unshuffle factor
    (``conv_first`` input channels / ``conv_last`` output channels = 1, 4 or 16) from the tensors.
    """
    if "model.0.weight" in state_dict and "model.1.sub.0.RDB1.conv1.0.weight" in state_dict:
        found = _from_old(state_dict)
        if found is None:
            return None
        sd, n_up = found
    elif "conv_first.weight" in state_dict and (
        "body.0.rdb1.conv1.weight" in state_dict or "RRDB_trunk.0.RDB1.conv1.weight" in state_dict
    ):
        sd = _from_new_arch(state_dict)
        n_up = sum(1 for k in sd if re.fullmatch(r"conv_up\d+\.weight", k))
    else:
        return None
    first, last = conv_shape(sd, "conv_first.weight"), conv_shape(sd, "conv_last.weight")
    conv1 = conv_shape(sd, "body.0.rdb1.conv1.weight")
    if first is None or last is None or conv1 is None:
        return None
    in_ch, out_ch = first[1], last[0]
    unshuffle = next((f for f in (4, 2) if in_ch == out_ch * f * f), 1)
    if 2**n_up < unshuffle:
        return None
    hparams: dict[str, Any] = {
        "scale": 2**n_up // unshuffle,
        "num_in_ch": in_ch // unshuffle**2,
        "num_out_ch": out_ch,
        "num_feat": first[0],
        "num_block": len({k.split(".")[1] for k in sd if k.startswith("body.")}),
        "num_grow_ch": conv1[0],
        "num_upsample": n_up,
    }
    return confirm_layout(RRDBNet, hparams, sd)


ARCH = Architecture(
    name="rrdbnet",
    build=RRDBNet,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "X. Wang, K. Yu, S. Wu, J. Gu, Y. Liu, C. Dong, Y. Qiao, C. C. Loy. ESRGAN: Enhanced Super-Resolution "
        "Generative Adversarial Networks. ECCV Workshops 2018. arXiv:1809.00219"
    ),
)
