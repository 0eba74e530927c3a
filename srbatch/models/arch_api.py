"""Everything an architecture module needs, and nothing from the registry.

Every file in :mod:`srbatch.models.archs` follows one template and imports its types from here:

- the ``nn.Module`` class, whose keyword-only ``__init__`` is the builder: it checks its arguments and raises a
  :class:`ConfigError` naming the field (helpers below);
- ``VARIANTS``, the named presets, and one keyword-only builder function per variant (``edsr_baseline(scale=4)``);
- ``info(hparams) -> ArchInfo`` and ``detect(state_dict) -> Detection | None``; ``detect`` converts a foreign key
  layout to the module's, infers the hyper-parameters from tensor shapes and confirms them with :func:`same_layout`;
- ``ARCH = Architecture(name=..., build=<the class>, info=info, detect=detect, variants=VARIANTS, paper=...)``.

:mod:`srbatch.models.registry` imports the architecture modules as one explicit list; they never import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.models.descriptor import ArchInfo, ColorSpace

__all__ = [
    "ArchInfo",
    "Architecture",
    "ColorSpace",
    "Detection",
    "LayoutDiff",
    "StateDict",
    "check_channels",
    "confirm_layout",
    "conv_shape",
    "layout_diff",
    "numbered_children",
    "odd_int",
    "positive_int",
    "require_scale",
    "same_layout",
    "square_kernel",
    "ycbcr_or_y",
]

StateDict = Mapping[str, torch.Tensor]


class Detection(NamedTuple):
    """What ``detect`` found: builder arguments and the state dict in the module's own key layout."""

    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Architecture:
    """A native architecture, as its module registers it (``ARCH = Architecture(...)``).

    - ``build`` is the ``nn.Module`` class; ``build(**hparams)`` makes the module (keyword-only arguments, checked);
    - ``info(hparams)`` gives the static :class:`ArchInfo` of that module;
    - ``detect(state_dict)`` returns a :class:`Detection` when the (canonicalised) state dict is in one of the
      layouts this architecture knows (the authors' and ours), inferring hyper-parameters from tensor shapes; None
      otherwise. It never raises for a foreign layout.
    - ``variants`` are named presets (``edsr-baseline`` -> {n_resblocks: 16, n_feats: 64, ...}) usable as model names;
      a variant may leave ``scale`` out, the caller then supplies it.
    """

    name: str
    build: type[nn.Module]
    info: Callable[[Mapping[str, Any]], ArchInfo]
    detect: Callable[[StateDict], Detection | None]
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    needs_weights: bool = True
    """False for parameter-free models (bicubic)."""
    paper: str = ""


# ------------------------------------------------------------------------------------------------ the layout check


@dataclass(frozen=True)
class LayoutDiff:
    """How a state dict differs from a module's: keys it lacks, keys it has in excess, tensors of another shape.

    BatchNorm ``num_batches_tracked`` counters may be missing (checkpoints from before PyTorch 0.4.1 have none;
    BatchNorm fills them). A value that is not a tensor counts as a wrong shape (``found`` is None).
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    wrong_shape: tuple[tuple[str, tuple[int, ...] | None, tuple[int, ...]], ...] = ()
    """``(key, found shape or None, expected shape)``."""

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)


def layout_diff(module: nn.Module, state_dict: Mapping[str, Any]) -> LayoutDiff:
    """Compare ``state_dict`` with ``module.state_dict()`` key by key and shape by shape (build on ``meta`` to probe).
    """
    ref = module.state_dict()
    missing = sorted(k for k in set(ref) - set(state_dict) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state_dict) - set(ref))
    wrong = []
    for k, v in state_dict.items():
        if k not in ref:
            continue
        found = tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None
        if found != tuple(ref[k].shape):
            wrong.append((k, found, tuple(ref[k].shape)))
    return LayoutDiff(tuple(missing), tuple(unexpected), tuple(wrong))


def same_layout(module: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """True when ``state_dict`` has ``module``'s keys (BN counters may be missing), all tensors of its shapes."""
    return not layout_diff(module, state_dict)


def confirm_layout(
    build: Callable[..., nn.Module],
    hparams: dict[str, Any],
    state_dict: Mapping[str, Any],
    *,
    probe: Mapping[str, Any] | None = None,
) -> Detection | None:
    """The end of every ``detect``: ``Detection(hparams, state_dict)`` when ``build(**hparams)`` (built on ``meta``,
    so nothing is allocated) has exactly the state dict's layout; None when it has another, or when ``build`` refuses
    the inferred hyper-parameters. ``probe`` overrides arguments for the probe only (e.g. a ``scale`` the weights do
    not fix and ``hparams`` leave None)."""
    try:
        with torch.device("meta"):
            ref = build(**{**hparams, **(probe or {})})
    except (ValueError, RuntimeError):  # ConfigError is a ValueError; torch refuses e.g. zero-sized layers
        return None
    return Detection(hparams, dict(state_dict)) if same_layout(ref, state_dict) else None


# ------------------------------------------------------------------------- state-dict probes that never raise


def conv_shape(sd: Mapping[str, Any], key: str, ndim: int = 4) -> tuple[int, ...] | None:
    """Shape of ``sd[key]`` when it is a tensor with ``ndim`` dimensions; None otherwise (never raises)."""
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        return None
    return tuple(int(s) for s in t.shape)


def numbered_children(sd: Mapping[str, Any], prefix: str) -> int | None:
    """How many children ``{prefix}0.``, ``{prefix}1.``, ... the keys name; None when the indices have a gap."""
    found = {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}
    idx = {int(i) for i in found if i.isdigit()}
    return len(idx) if idx == set(range(len(idx))) else None


def square_kernel(shape: tuple[int, ...] | None) -> int | None:
    """The kernel size of a conv weight shape ``(out, in, k, k)`` with odd square ``k``; None otherwise."""
    if shape is None or len(shape) != 4 or shape[2] != shape[3] or shape[2] % 2 == 0:
        return None
    return shape[2]


# ------------------------------------------------------------- argument checks whose errors name the field


def positive_int(arch: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` when it is an int >= ``minimum`` (bools refused); a :class:`ConfigError` naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{arch}: `{name}` must be an integer >= {minimum}; got {value!r}")
    return value


def odd_int(arch: str, name: str, value: Any) -> int:
    """A positive odd kernel size (symmetric padding); a :class:`ConfigError` naming the field otherwise."""
    if positive_int(arch, name, value) % 2 == 0:
        raise ConfigError(f"{arch}: `{name}` must be odd (symmetric padding); got {value}")
    return value


def require_scale(arch: str, hparams: Mapping[str, Any]) -> int:
    """``hparams["scale"]`` as a positive int, or a :class:`ConfigError` that says to pass ``--scale``."""
    scale = hparams.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(
            f"{arch} needs an integer `scale` >= 1 (its weights do not record it); got {scale!r}. "
            "Pass the upscaling factor, e.g. --scale 2"
        )
    return scale


def check_channels(arch: str, channels: int) -> int:
    """Only 1-channel (Y) and 3-channel models are meaningful for the classic networks; else a :class:`ConfigError`."""
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"{arch}: `channels` must be 1 (Y) or 3; got {channels!r}")
    return channels


def ycbcr_or_y(channels: int) -> ColorSpace:
    """``YCbCr`` (3-channel MATLAB ``rgb2ycbcr``) for 3-channel classic models, ``Y`` for single-channel ones.

    The Nhat-Thanh SRCNN/FSRCNN/ESPCN checkpoints are 3-channel YCbCr models; see :mod:`srbatch.models.archs.srcnn`
    for why MATLAB's YCbCr is used rather than the upstream full-range conversion.
    """
    return "YCbCr" if channels == 3 else "Y"
