"""One explicit registry of the native architectures. No import side effects: the list is written out below."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.models.descriptor import ArchInfo

StateDict = Mapping[str, torch.Tensor]


class Detection(NamedTuple):
    """What ``detect`` found: builder arguments and the state dict in the module's own key layout."""

    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Architecture:
    """A native architecture.

    - ``build(**hparams)`` makes the ``nn.Module`` (keyword-only arguments);
    - ``info(hparams)`` gives the static :class:`ArchInfo` of that module;
    - ``detect(state_dict)`` returns a :class:`Detection` when the (canonicalised) state dict is in one of the
      layouts this architecture knows (the authors' and ours), inferring hyper-parameters from tensor shapes; None
      otherwise. It never raises for a foreign layout.
    - ``variants`` are named presets (``edsr-baseline`` -> {n_resblocks: 16, n_feats: 64, ...}) usable as model names;
      a variant may leave ``scale`` out, the caller then supplies it.
    """

    name: str
    build: Callable[..., nn.Module]
    info: Callable[[Mapping[str, Any]], ArchInfo]
    detect: Callable[[StateDict], Detection | None]
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    needs_weights: bool = True
    """False for parameter-free models (bicubic)."""
    paper: str = ""


def _all_architectures() -> list[Architecture]:
    # Imported here, not at module import, so that `import srbatch` stays light.
    from srbatch.models.archs import bicubic, edsr, espcn, fsrcnn, imdn, mdsr, rrdbnet, srcnn, srresnet, vdsr

    return [
        bicubic.ARCH,
        srcnn.ARCH,
        fsrcnn.ARCH,
        espcn.ARCH,
        vdsr.ARCH,
        edsr.ARCH,
        mdsr.ARCH,
        srresnet.ARCH,
        rrdbnet.ARCH,
        imdn.ARCH,
    ]


_REGISTRY: dict[str, Architecture] | None = None
_VARIANTS: dict[str, tuple[str, Mapping[str, Any]]] | None = None


def _load() -> None:
    global _REGISTRY, _VARIANTS
    if _REGISTRY is not None:
        return
    reg: dict[str, Architecture] = {}
    variants: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for arch in _all_architectures():
        if arch.name in reg:
            raise RuntimeError(f"architecture {arch.name!r} registered twice")
        reg[arch.name] = arch
    for arch in reg.values():
        for vname, vargs in arch.variants.items():
            if vname in reg and vname != arch.name or vname in variants:
                raise RuntimeError(f"model name {vname!r} registered twice")
            variants[vname] = (arch.name, vargs)
    _REGISTRY, _VARIANTS = reg, variants


def architectures() -> dict[str, Architecture]:
    """All native architectures by name, in registry order."""
    _load()
    assert _REGISTRY is not None
    return dict(_REGISTRY)


def variants() -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Named variants: model name -> (architecture name, builder arguments)."""
    _load()
    assert _VARIANTS is not None
    return dict(_VARIANTS)


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name``; a :class:`ConfigError` listing the known names otherwise."""
    archs = architectures()
    try:
        return archs[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; known: {', '.join(archs)} (run `srbatch models` for the full list)"
        ) from None
