"""Upscale files on this machine, without Ray: the engine applied to a folder, a glob or a list of URIs.

This is what ``srbatch upscale`` and ``python jobs/upscale.py`` run today. The distributed Ray job (issue 3) will
reuse the same per-image step (:func:`upscale_one`).
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from srbatch.errors import SrbatchError
from srbatch.io.images import decode_image, encode_image
from srbatch.io.storage import join_uri, list_images, read_bytes, write_bytes

log = logging.getLogger("srbatch.local")

SAMPLES = "samples"


def sample_images_dir() -> str:
    """Folder of the sample images bundled with the package (CC0/public domain, see their PROVENANCE.md)."""
    return str(resources.files("srbatch") / "data" / SAMPLES)


@dataclass
class FileResult:
    """Outcome of one input file."""

    input_uri: str
    output_uri: str | None
    status: str  # "ok" or "failed"
    error: str | None = None
    in_size: tuple[int, int] | None = None
    out_size: tuple[int, int] | None = None
    seconds: float = 0.0


def output_name(input_uri: str, root: str, fmt: str) -> str:
    """Relative output key: the input's path under ``root`` with the extension of ``fmt``."""
    rel = input_uri[len(root.rstrip("/")) + 1 :] if input_uri.startswith(root.rstrip("/") + "/") else None
    rel = rel or posixpath.basename(input_uri)
    ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif"}[fmt]
    return posixpath.splitext(rel)[0] + ext


def upscale_one(upscaler: Any, data: bytes, *, name: str, fmt: str, quality: int | None) -> tuple[bytes, Any, Any]:
    """Decode ``data``, upscale it, encode it as ``fmt``; returns (bytes, input image, output image)."""
    img = decode_image(data, name=name)
    out = upscaler.upscale_image(img)
    return encode_image(out, format=fmt, quality=quality), img, out


def upscale_files(
    inputs: str,
    output: str,
    *,
    model: str = "bicubic",
    scale: int = 4,
    fmt: str = "PNG",
    quality: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    tile: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_result: Callable[[FileResult], None] | None = None,
) -> list[FileResult]:
    """Upscale every image under ``inputs`` into ``output`` (same relative paths). A broken file is one failed
    result; the others go on."""
    from srbatch.inference import TilingConfig, Upscaler
    from srbatch.models.loader import load_model

    desc = load_model(model, scale=scale, storage_options=storage_options)
    up = Upscaler(desc, device=device, dtype=dtype, tiling=TilingConfig(tile=tile))
    log.info("model %s (%s) x%d on %s", desc.name, desc.architecture, desc.scale, up.device)
    uris = list_images(inputs, storage_options)
    root = inputs if not any(c in inputs for c in "*?[") else inputs.split("*")[0].rsplit("/", 1)[0]
    results = []
    for uri in uris:
        t0 = time.perf_counter()
        out_uri = join_uri(output, output_name(uri, root, fmt.upper()))
        try:
            data, img, out = upscale_one(up, read_bytes(uri, storage_options), name=uri, fmt=fmt, quality=quality)
            write_bytes(out_uri, data, storage_options)
            res = FileResult(uri, out_uri, "ok", None, (img.width, img.height), (out.width, out.height))
        except SrbatchError as e:
            res = FileResult(uri, None, "failed", f"{type(e).__name__}: {e}")
        res.seconds = time.perf_counter() - t0
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results
