"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), version 0.1,
for users who have the weights: nothing is downloaded, ever.

The metric, as the reference ``lpips`` package (richzhang/PerceptualSimilarity, BSD-2) computes it: both images as RGB
in [-1, 1]; shifted and scaled per channel (``(x - shift) / scale``, shift ``(-0.030, -0.088, -0.188)``, scale
``(0.458, 0.448, 0.450)``); through a torchvision AlexNet or VGG16 ``features`` trunk, tapped after five ReLUs; each
tap unit-normalised over channels (``f / (sqrt(sum f^2) + 1e-10)``); the squared difference of the two images' taps
weighted per channel by a linear head (1x1 convolution to one channel, no bias, non-negative weights), averaged over
space and summed over the five taps. Lower is closer; identical images score 0.

Weights are ONE safetensors file holding the trunk (torchvision's keys ``features.N.weight``/``bias``) and the five
heads (``heads.K.weight``), with metadata ``format=srbatch-lpips``, ``net`` (alex|vgg) and ``version`` (0.1). It is
made from what the user has with::

    python -m srbatch.metrics.lpips make --net alex --backbone alexnet-owt-7be5be79.pth \\
        --heads <site-packages>/lpips/weights/v0.1/alex.pth -o lpips-alex.safetensors

(:data:`HOW_TO_MAKE` says where the two inputs come from.)
"""

from __future__ import annotations

import argparse
import io
import json
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from srbatch.errors import ConfigError

__all__ = ["LPIPS", "NETS", "HOW_TO_MAKE", "CONVENTION", "build_lpips", "load_lpips", "make_lpips_weights",
           "lpips_distance", "to_lpips_input", "main"]  # fmt: skip

FORMAT = "srbatch-lpips"
VERSION = "0.1"

NETS: dict[str, dict[str, Any]] = {
    "alex": {"taps": (1, 4, 7, 9, 11), "channels": (64, 192, 384, 256, 256), "backbone": "alexnet-owt-7be5be79.pth",
             },
    "vgg": {"taps": (3, 8, 15, 22, 29), "channels": (64, 128, 256, 512, 512), "backbone": "vgg16-397923af.pth"},
}  # fmt: skip
"""The two trunks: indices of torchvision's ``features`` layers (ReLUs) whose outputs are tapped, their channels, and
the file name of torchvision's ImageNet checkpoint."""

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

CONVENTION = (
    "LPIPS v0.1 ({net}) on the RGB SR vs HR images (integers scaled to [-1, 1]; grey images replicated to RGB), "
    "with the same border shaved as for PSNR; lower is better"
)
"""How srbatch measures LPIPS on a super-resolved image (``{net}`` filled in)."""

HOW_TO_MAKE = (
    "make the file from torchvision's ImageNet checkpoint and the LPIPS linear heads: "
    "`python -m srbatch.metrics.lpips make --net alex --backbone alexnet-owt-7be5be79.pth "
    "--heads <site-packages>/lpips/weights/v0.1/alex.pth -o lpips-alex.safetensors` "
    "(for VGG: --net vgg --backbone vgg16-397923af.pth --heads .../v0.1/vgg.pth). The backbone file is torchvision's "
    "(https://download.pytorch.org/models/alexnet-owt-7be5be79.pth or vgg16-397923af.pth; after "
    "torchvision.models.alexnet(weights='DEFAULT') it is in ~/.cache/torch/hub/checkpoints/); the heads ship in the "
    "BSD-2 `lpips` wheel (`pip download lpips==0.1.4 --no-deps`, then unzip: lpips/weights/v0.1/alex.pth)"
)
"""The fix every weights error names."""


_LAYOUT = {
    # torchvision's AlexNet().features: (out channels, kernel, stride, padding) per conv, "M" a 3x3/2 max-pool
    "alex": [(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)],
    # torchvision's vgg16().features (configuration "D"), "M" a 2x2/2 max-pool
    "vgg": [(64, 3, 1, 1), (64, 3, 1, 1), "M", (128, 3, 1, 1), (128, 3, 1, 1), "M", (256, 3, 1, 1), (256, 3, 1, 1),
            (256, 3, 1, 1), "M", (512, 3, 1, 1), (512, 3, 1, 1), (512, 3, 1, 1), "M", (512, 3, 1, 1), (512, 3, 1, 1),
            (512, 3, 1, 1)],
}  # fmt: skip


def _features(net: str) -> nn.Sequential:
    """torchvision's ``features`` of the trunk, layer for layer (so its checkpoint keys ``features.N.*`` load as they
    are), cut after the last tap; built here so that no classifier is initialised and nothing can be downloaded."""
    layers: list[nn.Module] = []
    c_in = 3
    for item in _LAYOUT[net]:
        if item == "M":
            layers.append(nn.MaxPool2d(3, 2) if net == "alex" else nn.MaxPool2d(2, 2))
        else:
            c, k, st, pad = item
            layers += [nn.Conv2d(c_in, c, k, stride=st, padding=pad), nn.ReLU()]
            c_in = c
    assert len(layers) == NETS[net]["taps"][-1] + 1
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """The LPIPS v0.1 network: ``forward(x, y)`` of two ``(N, 3, H, W)`` float tensors in [-1, 1] gives the ``(N,)``
    distances. Build it with :func:`build_lpips` (random) or :func:`load_lpips` (a weights file)."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in NETS:
            raise ConfigError(f"LPIPS net must be one of {sorted(NETS)}; got {net!r}")
        self.net = net
        self.taps = tuple(NETS[net]["taps"])
        self.features = _features(net)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in NETS[net]["channels"])
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None], persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"LPIPS compares two (N, 3, H, W) tensors of one shape; got {tuple(x.shape)} and "
                              f"{tuple(y.shape)}")  # fmt: skip
        total = x.new_zeros(x.shape[0])
        for head, fx, fy in zip(self.heads, self._taps(x), self._taps(y)):
            nx = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + 1e-10)
            ny = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + 1e-10)
            total = total + head((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return total


def build_lpips(net: str = "alex") -> LPIPS:
    """An LPIPS network with random trunk and heads (tests; the weights come from :func:`load_lpips`)."""
    return LPIPS(net)


# ------------------------------------------------------------------ images in, distance out


def to_lpips_input(pixels: np.ndarray, *, crop_border: int = 0) -> torch.Tensor:
    """An HWC (or HW) uint8/uint16 image as the ``(1, 3, H, W)`` float32 tensor LPIPS takes: ``x / peak * 2 - 1``,
    grey replicated to RGB, ``crop_border`` pixels shaved from each side."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.dtype == np.uint8:
        peak = 255.0
    elif pixels.dtype == np.uint16:
        peak = 65535.0
    else:
        raise ConfigError(f"LPIPS measures 8- or 16-bit images; got {pixels.dtype}")
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[2] != 3:
        raise ConfigError(f"LPIPS measures RGB or grey images; got {pixels.shape[2]} channels")
    if crop_border:
        if pixels.shape[0] <= 2 * crop_border or pixels.shape[1] <= 2 * crop_border:
            raise ConfigError(f"image {pixels.shape[:2]} is too small for crop_border={crop_border}")
        pixels = pixels[crop_border:-crop_border, crop_border:-crop_border]
    x = torch.from_numpy(np.ascontiguousarray(pixels).astype(np.float32) / np.float32(peak))
    return (x * 2 - 1).permute(2, 0, 1)[None].contiguous()


def lpips_distance(model: LPIPS, sr: np.ndarray, hr: np.ndarray, *, crop_border: int = 0) -> float:
    """LPIPS between two same-shape HWC integer images (:func:`to_lpips_input`), on ``model``'s device."""
    if sr.shape != hr.shape:
        raise ConfigError(f"images to compare differ in shape: {sr.shape} vs {hr.shape}")
    dev = next(model.parameters()).device
    with torch.inference_mode():
        x, y = (to_lpips_input(a, crop_border=crop_border).to(dev) for a in (sr, hr))
        d = model(x, y)
    return float(d[0].item())


# ------------------------------------------------------------------ the weights file


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (the header is a little-endian u64 length, then JSON)."""
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})


def _bad(uri: str, what: str) -> ConfigError:
    return ConfigError(f"LPIPS weights {uri}: {what}; {HOW_TO_MAKE}")


def load_lpips(
    uri: str, *, storage_options: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> LPIPS:
    """The LPIPS network of the weights file ``uri`` (local path or any fsspec URI, e.g. ``s3://``), in eval mode on
    ``device``. A missing, unreadable, foreign or incomplete file is a :class:`ConfigError` naming it and saying how to
    make it (:data:`HOW_TO_MAKE`)."""
    from safetensors.torch import load as st_load

    from srbatch.errors import StorageError
    from srbatch.io.storage import read_bytes

    try:
        data = read_bytes(uri, storage_options)
    except StorageError as e:
        raise _bad(uri, f"cannot be read ({e})") from None
    try:
        meta = _metadata(data)
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not our file"
        raise _bad(uri, f"is not a safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT or meta.get("net") not in NETS:
        raise _bad(uri, f"is not an srbatch LPIPS file (metadata format={meta.get('format')!r}, net="
                        f"{meta.get('net')!r}; expected format={FORMAT!r}, net alex or vgg)")  # fmt: skip
    if meta.get("version") != VERSION:
        raise _bad(uri, f"holds LPIPS version {meta.get('version')!r}; only {VERSION} is supported")
    model = LPIPS(meta["net"])
    _load_into(model, tensors, uri)
    return model.to(device)


def _load_into(model: LPIPS, tensors: Mapping[str, torch.Tensor], uri: str) -> None:
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise _bad(uri, f"is incomplete or foreign for net {model.net}: missing {missing[:6] or 'none'}"
                        f"{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6] or 'none'}")  # fmt: skip
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})" for k, v in want.items()
             if tuple(tensors[k].shape) != tuple(v.shape)]  # fmt: skip
    if wrong:
        raise _bad(uri, f"has tensors of the wrong shape for net {model.net}: {', '.join(wrong[:4])}")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise _bad(uri, f"has non-finite values in {bad[:4]}")
    neg = [k for k in tensors if k.startswith("heads.") and bool((tensors[k] < 0).any())]
    if neg:
        raise _bad(uri, f"has negative linear-head weights in {neg} (LPIPS heads are non-negative)")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def _read_state_dict(path: str, what: str, storage_options: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt (``torch.load(weights_only=True)``) or .safetensors file; ConfigError otherwise."""
    from safetensors.torch import load as st_load

    from srbatch.errors import StorageError
    from srbatch.io.storage import read_bytes

    try:
        data = read_bytes(path, storage_options)
    except StorageError as e:
        raise ConfigError(f"--{what} {path}: cannot be read ({e}); {HOW_TO_MAKE}") from None
    try:
        if path.endswith(".safetensors"):
            sd: Any = st_load(data)
        else:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unsafe pickles and garbage are refused alike
        raise ConfigError(f"--{what} {path}: not a state dict that loads safely (safetensors, or a .pth read "
                          f"with torch.load(weights_only=True)): {type(e).__name__}: {e}; {HOW_TO_MAKE}") from None
    for k in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(k), dict):
            sd = sd[k]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"--{what} {path}: expected a state dict of tensors; {HOW_TO_MAKE}")
    return {str(k).removeprefix("module."): v for k, v in sd.items()}


_HEAD_KEY = re.compile(r"^lin(\d)\.(?:model\.)?(?:\d\.)?weight$")


def make_lpips_weights(
    net: str,
    backbone: str | Mapping[str, torch.Tensor],
    heads: str | Mapping[str, torch.Tensor],
    output: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the srbatch LPIPS weights file ``output`` from torchvision's trunk checkpoint ``backbone`` (keys
    ``features.N.weight``/``bias``; classifier keys are ignored) and the reference package's heads ``heads`` (keys
    ``linK.model.1.weight``), each a path/URI (.pth read with ``weights_only=True``, or .safetensors) or a state dict.
    The file is checked by loading it back (:func:`load_lpips`). Returns ``output``."""
    from safetensors.torch import save as st_save

    from srbatch.io.storage import write_bytes

    if net not in NETS:
        raise ConfigError(f"--net must be one of {sorted(NETS)}; got {net!r}")
    bb = _read_state_dict(backbone, "backbone", storage_options) if isinstance(backbone, str) else dict(backbone)
    hd = _read_state_dict(heads, "heads", storage_options) if isinstance(heads, str) else dict(heads)
    last = NETS[net]["taps"][-1]
    out: dict[str, torch.Tensor] = {}
    for k, v in bb.items():
        m = re.match(r"^features\.(\d+)\.(weight|bias)$", k)
        if m and int(m.group(1)) <= last:
            out[k] = v
    for k, v in hd.items():
        m = _HEAD_KEY.match(k)
        if m:
            out[f"heads.{m.group(1)}.weight"] = v
    if not any(k.startswith("features.") for k in out):
        raise ConfigError(f"--backbone: no torchvision 'features.N.weight' keys found (got {sorted(bb)[:4]}); "
                          f"{HOW_TO_MAKE}")  # fmt: skip
    if not any(k.startswith("heads.") for k in out):
        raise ConfigError(f"--heads: no LPIPS head keys 'linK.model.1.weight' found (got {sorted(hd)[:4]}); "
                          f"{HOW_TO_MAKE}")  # fmt: skip
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    _load_into(LPIPS(net), tensors, output)  # refuse to write a file that would not load
    meta = {"format": FORMAT, "net": net, "version": VERSION,
            "backbone": backbone if isinstance(backbone, str) else "<state dict>",
            "heads": heads if isinstance(heads, str) else "<state dict>"}  # fmt: skip
    write_bytes(output, st_save(tensors, metadata=meta), storage_options)
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m srbatch.metrics.lpips make ...``: write an LPIPS weights file; exit 2 on a configuration error."""
    p = argparse.ArgumentParser(prog="python -m srbatch.metrics.lpips", description="LPIPS weights for srbatch.")
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="make one LPIPS weights file (safetensors) from the trunk and the heads",
                        description="Combine torchvision's ImageNet trunk checkpoint and the LPIPS v0.1 linear heads "
                        "into the one safetensors file that --lpips-weights takes. " + HOW_TO_MAKE[0].upper()
                        + HOW_TO_MAKE[1:] + ".")  # fmt: skip
    mk.add_argument("--net", required=True, choices=sorted(NETS), help="trunk: alex (AlexNet) or vgg (VGG16)")
    mk.add_argument("--backbone", required=True, help="torchvision's checkpoint (alexnet-owt-7be5be79.pth, "
                    "vgg16-397923af.pth) or a .safetensors with the same keys")  # fmt: skip
    mk.add_argument("--heads", required=True, help="the LPIPS heads: lpips/weights/v0.1/<net>.pth from the lpips wheel")
    mk.add_argument("-o", "--output", required=True,
                    help="the file to write (path or URI), e.g. lpips-alex.safetensors")  # fmt: skip
    args = p.parse_args(argv)
    try:
        out = make_lpips_weights(args.net, args.backbone, args.heads, args.output)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (LPIPS v{VERSION}, net {args.net})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
