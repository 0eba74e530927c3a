"""Community checkpoints through spandrel, wrapped in the same descriptor as native models."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from srbatch.models.descriptor import ArchInfo, ModelDescriptor

log = logging.getLogger("srbatch.models")


class SpandrelModule(nn.Module):
    """An ``nn.Module`` over a spandrel ``ImageModelDescriptor`` that calls it the way spandrel does."""

    def __init__(self, desc: object) -> None:
        super().__init__()
        self.inner = desc.model  # type: ignore[attr-defined]
        self._call_fn = desc._call_fn  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call_fn(self.inner, x)


def try_spandrel(state_dict: Mapping[str, torch.Tensor]) -> tuple[nn.Module, str, ArchInfo] | None:
    """Load ``state_dict`` with spandrel; ``(module, architecture, info)`` or None if spandrel does not know it."""
    try:
        from spandrel import ImageModelDescriptor, ModelLoader, ModelTiling, UnsupportedModelError
    except Exception as e:  # spandrel imports torchvision; a broken install must not break native models
        log.warning("spandrel unavailable (%s): only native architectures can be loaded", e)
        return None
    try:
        desc = ModelLoader().load_from_state_dict(dict(state_dict))
    except UnsupportedModelError:
        return None
    if not isinstance(desc, ImageModelDescriptor):
        return None
    req = desc.size_requirements
    multiple = max(int(req.multiple_of or 1), 1)
    dtypes = [torch.float32]
    if desc.supports_half:
        dtypes.append(torch.float16)
    if desc.supports_bfloat16:
        dtypes.append(torch.bfloat16)
    tile_hint = None if desc.tiling == ModelTiling.INTERNAL else 256
    info = ArchInfo(
        scale=int(desc.scale),
        in_channels=int(desc.input_channels),
        out_channels=int(desc.output_channels),
        color_space="RGB" if desc.input_channels >= 3 else "L",
        size_multiple=multiple,
        receptive_halo=32,
        tile_hint=tile_hint,
        dtypes=tuple(dtypes),
        local=None,  # spandrel does not say whether an architecture pools over the whole image
    )
    return SpandrelModule(desc), f"spandrel:{desc.architecture.id}", info


def spandrel_descriptor(
    state_dict: Mapping[str, torch.Tensor], *, name: str, source: str, sha256: str
) -> ModelDescriptor | None:
    """A :class:`ModelDescriptor` for a spandrel-detected checkpoint, or None."""
    found = try_spandrel(state_dict)
    if found is None:
        return None
    module, arch, info = found
    module.eval()
    return ModelDescriptor(module=module, architecture=arch, info=info, name=name, source=source, sha256=sha256)
