"""Private helpers shared by the classic small SR networks (SRCNN, FSRCNN, ESPCN, VDSR).

State-dict probes that never raise on foreign layouts (``detect`` must return None, not fail) and argument checks
whose errors name the field and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from srbatch.errors import ConfigError
from srbatch.models.descriptor import ColorSpace


def color_space(channels: int) -> ColorSpace:
    """``YCbCr`` (3-channel MATLAB ``rgb2ycbcr``) for 3-channel models, ``Y`` for single-channel ones.

    The Nhat-Thanh SRCNN/FSRCNN/ESPCN checkpoints are 3-channel YCbCr models; see :mod:`srbatch.models.archs.srcnn`
    for why MATLAB's YCbCr is used rather than the upstream full-range conversion.
    """
    return "YCbCr" if channels == 3 else "Y"


def conv_shape(sd: Mapping[str, Any], key: str, ndim: int = 4) -> tuple[int, ...] | None:
    """Shape of ``sd[key]`` when it is a tensor with ``ndim`` dimensions; None otherwise (never raises)."""
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        return None
    return tuple(int(s) for s in t.shape)


def square_kernel(shape: tuple[int, ...] | None) -> int | None:
    """The kernel size of a conv weight shape ``(out, in, k, k)`` with odd square ``k``; None otherwise."""
    if shape is None or len(shape) != 4 or shape[2] != shape[3] or shape[2] % 2 == 0:
        return None
    return shape[2]


def tensors_only(sd: Mapping[str, Any], keys: set[str] | frozenset[str]) -> dict[str, torch.Tensor] | None:
    """``{k: sd[k]}`` for exactly ``keys`` when ``sd`` has those keys, no others, and all are tensors; else None."""
    if set(sd.keys()) != set(keys):
        return None
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            return None
        out[k] = v
    return out


def require_scale(arch: str, hparams: Mapping[str, Any]) -> int:
    """``hparams["scale"]`` as a positive int, or a :class:`ConfigError` that says to pass ``--scale``."""
    scale = hparams.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(
            f"{arch} needs an integer `scale` >= 1 (its weights do not record it); got {scale!r}. "
            "Pass the upscaling factor, e.g. --scale 2"
        )
    return scale


def check_channels(arch: str, channels: int) -> None:
    """Only 1-channel (Y) and 3-channel models are meaningful here; anything else is a :class:`ConfigError`."""
    if channels not in (1, 3):
        raise ConfigError(f"{arch}: `channels` must be 1 (Y) or 3; got {channels!r}")


def same_layout(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> bool:
    """True when ``sd`` has exactly ``model``'s state-dict keys with the same shapes (build ``model`` on ``meta``)."""
    ref = model.state_dict()
    if set(ref) != set(sd):
        return False
    return all(tuple(ref[k].shape) == tuple(sd[k].shape) for k in ref)


def positive_int(arch: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` when it is an int >= ``minimum`` (bools refused); a :class:`ConfigError` naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{arch}: `{name}` must be an integer >= {minimum}; got {value!r}")
    return value
