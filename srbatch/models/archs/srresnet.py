"""SRResNet / the SRGAN generator (Ledig et al., CVPR 2017), with batch norm and PReLU as in the paper.

Our key layout (a clean one; the paper's authors released no PyTorch weights):

- ``conv_first`` (9x9) + ``prelu_first``;
- ``body.{i}.conv1/bn1/prelu/conv2/bn2``: residual blocks conv-BN-PReLU-conv-BN plus identity;
- ``conv_body`` (3x3) then ``bn_body`` (the paper) or ``prelu_body`` (``body_end="prelu"``), plus the long skip from
  ``prelu_first``;
- ``upsample.{j}.conv/prelu``: conv to ``4 * num_feat``, pixel shuffle x2, PReLU, ``log2(scale)`` times;
- ``conv_last`` (9x9).

:func:`detect` also reads the generator of ``leftthomas/SRGAN`` (``model.py``: ``block1`` = conv9x9 + PReLU,
``block2..block{n+1}`` residual blocks, ``block{n+2}`` = conv + BN in the current code but conv + PReLU in the
published ``epochs/netG_epoch_*_100.pth`` -- read from the tensors --, ``block{n+3}`` = upsample blocks then the final
conv) and converts it to our layout. That generator outputs ``(tanh(x) + 1) / 2`` (``output_act="tanh"``); ours
outputs ``[0, 1]`` directly. Both take ``[0, 1]`` RGB. PReLUs have one shared slope, as in both references.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.models.arch_api import ArchInfo, Architecture, Detection, StateDict, confirm_layout, conv_shape

__all__ = ["ARCH", "SRResNet", "VARIANTS", "detect", "from_leftthomas", "info", "srgan", "srresnet"]

_DEFAULTS: dict[str, Any] = {
    "scale": 4,
    "num_in_ch": 3,
    "num_out_ch": 3,
    "num_feat": 64,
    "num_block": 16,
    "body_end": "bn",
    "output_act": "none",
}
VARIANTS: dict[str, dict[str, Any]] = {
    "srresnet": {"num_block": 16, "num_feat": 64, "body_end": "bn", "output_act": "none"},
    "srgan": {"num_block": 16, "num_feat": 64, "body_end": "bn", "output_act": "none"},
}


class _ResidualBlock(nn.Module):
    """conv3x3 -> BN -> PReLU -> conv3x3 -> BN, plus identity."""

    def __init__(self, num_feat: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(num_feat)
        self.prelu = nn.PReLU()
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.prelu(self.bn1(self.conv1(x)))))


class _Upsample(nn.Module):
    """conv3x3 to ``4 * num_feat`` -> pixel shuffle x2 -> PReLU."""

    def __init__(self, num_feat: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(num_feat, 4 * num_feat, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.prelu = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.shuffle(self.conv(x)))


class SRResNet(nn.Module):
    """The SRResNet / SRGAN generator. Input ``[0, 1]``, output ``[0, 1]`` (not clamped).

    Args:
        scale: upscaling factor, a power of two (``log2(scale)`` upsample blocks). 1 is restoration at the same size
            (the training job's denoising models): no upsample block, and the network learns the residual that is
            added to its input (DnCNN/VDSR residual learning); the last conv starts at zero, so an untrained model is
            the identity.
        num_in_ch, num_out_ch: image channels in and out.
        num_feat: feature channels (64 in the paper).
        num_block: residual blocks (16 in the paper, 5 in leftthomas/SRGAN).
        body_end: what follows ``conv_body``: ``"bn"`` (paper) or ``"prelu"`` (leftthomas' released weights).
        output_act: ``"none"`` (output is the image) or ``"tanh"`` (output is ``(tanh(x) + 1) / 2``).
    """

    def __init__(
        self,
        *,
        scale: int = 4,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 16,
        body_end: Literal["bn", "prelu"] = "bn",
        output_act: Literal["none", "tanh"] = "none",
    ) -> None:
        super().__init__()
        if scale < 1 or scale & (scale - 1):
            raise ConfigError(f"SRResNet needs a power-of-two scale (1, 2, 4, 8); got scale={scale}")
        if body_end not in ("bn", "prelu"):
            raise ConfigError(f"body_end must be 'bn' or 'prelu'; got {body_end!r}")
        if output_act not in ("none", "tanh"):
            raise ConfigError(f"output_act must be 'none' or 'tanh'; got {output_act!r}")
        if scale == 1 and num_in_ch != num_out_ch:
            raise ConfigError(f"SRResNet at scale 1 adds its input to the output: num_in_ch ({num_in_ch}) must equal "
                              f"num_out_ch ({num_out_ch})")
        self.scale, self.output_act = scale, output_act
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 9, padding=4)
        self.prelu_first = nn.PReLU()
        self.body = nn.Sequential(*[_ResidualBlock(num_feat) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        # Registered under the name the tensors carry: ``bn_body`` or ``prelu_body``.
        self._body_end = f"{body_end}_body"
        self.add_module(self._body_end, nn.BatchNorm2d(num_feat) if body_end == "bn" else nn.PReLU())
        self.upsample = nn.Sequential(*[_Upsample(num_feat) for _ in range(int(math.log2(scale)))])
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 9, padding=4)
        if scale == 1:  # the residual starts at zero: an untrained restoration model is the identity
            nn.init.zeros_(self.conv_last.weight)
            nn.init.zeros_(self.conv_last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.prelu_first(self.conv_first(x))
        trunk = getattr(self, self._body_end)(self.conv_body(self.body(feat)))
        out = self.conv_last(self.upsample(feat + trunk))
        if self.scale == 1:  # restoration: the network predicts the residual
            out = out + x
        return (torch.tanh(out) + 1) / 2 if self.output_act == "tanh" else out


def srresnet(*, scale: int = 4) -> SRResNet:
    """SRResNet as in the paper: 16 residual blocks, 64 features, BN after ``conv_body``."""
    return SRResNet(scale=scale, **VARIANTS["srresnet"])


def srgan(*, scale: int = 4) -> SRResNet:
    """The SRGAN generator: the same network as SRResNet (only the training loss differs)."""
    return SRResNet(scale=scale, **VARIANTS["srgan"])


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts; halo = exact receptive-field radius (9x9 ends, 2 convs a block), rounded up + 2."""
    hp = {**_DEFAULTS, **hparams}
    scale = int(hp["scale"])
    n_up = int(math.log2(scale))
    radius = 4 + 2 * int(hp["num_block"]) + 1 + sum(1 / 2**j for j in range(n_up)) + 4 / scale
    return ArchInfo(
        scale=scale,
        in_channels=int(hp["num_in_ch"]),
        out_channels=int(hp["num_out_ch"]),
        color_space="RGB" if int(hp["num_in_ch"]) == 3 else "L",
        size_multiple=1,
        receptive_halo=math.ceil(radius) + 2,
        tile_hint=384,
    )


def from_leftthomas(state_dict: StateDict) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """leftthomas/SRGAN generator keys -> (hparams read from the key structure, state dict in our layout).

    None when ``state_dict`` is not that layout. Shapes are checked later, against the module.
    """
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"block(\d+)\.(.+)", key)
        if m is None:
            return None
        groups.setdefault(int(m.group(1)), {})[m.group(2)] = value
    last = max(groups, default=0)
    if last < 3 or set(groups) != set(range(1, last + 1)):
        return None
    num_block = last - 3
    body_end = "bn" if "1.running_mean" in groups[last - 1] else "prelu"
    n_up = sum(1 for k in groups[last] if re.fullmatch(r"\d+\.conv\.weight", k))
    seq_names = {
        1: {"0": "conv_first", "1": "prelu_first"},
        last - 1: {"0": "conv_body", "1": f"{body_end}_body"},
        last: {**{str(j): f"upsample.{j}" for j in range(n_up)}, str(n_up): "conv_last"},
    }
    out: dict[str, torch.Tensor] = {}
    for g, names in seq_names.items():
        for rest, v in groups[g].items():
            idx, _, tail = rest.partition(".")
            if idx not in names:
                return None
            out[f"{names[idx]}.{tail}"] = v
    for b in range(num_block):
        for rest, v in groups[b + 2].items():
            out[f"body.{b}.{rest}"] = v
    return {"num_block": num_block, "body_end": body_end, "output_act": "tanh"}, out


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise our layout or leftthomas/SRGAN's; infer blocks, features, channels and scale from the tensors.

    For our own layout ``output_act`` is not in the tensors and defaults to ``"none"`` (checkpoints srbatch writes
    store their hyper-parameters beside the tensors); the leftthomas layout always means ``"tanh"``.
    """
    if "block1.0.weight" in state_dict:
        found = from_leftthomas(state_dict)
        if found is None:
            return None
        extra, sd = found
    elif "conv_first.weight" in state_dict and "prelu_first.weight" in state_dict:
        blocks = {int(k.split(".")[1]) for k in state_dict if re.match(r"body\.\d+\.", k)}
        extra = {"num_block": len(blocks), "body_end": "bn" if "bn_body.weight" in state_dict else "prelu"}
        extra["output_act"] = "none"
        sd = dict(state_dict)
    else:
        return None
    first, last = conv_shape(sd, "conv_first.weight"), conv_shape(sd, "conv_last.weight")
    if first is None or last is None:
        return None
    n_up = len({k.split(".")[1] for k in sd if re.match(r"upsample\.\d+\.conv\.weight$", k)})
    hparams: dict[str, Any] = {
        "scale": 2**n_up,
        "num_in_ch": first[1],
        "num_out_ch": last[0],
        "num_feat": first[0],
        **extra,
    }
    return confirm_layout(SRResNet, hparams, sd)


ARCH = Architecture(
    name="srresnet",
    build=SRResNet,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "C. Ledig, L. Theis, F. Huszar, J. Caballero, A. Cunningham, A. Acosta, A. Aitken, A. Tejani, J. Totz, "
        "Z. Wang, W. Shi. Photo-Realistic Single Image Super-Resolution Using a Generative Adversarial Network. "
        "CVPR 2017. arXiv:1609.04802"
    ),
)
