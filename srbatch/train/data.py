"""Training data: listing and splitting HR images, random crops with LR synthesised on the fly, the validation set.

Each Ray Train worker decodes its share of the training images once and keeps them in memory as float tensors in
``[0, 1]`` (8-bit images as ``x / 255``, 16-bit as ``x / 65535``: the data range comes from the data). Every step
draws random HR crops, flips and 90-degree rotations, and synthesises the LR input with the configured degradation
(MATLAB-exact bicubic by default), all from a seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from srbatch.errors import ConfigError
from srbatch.io.images import DecodedImage, decode_image, from_float, to_float
from srbatch.io.storage import list_images, read_bytes

log = logging.getLogger("srbatch.train")

__all__ = ["split_images", "read_image", "detect_channels", "CropSampler", "ValImage", "build_val_set", "pair_lr"]


def split_images(
    uris: Sequence[str], *, val_fraction: float, val_max: int, seed: int
) -> tuple[list[str], list[str]]:
    """Split ``uris`` into (train, validation) deterministically.

    Images are ranked by a hash of (seed, file name): the first ``max(1, round(n * val_fraction))`` (at most
    ``val_max``) are held out. Adding images to the dataset later moves an existing image into the validation set only
    when a new image outranks it, so validation stays comparable across incremental datasets.
    """
    if val_fraction <= 0:
        return list(uris), []
    if len(uris) < 2:
        raise ConfigError(
            f"only {len(uris)} training image(s): at least 2 are needed to hold one out for validation; add images, "
            "give --val-data, or set --val-fraction 0"
        )
    k = min(val_max, max(1, round(len(uris) * val_fraction)), len(uris) - 1)

    def rank(u: str) -> str:
        return hashlib.sha256(f"{seed}:{posixpath.basename(u)}:{u}".encode()).hexdigest()

    held = set(sorted(uris, key=rank)[:k])
    return [u for u in uris if u not in held], [u for u in uris if u in held]


def read_image(uri: str, storage_options: Mapping[str, Any] | None = None) -> DecodedImage:
    """Read and decode one training image (alpha is dropped: the models are trained on colour only)."""
    img = decode_image(read_bytes(uri, storage_options), name=uri)
    return DecodedImage(pixels=img.pixels, mode=img.mode, format=img.format)


def detect_channels(images: Sequence[DecodedImage]) -> int:
    """1 when every image is grey, else 3."""
    return 1 if all(im.channels == 1 for im in images) else 3


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W, C)`` integer pixels converted to ``channels`` (grey is replicated; colour -> BT.601 luma)."""
    c = pixels.shape[2]
    if c == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    f = pixels.astype(np.float64)
    luma = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    return np.floor(luma + 0.5).astype(pixels.dtype)[..., None]


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` uint8/uint16 -> float32 ``(C, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(to_float(pixels).transpose(2, 0, 1)))


def pair_lr(hr_uris: Sequence[str], lr_spec: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Map each HR URI to its LR URI (same name once scale tokens such as ``_HR``/``x4`` are dropped)."""
    from srbatch.evaluate import pair_images

    lr_uris = list_images(lr_spec, storage_options)
    pairs = pair_images(list(hr_uris), lr_uris)
    return {hr: lr for _key, hr, lr in pairs if lr is not None}


class SeededSampler:
    """A sampler whose every draw comes from one ``torch.Generator`` (``self.gen``), kept in checkpoints so that a
    resumed run draws new samples, not the same ones again."""

    gen: torch.Generator

    def state_dict(self) -> dict[str, Any]:
        """The generator state."""
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.gen.set_state(state["gen"])

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, max(1, high), (1,), generator=self.gen).item())


class CropSampler(SeededSampler):
    """Random (LR, HR) training crops from in-memory images.

    ``sample(n)`` returns float32 tensors ``(n, C, crop/scale, crop/scale)`` and ``(n, C, crop, crop)`` in [0, 1].
    With ``lr_images`` (paired data) the LR crop is cut from the LR image at the matching place instead of being
    synthesised. Images smaller than the crop are skipped (with a warning).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        *,
        scale: int,
        crop_size: int,
        degradation: Any,
        seed: int,
        lr_images: Sequence[np.ndarray] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.scale = int(scale)
        self.crop = int(crop_size)
        self.degradation = degradation
        self.gen = torch.Generator().manual_seed(int(seed))
        names = list(names or [f"image {i}" for i in range(len(images))])
        self.hr: list[torch.Tensor] = []
        self.lr: list[torch.Tensor] | None = [] if lr_images is not None else None
        small = []
        for i, px in enumerate(images):
            if px.shape[0] < self.crop or px.shape[1] < self.crop:
                small.append(f"{names[i]} ({px.shape[1]}x{px.shape[0]})")
                continue
            self.hr.append(_tensor(px))
            if self.lr is not None and lr_images is not None:
                self.lr.append(_tensor(lr_images[i]))
        if small:
            log.warning("skipping %d image(s) smaller than the %d px crop: %s", len(small), self.crop, small[:5])
        if not self.hr:
            raise ConfigError(
                f"no training image is at least {self.crop}x{self.crop} pixels ({len(small)} smaller); lower "
                "--crop-size or add larger images"
            )
        area = torch.tensor([float(t.shape[1] * t.shape[2]) for t in self.hr], dtype=torch.float64)
        self.weights = area / area.sum()  # large images give proportionally more crops

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` augmented crops: (LR, HR)."""
        from srbatch.train.degrade import degrade_batch

        s, c = self.scale, self.crop
        idx = torch.multinomial(self.weights, n, replacement=True, generator=self.gen).tolist()
        hrs, lrs = [], []
        for i in idx:
            img = self.hr[i]
            h, w = img.shape[1], img.shape[2]
            y, x = self._randint(h - c + 1), self._randint(w - c + 1)
            if self.lr is not None:  # paired: align the crop on the LR grid
                y, x = y - y % s, x - x % s
                lr = self.lr[i][:, y // s : y // s + c // s, x // s : x // s + c // s]
            hr = img[:, y : y + c, x : x + c]
            flips = torch.randint(0, 2, (3,), generator=self.gen).tolist()
            for t_i, t in enumerate((hr, lr) if self.lr is not None else (hr,)):
                if flips[0]:
                    t = t.flip(-1)
                if flips[1]:
                    t = t.flip(-2)
                if flips[2]:
                    t = t.transpose(-1, -2)
                if t_i == 0:
                    hrs.append(t)
                else:
                    lrs.append(t)
        hr_b = torch.stack(hrs).contiguous()
        if self.lr is not None:
            return torch.stack(lrs).contiguous(), hr_b
        return degrade_batch(hr_b, s, self.degradation, self.gen), hr_b


@dataclass(frozen=True)
class ValImage:
    """One validation pair as integer pixels ``(H, W, C)`` (uint8 or uint16), LR already quantised like the data."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


def _center_crop(px: np.ndarray, size: int, multiple: int) -> np.ndarray:
    h, w = px.shape[:2]
    th = min(h, size) if size else h
    tw = min(w, size) if size else w
    th, tw = th - th % multiple, tw - tw % multiple
    y, x = (h - th) // 2, (w - tw) // 2
    return px[y : y + th, x : x + tw]


def build_val_set(
    images: Sequence[tuple[str, np.ndarray]],
    *,
    scale: int,
    degradation: Any,
    max_size: int,
    seed: int,
    lr_images: Mapping[str, np.ndarray] | None = None,
) -> list[ValImage]:
    """Validation pairs: HR centre crops (multiples of the scale) and their LR.

    With the bicubic degradation the LR is MATLAB ``imresize`` of the integer HR, rounded to its integer type: the
    papers' evaluation convention. Other degradations draw from a generator seeded per image, so the validation set is
    the same at every validation and across resumed runs.
    """
    from srbatch.metrics.resize import imresize_uint8
    from srbatch.train.degrade import degrade

    out = []
    for i, (name, px) in enumerate(images):
        if lr_images is not None and name in lr_images:
            lr = lr_images[name]
            hr = px[: lr.shape[0] * scale, : lr.shape[1] * scale]
            if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
                raise ConfigError(f"{name}: HR {px.shape[1]}x{px.shape[0]} is smaller than {scale} x its LR")
            out.append(ValImage(name, hr, lr))
            continue
        hr = _center_crop(px, max_size, scale)
        if hr.shape[0] < max(scale, 8) or hr.shape[1] < max(scale, 8):
            log.warning("validation image %s is too small (%dx%d); skipped", name, px.shape[1], px.shape[0])
            continue
        if degradation.kind == "bicubic":
            lr = imresize_uint8(hr, 1 / scale) if scale > 1 else hr
        else:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
            lr_f = degrade(_tensor(hr), scale, degradation, gen)
            lr = from_float(lr_f.numpy().transpose(1, 2, 0), hr.dtype)
        out.append(ValImage(name, hr, lr))
    if images and not out:
        raise ConfigError("no usable validation image (all too small); give larger --val-data images")
    return out
