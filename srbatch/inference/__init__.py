"""Single-process inference: :class:`Upscaler` (tiling, colour handling, precision) and :class:`TilingConfig`."""

from srbatch.inference.tiling import TilingConfig
from srbatch.inference.upscaler import Upscaler

__all__ = ["TilingConfig", "Upscaler"]
