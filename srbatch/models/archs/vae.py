"""A convolutional variational autoencoder for restoration (denoising old photos), at scale 1 or above.

The restoration preset compares a CNN (SRResNet at scale 1) with a VAE, as the denoising study behind it does. This
module is that VAE: Kingma & Welling's model (a diagonal-Gaussian posterior ``q(z | x)``, the reparameterisation trick
``z = mu + exp(logvar / 2) * eps`` when training, a standard-normal prior and its closed-form KL divergence) with a
*spatial* latent, as in the VAEs of Wan et al.'s old-photo restoration (``microsoft/Bringing-Old-Photos-Back-to-Life``,
``Global/models/networks.py`` ``GlobalGenerator_DCDCv2``: strided-conv encoder, residual blocks, a latent map at
1/4 of the image size, a decoder back to full size). Wan et al. use a reduced VAE with unit variance and a KL of
``mean(mu ** 2)`` (``Global/models/pix2pixHD_model.py``); this module learns the variance too (the full ELBO).

There are no published weights for this model: the key layout is our own, a clean one.

- ``encoder.head``: 3x3 conv, image channels -> ``num_feat``, LeakyReLU(0.2);
- ``encoder.down.{i}``: 3x3 stride-2 convs, ``num_feat * 2**i`` -> ``num_feat * 2**(i+1)`` channels, LeakyReLU, for
  ``i < levels``;
- ``encoder.body.{j}.conv1`` / ``.conv2``: residual blocks (conv, LeakyReLU, conv, plus identity) at the latent size;
- ``encoder.to_moments``: 3x3 conv to ``2 * latent_channels``: ``mu`` then ``logvar`` (clamped to [-30, 20]);
- ``decoder.from_latent``: 3x3 conv, ``latent_channels`` -> the widest width; ``decoder.body.{j}``: residual blocks;
- ``decoder.up.{i}``: 3x3 conv to 4x the next narrower width, pixel shuffle x2, LeakyReLU (coarsest first);
- ``decoder.tail``: 3x3 conv to ``channels * scale**2``, pixel shuffle by ``scale`` (identity at scale 1).

What makes it a fair VAE in the CNN-vs-VAE comparison: **nothing bypasses the latent**. There are no U-Net skips from
encoder to decoder and no global residual from the input to the output (SRResNet at scale 1 has one: its output is
``input + residual``, and it starts as the identity). Every output pixel is decoded from ``z`` alone, so the
restoration is what the posterior keeps of the image; a skip around ``z`` would let the network copy the noisy input
and make the KL term meaningless. The bottleneck is the KL term and the sampling noise, not the latent's dimension: 64
latent channels at 1/4 size are 4 values per input pixel (Wan et al.'s latent is likewise over-complete).

Training loss: pixel loss + ``kl_weight * KL``, where ``KL`` is ``sum over latent positions and channels of
0.5 * (mu**2 + exp(logvar) - 1 - logvar)``, averaged over the batch and divided by the image's values per sample
(``C * H * W`` of the input), i.e. nats per image value. With an L1 pixel loss read as a Laplace likelihood of scale
``b``, the negative ELBO per value is ``L1 / b + KL``; multiplied by ``b``, that is this loss with ``kl_weight = b``.
The default 1e-3 is the ELBO of a decoder expected to be accurate to about a quarter grey level (``b = 0.26 / 255``);
raise it (``--model-args '{kl_weight: 0.01}'``) for a stronger prior. The module keeps the KL of its last training
forward and hands it to the training loop through :meth:`VAE.auxiliary_loss` (the loop adds it, logs it as ``kl``).

In eval mode the latent is the posterior mean (no sampling): outputs are deterministic, as the upscale job and tiling
need. The input is taken as ``[0, 1]`` and centred (minus 0.5) inside; the output is ``[0, 1]``, not clamped.
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
    positive_int,
)

__all__ = ["ARCH", "VAE", "VARIANTS", "detect", "info", "kl_per_value", "vae"]

_SLOPE = 0.2
_LOGVAR_RANGE = (-30.0, 20.0)
_DEFAULTS: dict[str, Any] = {"scale": 1, "channels": 3, "num_feat": 32, "levels": 2, "num_block": 2,
                             "latent_channels": 64, "kl_weight": 1e-3}  # fmt: skip
VARIANTS: dict[str, dict[str, Any]] = {
    "vae": {"num_feat": 32, "levels": 2, "num_block": 2, "latent_channels": 64, "kl_weight": 1e-3},
}


def kl_per_value(mu: torch.Tensor, logvar: torch.Tensor, values_per_sample: int) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, 1))`` summed over the latent, averaged over the batch, divided by
    ``values_per_sample`` (the image's ``C * H * W``): nats per image value, a scalar."""
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)
    return kl.sum() / (mu.shape[0] * values_per_sample)


class _ResBlock(nn.Module):
    """conv3x3 -> LeakyReLU -> conv3x3, plus identity (keys ``conv1``, ``conv2``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.LeakyReLU(_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class _Encoder(nn.Module):
    """Image -> ``2 * latent_channels`` moments at ``1 / 2**levels`` of the size."""

    def __init__(self, channels: int, widths: list[int], num_block: int, latent_channels: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.body = nn.Sequential(*[_ResBlock(widths[-1]) for _ in range(num_block)])
        self.to_moments = nn.Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)
        self.act = nn.LeakyReLU(_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.head(x))
        for conv in self.down:
            h = self.act(conv(h))
        return self.to_moments(self.body(h))


class _Decoder(nn.Module):
    """Latent -> image at ``scale`` x the encoder's input size."""

    def __init__(self, channels: int, widths: list[int], num_block: int, latent_channels: int, scale: int) -> None:
        super().__init__()
        self.from_latent = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(widths[-1]) for _ in range(num_block)])
        pairs = list(zip(widths[::-1], widths[-2::-1]))  # (wide, narrower), coarsest first
        self.up = nn.ModuleList(nn.Conv2d(a, 4 * b, 3, padding=1) for a, b in pairs)
        self.tail = nn.Conv2d(widths[0], channels * scale**2, 3, padding=1)
        self.shuffle2 = nn.PixelShuffle(2)
        self.shuffle_out = nn.PixelShuffle(scale)
        self.act = nn.LeakyReLU(_SLOPE, inplace=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.from_latent(z))
        for conv in self.up:
            h = self.act(self.shuffle2(conv(h)))
        return self.shuffle_out(self.tail(h))


class VAE(nn.Module):
    """Convolutional VAE with a spatial diagonal-Gaussian latent (``[0, 1]`` in and out, not clamped).

    Args:
        scale: output size / input size (1 for restoration; >1 adds a final pixel shuffle).
        channels: image channels in and out (3 RGB, 1 grey).
        num_feat: channels at full size; each of the ``levels`` stride-2 stages doubles them.
        levels: stride-2 stages; the latent is ``1 / 2**levels`` of the image size (inputs must be multiples of it).
        num_block: residual blocks at the latent size, in the encoder and again in the decoder.
        latent_channels: channels of ``z`` (each has a mean and a log-variance).
        kl_weight: weight of the KL term in the training loss (see the module docstring); does not change outputs.
    """

    auxiliary_loss_name = "kl"
    """The name the training loop logs :meth:`auxiliary_loss` under."""

    def __init__(
        self,
        *,
        scale: int = 1,
        channels: int = 3,
        num_feat: int = 32,
        levels: int = 2,
        num_block: int = 2,
        latent_channels: int = 64,
        kl_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        positive_int("vae", "scale", scale)
        positive_int("vae", "channels", channels)
        positive_int("vae", "num_feat", num_feat)
        positive_int("vae", "levels", levels)
        if levels > 5:
            raise ConfigError(f"vae: `levels` must be at most 5 (a latent at 1/32 of the size); got {levels}")
        positive_int("vae", "num_block", num_block, minimum=0)
        positive_int("vae", "latent_channels", latent_channels)
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not kl_weight >= 0:
            raise ConfigError(f"vae: `kl_weight` must be a number >= 0 (e.g. 1e-3); got {kl_weight!r}")
        self.scale, self.channels, self.levels = scale, channels, levels
        self.kl_weight = float(kl_weight)
        widths = [num_feat * 2**i for i in range(levels + 1)]
        self.encoder = _Encoder(channels, widths, num_block, latent_channels)
        self.decoder = _Decoder(channels, widths, num_block, latent_channels, scale)
        self._last_kl: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's ``mu`` and ``logvar`` (clamped to [-30, 20]), each ``(N, latent_channels, H/f, W/f)``."""
        f = 2**self.levels
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"vae: input height and width must be multiples of {f}; got {tuple(x.shape[-2:])}")
        mu, logvar = self.encoder(x - 0.5).chunk(2, dim=1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The image decoded from a latent ``z``."""
        return self.decoder(z) + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encode(x)
        if self.training:
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            self._last_kl = kl_per_value(mu.float(), logvar.float(), x.shape[1] * x.shape[2] * x.shape[3])
        else:
            z = mu
            self._last_kl = None
        return self.decode(z)

    def auxiliary_loss(self) -> torch.Tensor:
        """``kl_weight * KL`` of the last training forward (a scalar with its graph), for the training loop to add to
        the pixel loss; zero when the last forward was in eval mode."""
        if self._last_kl is None:
            return torch.zeros((), device=self.encoder.head.weight.device)
        return self.kl_weight * self._last_kl

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy (the EMA copy) and pickling must not carry the last forward's graph
        return {**self.__dict__, "_last_kl": None}


def vae(*, scale: int = 1, channels: int = 3, kl_weight: float = 1e-3) -> VAE:
    """The restoration VAE: 32/64/128 channels, latent of 64 channels at 1/4 size, 2 residual blocks each side."""
    return VAE(scale=scale, channels=channels, **{**VARIANTS["vae"], "kl_weight": kl_weight})


def receptive_radius(levels: int, num_block: int) -> int:
    """Exact receptive-field radius (input pixels) of an output pixel in eval mode: the dependency interval is carried
    back through every layer (3x3 convs, pixel shuffles, stride-2 convs) for each of the ``2**levels`` phases of the
    latent grid, and the largest distance from the pixel to an end of its interval is returned."""
    f = 2**levels
    worst = 0
    for p in range(f):
        lo = hi = p
        lo, hi = lo - 1, hi + 1  # decoder.tail
        for _ in range(levels):  # pixel shuffle x2, then the up conv at the coarser size
            lo, hi = lo // 2 - 1, hi // 2 + 1
        lo, hi = lo - 2 * num_block - 1, hi + 2 * num_block + 1  # decoder body + from_latent
        lo, hi = lo - 2 * num_block - 1, hi + 2 * num_block + 1  # encoder to_moments + body
        for _ in range(levels):  # stride-2 3x3 convs (padding 1): output j reads inputs 2j-1 .. 2j+1
            lo, hi = 2 * lo - 1, 2 * hi + 1
        lo, hi = lo - 1, hi + 1  # encoder.head
        worst = max(worst, p - lo, hi - p)
    return worst


def info(hparams: Mapping[str, Any]) -> ArchInfo:
    """Static facts: channels from ``channels``, size multiple ``2**levels``, halo = :func:`receptive_radius` (exact;
    the tiling test measures it from gradients). Deterministic (posterior mean) in eval mode, so tiles match."""
    hp = {**_DEFAULTS, **hparams}
    channels, levels = int(hp["channels"]), int(hp["levels"])
    return ArchInfo(
        scale=int(hp["scale"]),
        in_channels=channels,
        out_channels=channels,
        color_space="RGB" if channels == 3 else "L",
        size_multiple=2**levels,
        receptive_halo=receptive_radius(levels, int(hp["num_block"])),
        tile_hint=512,
        local=True,
    )


def detect(state_dict: StateDict) -> Detection | None:
    """Recognise this module's layout (``encoder.head``, ``encoder.down.{i}``, ``encoder.to_moments``,
    ``decoder.from_latent``, ``decoder.tail``, ...) and read every hyper-parameter from the tensors: ``channels`` and
    ``num_feat`` from the head, ``levels`` from the stride-2 convs, ``num_block`` from the encoder's blocks,
    ``latent_channels`` from ``to_moments`` and ``scale`` from the tail. ``kl_weight`` only matters for training and is
    not in the tensors: the default. None for any other layout."""
    head, moments = conv_shape(state_dict, "encoder.head.weight"), conv_shape(state_dict, "encoder.to_moments.weight")
    tail = conv_shape(state_dict, "decoder.tail.weight")
    if head is None or moments is None or tail is None or moments[0] % 2 or head[1] < 1:
        return None
    channels, num_feat = head[1], head[0]
    levels = numbered_children(state_dict, "encoder.down.")
    num_block = numbered_children(state_dict, "encoder.body.")
    if not levels or num_block is None:
        return None
    scale = math.isqrt(tail[0] // channels)
    if scale < 1 or channels * scale**2 != tail[0]:
        return None
    hparams: dict[str, Any] = {"scale": scale, "channels": channels, "num_feat": num_feat, "levels": levels,
                               "num_block": num_block, "latent_channels": moments[0] // 2,
                               "kl_weight": _DEFAULTS["kl_weight"]}  # fmt: skip
    return confirm_layout(VAE, hparams, state_dict)


ARCH = Architecture(
    name="vae",
    build=VAE,
    info=info,
    detect=detect,
    variants=VARIANTS,
    paper=(
        "D. P. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014. arXiv:1312.6114; "
        "Z. Wan, B. Zhang, D. Chen, P. Zhang, D. Chen, J. Liao, F. Wen. Bringing Old Photos Back to Life. "
        "CVPR 2020. arXiv:2004.09484"
    ),
)
