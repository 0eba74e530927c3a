"""srbatch: super-resolve, measure and retrain on whole image datasets.

Public API::

    desc = srbatch.load_model("path/to/IMDN_x4.pth")          # or "bicubic", s3://..., memory://...
    up = srbatch.Upscaler(desc, device="auto", tiling=srbatch.TilingConfig(tile=256))
    out = up.upscale_image(srbatch.decode_image(data))
    result = srbatch.evaluate("bicubic", scale=4, hr="Set5/image_SRF_4", lr="Set5/image_SRF_4")
    job = srbatch.run_job(srbatch.UpscaleConfig(input="s3://photos/raw/", output="s3://photos/x4/", model="bicubic"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from srbatch.errors import (
    ChecksumMismatchError,
    ConfigError,
    ImageDecodeError,
    ImageTooLargeError,
    InferenceError,
    SrbatchError,
    StorageError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
    WeightsError,
)

__version__ = "0.1.0"

# Heavy modules (torch, spandrel) load on first use, so `import srbatch` stays cheap for tools that only read config.
_LAZY = {
    "load_model": "srbatch.models.loader",
    "build_model": "srbatch.models.loader",
    "save_model": "srbatch.models.loader",
    "ModelDescriptor": "srbatch.models.descriptor",
    "ArchInfo": "srbatch.models.descriptor",
    "Upscaler": "srbatch.inference",
    "TilingConfig": "srbatch.inference",
    "evaluate": "srbatch.evaluate",
    "decode_image": "srbatch.io.images",
    "encode_image": "srbatch.io.images",
    "DecodedImage": "srbatch.io.images",
    "psnr": "srbatch.metrics.quality",
    "ssim": "srbatch.metrics.quality",
    "imresize": "srbatch.metrics.resize",
    "UpscaleConfig": "srbatch.upscale.config",
    "run_job": "srbatch.upscale.runner",
    "JobResult": "srbatch.upscale.runner",
    "read_manifest": "srbatch.upscale.manifest",
}

__all__ = [
    "ChecksumMismatchError",
    "ConfigError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "InferenceError",
    "SrbatchError",
    "StorageError",
    "UnknownArchitectureError",
    "UnsafeCheckpointError",
    "WeightsError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'srbatch' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from srbatch.evaluate import evaluate
    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.upscale.config import UpscaleConfig
    from srbatch.upscale.manifest import read_manifest
    from srbatch.upscale.runner import JobResult, run_job
    from srbatch.io.images import DecodedImage, decode_image, encode_image
    from srbatch.metrics.quality import psnr, ssim
    from srbatch.metrics.resize import imresize
    from srbatch.models.descriptor import ArchInfo, ModelDescriptor
    from srbatch.models.loader import build_model, load_model, save_model
