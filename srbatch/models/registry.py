"""One explicit registry of the native architectures: the list below, checked for duplicate names at import.

The architecture modules import their types from :mod:`srbatch.models.arch_api`, never from here; this module imports
them (spandrel's ``__helpers/main_registry.py`` keeps the same direction). To add an architecture, write its module
after the template in :mod:`srbatch.models.arch_api` and add its ``ARCH`` to ``ARCHITECTURES``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from srbatch.errors import ConfigError
from srbatch.models.arch_api import Architecture
from srbatch.models.archs import (
    bicubic,
    dbpn,
    edsr,
    efvsr,
    espcn,
    fsrcnn,
    imdn,
    mdsr,
    nearest,
    rrdbnet,
    srcnn,
    srfbn,
    srresnet,
    vae,
    vdsr,
    wdsr,
)

__all__ = ["ARCHITECTURES", "Architecture", "architectures", "get_architecture", "variants"]

ARCHITECTURES: tuple[Architecture, ...] = (
    bicubic.ARCH,
    nearest.ARCH,
    srcnn.ARCH,
    fsrcnn.ARCH,
    espcn.ARCH,
    vdsr.ARCH,
    edsr.ARCH,
    mdsr.ARCH,
    srresnet.ARCH,
    rrdbnet.ARCH,
    imdn.ARCH,
    wdsr.ARCH,
    dbpn.ARCH,
    srfbn.ARCH,
    vae.ARCH,
    efvsr.ARCH,
)


def _index(
    archs: Sequence[Architecture],
) -> tuple[dict[str, Architecture], dict[str, tuple[str, Mapping[str, Any]]]]:
    """Architectures by name and variants by name; a name used twice (as either) is an error."""
    reg: dict[str, Architecture] = {}
    for arch in archs:
        if arch.name in reg:
            raise RuntimeError(f"architecture {arch.name!r} registered twice")
        reg[arch.name] = arch
    var: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for arch in archs:
        for vname, vargs in arch.variants.items():
            if vname in reg and vname != arch.name or vname in var:
                raise RuntimeError(f"model name {vname!r} registered twice")
            var[vname] = (arch.name, vargs)
    return reg, var


_REGISTRY, _VARIANTS = _index(ARCHITECTURES)


def architectures() -> dict[str, Architecture]:
    """All native architectures by name, in registry order."""
    return dict(_REGISTRY)


def variants() -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Named variants: model name -> (architecture name, builder arguments)."""
    return dict(_VARIANTS)


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name``; a :class:`ConfigError` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {name!r}; known: {', '.join(_REGISTRY)} (run `srbatch models` for the full list)"
        ) from None
