"""Pieces of GAN fine-tuning for super-resolution: VGG perceptual loss, discriminators, adversarial losses, EMA.

Two recipes use them:

- SRGAN (Ledig et al., CVPR 2017): :class:`PerceptualLoss` with ``criterion="mse"`` on ``relu5_4`` features scaled by
  ``1 / 12.75`` (the paper's phi_5,4), :class:`SRGANDiscriminator`, :func:`bce_generator_loss` /
  :func:`bce_discriminator_loss`.
- ESRGAN (Wang et al., ECCV 2018 workshops): ``criterion="l1"`` on ``conv5_4`` (before the activation),
  ``feature_scale=1``, :class:`VGGStyleDiscriminator` (BasicSR's "VGG128") and the relativistic average losses
  :func:`relativistic_generator_loss` / :func:`relativistic_discriminator_loss`.

The VGG19 weights are never downloaded: :class:`VGGFeatureExtractor` reads a torchvision ``vgg19`` state dict from a
path or fsspec URI. :func:`save_random_vgg19` writes a randomly initialised one in the same layout, for tests only.
Images everywhere are float ``(N, C, H, W)`` in ``[0, 1]``.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from srbatch.errors import ConfigError, WeightsError
from srbatch.io.storage import write_bytes
from srbatch.weights.checkpoint import load_checkpoint

__all__ = [
    "EMA",
    "VGG19_LAYERS",
    "PerceptualLoss",
    "SRGANDiscriminator",
    "VGGFeatureExtractor",
    "VGGStyleDiscriminator",
    "bce_discriminator_loss",
    "bce_generator_loss",
    "build_discriminator",
    "relativistic_discriminator_loss",
    "relativistic_generator_loss",
    "save_random_vgg19",
]

# torchvision's vgg19 "E" configuration: output channels of each conv, "M" for a 2x2 max pool.
_VGG19_CFG: tuple[int | str, ...] = (
    *(64, 64, "M"),
    *(128, 128, "M"),
    *(256, 256, 256, 256, "M"),
    *(512, 512, 512, 512, "M"),
    *(512, 512, 512, 512, "M"),
)


def _layer_names() -> tuple[str, ...]:
    names: list[str] = []
    block, conv = 1, 1
    for item in _VGG19_CFG:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return tuple(names)


VGG19_LAYERS: tuple[str, ...] = _layer_names()
"""Names of torchvision's ``vgg19().features`` modules, in order: index ``i`` is ``features.{i}``."""

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_MISSING_WEIGHTS_HELP = (
    "the perceptual (VGG) loss needs VGG19 ImageNet weights in torchvision layout (a state dict with keys "
    "'features.0.weight' ... 'features.34.bias'), and srbatch never downloads them. Fix: on a machine with internet "
    "access run `python -c \"import torch, torchvision; torch.save(torchvision.models.vgg19(weights='IMAGENET1K_V1')"
    ".state_dict(), 'vgg19.pth')\"`, upload vgg19.pth where the job can read it (a path or s3://... URI) and pass "
    "`--vgg-weights <uri>`; or train the psnr stage only, which needs no VGG"
)


def _vgg19_features(upto: int) -> nn.Sequential:
    """torchvision's ``vgg19().features`` modules ``0..upto`` (same indices, so the state dict keys match)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG19_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = int(item)
    return nn.Sequential(*layers[: upto + 1])


def _read_vgg_state_dict(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The tensors of a VGG19 checkpoint; accepts ``vgg19().state_dict()`` and ``vgg19().features.state_dict()``."""
    sd = load_checkpoint(uri, storage_options=storage_options).state_dict
    if not any(k.startswith("features.") for k in sd) and all(re.fullmatch(r"\d+\.(weight|bias)", k) for k in sd):
        sd = {f"features.{k}": v for k, v in sd.items()}
    return sd


class VGGFeatureExtractor(nn.Module):
    """Frozen VGG19 features up to and including ``layer``, for perceptual losses.

    The modules live in ``self.features`` with torchvision's indices, so a torchvision ``vgg19`` state dict loads as is
    (its ``classifier.*`` keys and the ``features.*`` keys past ``layer`` are ignored). The module is always in eval
    mode with ``requires_grad=False`` parameters; gradients still flow to the input.

    Args:
        layer: a name from :data:`VGG19_LAYERS`; ``"conv5_4"`` is before the activation (ESRGAN), ``"relu5_4"`` after
            it (SRGAN's phi_5,4).
        use_input_norm: normalise the ``[0, 1]`` input with the ImageNet mean and std, as the weights expect.
        weights: path or fsspec URI of a torchvision ``vgg19`` state dict (``.pth`` or ``.safetensors``), read safely
            (no pickled code runs). Required: None raises :class:`ConfigError` explaining how to obtain it.
        storage_options: fsspec options for ``weights`` (credentials, endpoint).

    Input: float ``(N, 1 or 3, H, W)`` in ``[0, 1]``; one channel is repeated to three. Output: the ``layer`` map.
    """

    def __init__(
        self,
        layer: str = "conv5_4",
        *,
        use_input_norm: bool = True,
        weights: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if layer not in VGG19_LAYERS:
            raise ConfigError(
                f"unknown VGG19 layer {layer!r}; use one of {', '.join(VGG19_LAYERS)} "
                "(conv5_4 for ESRGAN, relu5_4 for SRGAN)"
            )
        if weights is None:
            raise ConfigError(f"VGGFeatureExtractor(layer={layer!r}) got no weights: {_MISSING_WEIGHTS_HELP}")
        self.layer = layer
        self.use_input_norm = use_input_norm
        self.features = _vgg19_features(VGG19_LAYERS.index(layer))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._load(str(weights), storage_options)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def _load(self, uri: str, storage_options: Mapping[str, Any] | None) -> None:
        sd = _read_vgg_state_dict(uri, storage_options)
        expected = self.state_dict()
        missing = [k for k in expected if k not in sd]
        if missing:
            hint = ""
            if any("running_mean" in k for k in sd):
                hint = " It looks like vgg19_bn (with batch norm); export plain vgg19 instead."
            elif not any(k.startswith("features.") for k in sd):
                hint = f" Its keys look like {sorted(sd)[:4]}, not a torchvision VGG."
            raise WeightsError(
                f"{uri}: not a torchvision vgg19 state dict usable up to {self.layer}: missing "
                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} ({len(missing)} keys).{hint} "
                "Expected `torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict()` saved with torch.save "
                "or safetensors."
            )
        wrong = [
            f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if sd[k].shape != v.shape
        ]
        if wrong:
            raise WeightsError(
                f"{uri}: tensor shapes differ from torchvision vgg19: {'; '.join(wrong[:4])}. It is probably another "
                "VGG variant (vgg16, vgg19_bn) or another network; export torchvision's vgg19 state dict."
            )
        self.load_state_dict({k: sd[k] for k in expected})

    def train(self, mode: bool = True) -> VGGFeatureExtractor:
        """Ignored: the extractor stays in eval mode (it is a fixed measuring instrument)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(
                f"VGGFeatureExtractor expects (N, 1 or 3, H, W) images in [0, 1]; got shape {tuple(x.shape)}"
            )
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        return self.features(x)


def save_random_vgg19(uri: str, *, seed: int = 0, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write a randomly initialised VGG19 state dict (``features.*`` keys, torchvision layout) to ``uri``; return it.

    For tests and smoke runs only: random features make a meaningless perceptual loss. The format follows the
    suffix: ``.safetensors`` or else ``torch.save``. Initialisation is seeded (Kaiming normal as torchvision, small
    random biases) and leaves the global RNG untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, module in enumerate(_vgg19_features(len(VGG19_LAYERS) - 1)):
        if isinstance(module, nn.Conv2d):
            w = torch.empty_like(module.weight)
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=gen)
            sd[f"features.{i}.weight"] = w
            sd[f"features.{i}.bias"] = torch.randn(module.out_channels, generator=gen) * 0.01
    if uri.lower().endswith(".safetensors"):
        from safetensors.torch import save as st_save

        data = st_save(sd)
    else:
        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
    write_bytes(uri, data, storage_options)
    return uri


class PerceptualLoss(nn.Module):
    """``criterion(extractor(sr) * feature_scale, extractor(hr).detach() * feature_scale)``.

    SRGAN: ``VGGFeatureExtractor("relu5_4")``, ``criterion="mse"``, ``feature_scale=1 / 12.75``.
    ESRGAN: ``VGGFeatureExtractor("conv5_4")``, ``criterion="l1"``, ``feature_scale=1.0``.
    The extractor is frozen; gradients reach ``sr`` only.
    """

    def __init__(
        self,
        extractor: VGGFeatureExtractor,
        *,
        criterion: Literal["l1", "mse"] = "l1",
        feature_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if criterion not in ("l1", "mse"):
            raise ConfigError(f"perceptual loss criterion must be 'l1' (ESRGAN) or 'mse' (SRGAN); got {criterion!r}")
        self.extractor = extractor
        self.criterion = criterion
        self.feature_scale = float(feature_scale)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        f_sr = self.extractor(sr) * self.feature_scale
        with torch.no_grad():
            f_hr = self.extractor(hr.detach()) * self.feature_scale
        loss = F.l1_loss if self.criterion == "l1" else F.mse_loss
        return loss(f_sr, f_hr)


def _check_input(name: str, x: torch.Tensor, in_channels: int, input_size: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ConfigError(f"{name} expects (N, {in_channels}, H, W) images; got shape {tuple(x.shape)}")
    h, w = int(x.shape[2]), int(x.shape[3])
    if (h, w) != (input_size, input_size):
        raise ConfigError(
            f"{name} was built for {input_size}x{input_size} crops but got {h}x{w}: its dense layer needs a fixed "
            f"size. Set the discriminator input size to the HR crop size (crop_size={h} if that is your crop), "
            f"or crop the images to {input_size}x{input_size}."
        )


class _ConvBNAct(nn.Module):
    """conv3x3 (no bias) -> BatchNorm -> LeakyReLU(0.2)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SRGANDiscriminator(nn.Module):
    """The SRGAN discriminator (Ledig et al. 2017, Fig. 4). Input ``[0, 1]`` (mapped to ``[-1, 1]``), output logits.

    conv3x3(nf) + LeakyReLU(0.2), seven conv3x3 + BN + LeakyReLU blocks with (channels, stride)
    ``(nf, 2), (2nf, 1), (2nf, 2), (4nf, 1), (4nf, 2), (8nf, 1), (8nf, 2)``, then Dense(1024) + LeakyReLU + Dense(1).

    Args:
        in_channels: image channels.
        num_feat: ``nf`` (64 in the paper).
        input_size: the HR crop side the dense layer is built for (96 in the paper), at least 16; inputs of another
            size raise :class:`ConfigError`. The map entering the dense layer is ``ceil(input_size / 16)`` per side.

    Returns raw logits ``(N, 1)``; no sigmoid.
    """

    def __init__(self, in_channels: int = 3, num_feat: int = 64, input_size: int = 96) -> None:
        super().__init__()
        if input_size < 16:
            raise ConfigError(f"SRGANDiscriminator input_size must be >= 16 (the HR crop size); got {input_size}")
        self.in_channels, self.input_size = in_channels, input_size
        self.conv_first = nn.Conv2d(in_channels, num_feat, 3, 1, 1)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        plan = [(1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)]
        blocks, ch, side = [], num_feat, input_size
        for mult, stride in plan:
            blocks.append(_ConvBNAct(ch, num_feat * mult, stride))
            ch = num_feat * mult
            side = (side - 1) // stride + 1
        self.body = nn.Sequential(*blocks)
        self.dense1 = nn.Linear(ch * side * side, 1024)
        self.dense2 = nn.Linear(1024, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.in_channels, self.input_size)
        feat = self.body(self.act(self.conv_first(x * 2 - 1)))
        return self.dense2(self.act(self.dense1(feat.flatten(1))))


class VGGStyleDiscriminator(nn.Module):
    """ESRGAN's "VGG128" discriminator, with BasicSR's ``VGGStyleDiscriminator`` key names. Input ``[0, 1]``, logits.

    ``conv0_0`` (3x3, bias) + LeakyReLU(0.2); ``conv0_1`` (4x4 stride 2) + ``bn0_1``; then stages ``i = 1, 2, ...`` of
    ``conv{i}_0`` (3x3) + ``bn{i}_0`` and ``conv{i}_1`` (4x4 stride 2) + ``bn{i}_1`` with ``2nf, 4nf, 8nf, 8nf, ...``
    channels; then ``linear1`` (100) + LeakyReLU + ``linear2`` (1). There are five downsamplings (to
    ``input_size / 32``), plus one more each while the map is still even and larger than 4: so 128 -> 4x4 (5 stages)
    and 256 -> 4x4 (6 stages) exactly as BasicSR, whose discriminator checkpoints therefore load.

    Args:
        in_channels: image channels.
        num_feat: ``nf`` (64 in ESRGAN).
        input_size: the HR crop side, a multiple of 32 (128 in ESRGAN); inputs of another size raise
            :class:`ConfigError`.

    Returns raw logits ``(N, 1)``; no sigmoid.
    """

    def __init__(self, in_channels: int = 3, num_feat: int = 64, input_size: int = 128) -> None:
        super().__init__()
        if input_size < 32 or input_size % 32:
            raise ConfigError(
                f"VGGStyleDiscriminator input_size must be a multiple of 32 (the HR crop size; 128 or 256 in ESRGAN); "
                f"got {input_size}. Use an HR crop size that is a multiple of 32 or the 'srgan' discriminator."
            )
        self.in_channels, self.input_size = in_channels, input_size
        n_down, side = 5, input_size // 32
        while side > 4 and side % 2 == 0:
            n_down, side = n_down + 1, side // 2
        self.num_stages = n_down
        self.conv0_0 = nn.Conv2d(in_channels, num_feat, 3, 1, 1, bias=True)
        self.conv0_1 = nn.Conv2d(num_feat, num_feat, 4, 2, 1, bias=False)
        self.bn0_1 = nn.BatchNorm2d(num_feat)
        ch = num_feat
        for i in range(1, n_down):
            out = num_feat * min(2**i, 8)
            self.add_module(f"conv{i}_0", nn.Conv2d(ch, out, 3, 1, 1, bias=False))
            self.add_module(f"bn{i}_0", nn.BatchNorm2d(out))
            self.add_module(f"conv{i}_1", nn.Conv2d(out, out, 4, 2, 1, bias=False))
            self.add_module(f"bn{i}_1", nn.BatchNorm2d(out))
            ch = out
        self.linear1 = nn.Linear(ch * side * side, 100)
        self.linear2 = nn.Linear(100, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.in_channels, self.input_size)
        feat = self.lrelu(self.conv0_0(x))
        feat = self.lrelu(self.bn0_1(self.conv0_1(feat)))
        for i in range(1, self.num_stages):
            for j in (0, 1):
                conv, bn = getattr(self, f"conv{i}_{j}"), getattr(self, f"bn{i}_{j}")
                feat = self.lrelu(bn(conv(feat)))
        return self.linear2(self.lrelu(self.linear1(feat.flatten(1))))


def build_discriminator(
    kind: Literal["srgan", "vgg"], *, in_channels: int, crop_size: int, num_feat: int = 64
) -> nn.Module:
    """The discriminator for HR crops of ``crop_size``: ``"srgan"`` (:class:`SRGANDiscriminator`) or ``"vgg"``
    (:class:`VGGStyleDiscriminator`, ESRGAN)."""
    if kind == "srgan":
        return SRGANDiscriminator(in_channels, num_feat, crop_size)
    if kind == "vgg":
        return VGGStyleDiscriminator(in_channels, num_feat, crop_size)
    raise ConfigError(f"unknown discriminator kind {kind!r}; use 'srgan' (SRGAN) or 'vgg' (ESRGAN's VGG128)")


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def bce_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """SRGAN's generator loss ``-log D(G(z))``: BCE of the discriminator's logits on generated images with target 1."""
    return _bce(fake_logits, 1.0)


def bce_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Standard GAN discriminator loss: mean of BCE(real, 1) and BCE(fake, 0).

    Pass ``fake_logits = D(sr.detach())`` so that the discriminator step does not reach the generator.
    """
    return (_bce(real_logits, 1.0) + _bce(fake_logits, 0.0)) / 2


def relativistic_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ESRGAN's relativistic average discriminator loss.

    ``D_Ra(a, b) = sigmoid(C(a) - E[C(b)])``; the loss is the mean of ``BCE(C(x_r) - mean C(x_f), 1)`` and
    ``BCE(C(x_f) - mean C(x_r), 0)``. Pass ``fake_logits = D(sr.detach())``; both inputs carry gradients to D.
    """
    return (_bce(real_logits - fake_logits.mean(), 1.0) + _bce(fake_logits - real_logits.mean(), 0.0)) / 2


def relativistic_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ESRGAN's relativistic average generator loss: the discriminator loss with the targets swapped.

    Mean of ``BCE(C(x_r) - mean C(x_f), 0)`` and ``BCE(C(x_f) - mean C(x_r), 1)``. The generator benefits from the
    real term too, through ``mean C(x_f)``. Pass ``real_logits = D(hr).detach()`` (as BasicSR does: nothing of the
    generator step should update D) and ``fake_logits = D(sr)`` (gradients flow through D into the generator; step
    only the generator's optimiser).
    """
    return (_bce(real_logits - fake_logits.mean(), 0.0) + _bce(fake_logits - real_logits.mean(), 1.0)) / 2


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (``.module``) or ``torch.compile`` (``_orig_mod``)."""
    for _ in range(4):
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        module = inner
    return module


class EMA:
    """Exponential moving average of a module's parameters; buffers (batch-norm statistics) are copied.

    ``ema = decay * ema + (1 - decay) * current`` at each :meth:`update`. ``self.module`` is the averaged copy (a deep
    copy, in eval mode, without gradients): evaluate or save it. Wrappers with a ``.module`` attribute
    (DistributedDataParallel, DataParallel) and ``torch.compile``'s ``_orig_mod`` are unwrapped, so every rank can
    pass its DDP model; the keys are those of the bare module.

    Args:
        module: the model being trained.
        decay: weight of the old average, in ``[0, 1]`` (0.999 as Real-ESRGAN / BasicSR).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1] (e.g. 0.999); got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(_unwrap(module))
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _pairs(dst: nn.Module, src: nn.Module, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        d = dict(getattr(dst, f"named_{what}")())
        s = dict(getattr(src, f"named_{what}")())
        if d.keys() != s.keys():
            diff = sorted(set(d) ^ set(s))[:5]
            raise ConfigError(f"EMA: the module's {what} differ from the averaged copy's (e.g. {diff}); same model?")
        return [(d[k], s[k]) for k in d]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards ``module``'s current parameters and copy its buffers."""
        src = _unwrap(module)
        for ema_p, p in self._pairs(self.module, src, "parameters"):
            p = p.detach().to(ema_p.device)
            if ema_p.is_floating_point():
                ema_p.lerp_(p, 1.0 - self.decay)
            else:
                ema_p.copy_(p)
        for ema_b, b in self._pairs(self.module, src, "buffers"):
            ema_b.copy_(b.detach().to(ema_b.device))

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged parameters and buffers into ``module`` (e.g. before the final evaluation)."""
        dst = _unwrap(module)
        for what in ("parameters", "buffers"):
            for d, e in self._pairs(dst, self.module, what):
                d.copy_(e.to(d.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged module's state dict: flat ``{name: tensor}``, ready to save as the EMA weights."""
        return self.module.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Restore the average from :meth:`state_dict` (e.g. when resuming)."""
        self.module.load_state_dict(state_dict, strict=strict)
