"""Validation of the generator during training (rank 0): PSNR/SSIM in the papers' convention, through the inference
engine the upscale job uses, and the same figures for bicubic upscaling (the baseline of the domain gain report)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from srbatch.models.descriptor import ModelDescriptor

__all__ = ["validate", "validate_bicubic", "print_val"]


def validate(
    module: nn.Module, desc: ModelDescriptor, val_set: list[Any], device: torch.device
) -> dict[str, float]:
    """Mean PSNR/SSIM (paper convention: Y of MATLAB YCbCr for 8-bit RGB, the plane itself for grey, border = scale)
    of ``module`` on the validation pairs, through the inference engine the upscale job uses."""
    from srbatch.inference import Upscaler
    from srbatch.io.images import from_float
    from srbatch.metrics.quality import measure

    if not val_set:
        return {}
    was_training = module.training
    d = ModelDescriptor(module=module, architecture=desc.architecture, info=desc.info, hparams=desc.hparams,
                        name=desc.name)  # fmt: skip
    up = Upscaler(d, device=device)
    border = desc.scale if desc.scale > 1 else 0
    ms = []
    with torch.no_grad():
        for v in val_set:
            if v.hr.ndim == 4:  # a clip: every frame from its window (edge frames repeated), as the video path does
                from srbatch.train.clips import windows

                for t, win in enumerate(windows(list(v.lr), desc.info.temporal_radius)):
                    sr = up.upscale_frames(win)
                    ms.append(measure(sr.reshape(v.hr[t].shape), v.hr[t], crop_border=border))
                continue
            sr = from_float(up.upscale_array(v.lr), v.hr.dtype)
            ms.append(measure(sr.reshape(v.hr.shape), v.hr, crop_border=border))
    module.train(was_training)
    return _means(ms)


def validate_bicubic(val_set: list[Any], scale: int) -> dict[str, float]:
    """The same figures for MATLAB bicubic upscaling of the LR (for scale 1: the degraded input itself)."""
    from srbatch.metrics.quality import measure
    from srbatch.metrics.resize import imresize_uint8

    ms = []
    for v in val_set:
        for lr, hr in zip(v.lr, v.hr) if v.hr.ndim == 4 else [(v.lr, v.hr)]:
            sr = imresize_uint8(lr, scale) if scale > 1 else lr
            ms.append(measure(sr.reshape(hr.shape), hr, crop_border=scale if scale > 1 else 0))
    return _means(ms)


def _means(ms: list[Any]) -> dict[str, float]:
    if not ms:
        return {}
    return {
        "psnr_y": float(np.mean([m.psnr_y for m in ms])),
        "ssim_y": float(np.mean([m.ssim_y for m in ms])),
        "psnr_rgb": float(np.mean([m.psnr_rgb for m in ms])),
        "ssim_rgb": float(np.mean([m.ssim_rgb for m in ms])),
    }


def print_val(when: str, v: Mapping[str, float], bicubic: Mapping[str, float] | None) -> None:
    """One line: PSNR_Y and SSIM_Y of ``v`` beside the bicubic figures, e.g. ``validation step 200: ...``."""
    if not v:
        return
    b = f" ({bicubic.get('label', 'bicubic')} {bicubic['psnr_y']:.2f} dB / {bicubic['ssim_y']:.4f})" if bicubic else ""
    from srbatch.train.loop import say

    say(f"srbatch train: validation {when}: PSNR_Y {v['psnr_y']:.2f} dB SSIM_Y {v['ssim_y']:.4f}{b}")

