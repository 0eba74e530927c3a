"""Single-process inference: :class:`Upscaler` (tiling, colour handling, precision) and :class:`TilingConfig`.

Both are loaded on first use (they import torch and pydantic), so that the torch-free helpers of this package
(:mod:`srbatch.inference.memory`'s sizes) cost the job's CPU steps nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["TilingConfig", "Upscaler"]

if TYPE_CHECKING:
    from srbatch.inference.tiling import TilingConfig
    from srbatch.inference.upscaler import Upscaler


def __getattr__(name: str) -> Any:
    if name == "TilingConfig":
        from srbatch.inference.tiling import TilingConfig

        return TilingConfig
    if name == "Upscaler":
        from srbatch.inference.upscaler import Upscaler

        return Upscaler
    raise AttributeError(f"module 'srbatch.inference' has no attribute {name!r}")
