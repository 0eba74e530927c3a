"""What both measurements of the benchmark read: the images (synthetic or the user's), the storage they are put in
(a temporary folder or a moto S3 server on loopback) and the model (random weights saved there, or a checkpoint)."""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BUCKET", "BenchmarkError", "Inputs", "Storage", "copy_remote_checkpoint", "prepare_model",
           "synthetic_inputs", "user_inputs"]  # fmt: skip

log = logging.getLogger("srbatch.benchmark")

BUCKET = "srbatch-bench"


class BenchmarkError(Exception):
    """A setup problem of the benchmark itself (exit code 2), with the fix in its message."""


@dataclass
class Inputs:
    """The benchmark's images as file bytes, and how they were made."""

    files: list[tuple[str, bytes]]
    source: str
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height)


def synthetic_inputs(n: int, size: int) -> Inputs:
    """``n`` different ``size`` x ``size`` RGB PNGs: random square crops of the bundled samples, resized (Lanczos)."""
    import io

    import numpy as np
    from PIL import Image

    from srbatch.local import sample_images_dir

    root = Path(sample_images_dir())
    samples = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not samples:
        raise BenchmarkError(f"no sample images under {root}; give your own with --input")
    opened = []
    for s in samples:
        with Image.open(s) as im:
            opened.append(im.convert("RGB"))
    flips = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]
    files = []
    for i in range(n):
        im = opened[i % len(opened)]
        w, h = im.size
        short = min(w, h)
        rng = np.random.default_rng(i)
        # crops larger than --size are reduced; smaller samples give crops of half to all of their short side, enlarged
        side = int(rng.integers(size if size <= short else max(1, short // 2), short + 1))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = im.crop((x0, y0, x0 + side, y0 + side))
        flip = flips[(i // len(opened)) % len(flips)]
        if flip is not None:
            crop = crop.transpose(flip)
        if crop.size != (size, size):
            crop = crop.resize((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        files.append((f"bench_{i:03d}.png", buf.getvalue()))
    largest = max(opened, key=lambda im: im.size[0] * im.size[1]).size
    names = ", ".join(s.name for s in samples)
    note = (f"synthetic {size}x{size} RGB PNGs: random square crops of the bundled samples ({names}; the largest is "
            f"{largest[0]}x{largest[1]}), flipped and resized with Lanczos")  # fmt: skip
    return Inputs(files, note, [(size, size)] * n)


def user_inputs(spec: str, n: int) -> Inputs:
    """The first ``n`` images under ``spec`` (sorted), read once."""
    from srbatch.io.storage import list_images, read_bytes

    uris = list_images(spec)[:n]
    files = []
    for i, u in enumerate(uris):
        base = posixpath.basename(u.rstrip("/"))
        files.append((f"{i:03d}_{base}", read_bytes(u)))
    note = "" if len(uris) >= n else f" (only {len(uris)} found, fewer than --images {n})"
    return Inputs(files, f"{len(uris)} images from {spec}{note}")


# --------------------------------------------------------------------------------------------------- storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Storage:
    """Where the benchmark puts its inputs, model and outputs: a temporary folder, or a moto S3 server on loopback."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.tmp = tempfile.mkdtemp(prefix="srbatch-bench-")
        self.server: Any = None
        self.endpoint: str | None = None
        self.env: dict[str, str] = {}
        self._old_env: dict[str, str | None] = {}
        if kind == "local":
            self.root = os.path.join(self.tmp, "store")
            os.makedirs(self.root)
            return
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            self.close()
            raise BenchmarkError(
                "--storage s3 starts a local S3 server with moto, which is not installed; "
                "run with --storage local, or `pip install 'moto[server]'`"
            ) from None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        port = _free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        # Set before Ray starts, so that the job's actors inherit them (and passed as runtime_env when joining).
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._old_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint})
        fs.mkdir(BUCKET)
        fs.invalidate_cache()
        self.root = f"s3://{BUCKET}"

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage options for this storage."""
        return {"client_kwargs": {"endpoint_url": self.endpoint}} if self.endpoint else {}

    def uri(self, *parts: str) -> str:
        from srbatch.io.storage import join_uri

        return join_uri(self.root, *parts)

    def describe(self) -> str:
        return f"s3 (moto server at {self.endpoint})" if self.kind == "s3" else f"local folder {self.root}"

    def label(self) -> str:
        """The storage as a benchmark report names it (the S3 server's port is of no interest once it is gone)."""
        return self.describe() if self.kind == "local" else "s3 (moto server on 127.0.0.1, for this run)"

    def close(self) -> None:
        if self.server is not None:
            try:
                self.server.stop()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                log.warning("could not stop the moto server: %s", e)
            self.server = None
        for k, v in self._old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._old_env = {}
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- model


def prepare_model(name: str, scale: int, store: Storage) -> tuple[str, str]:
    """The model reference both measurements load, and a note on where it came from.

    Registry names that need weights are built with random weights (seed 0) and saved into the benchmark's storage;
    weight-free names pass through; checkpoint paths pass through, remote checkpoint URIs are copied into the
    benchmark's storage (read before the S3 server's credentials are in the environment: see :func:`main`).
    """
    import torch

    from srbatch.errors import ConfigError
    from srbatch.models.loader import build_model, save_model
    from srbatch.models.registry import architectures, variants

    archs, var = architectures(), variants()
    if name in archs or name in var:
        arch = var[name][0] if name in var else name
        if not archs[arch].needs_weights:
            return name, "no weights"
        torch.manual_seed(0)
        try:
            desc = build_model(name, scale=scale)
        except ConfigError:
            desc = build_model(name)  # scale-agnostic architectures take no scale argument
        uri = store.uri("models", f"{name}_x{scale}_random.safetensors")
        save_model(desc, uri, storage_options=store.options)
        return uri, "random weights (torch seed 0)"
    return name, "checkpoint"


def copy_remote_checkpoint(model: str) -> bytes | None:
    """The bytes of a checkpoint given as a remote URI (None for local paths and registry names)."""
    if "://" not in model or model.startswith("file://"):
        return None
    from srbatch.io.storage import read_bytes

    return read_bytes(model)
