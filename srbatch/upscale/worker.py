"""The Ray Data actor of the upscale job: loads the model once, then reads, decodes, upscales, encodes and uploads each
image of the batches it is handed, returning one small manifest row per image.

Reads from object stores, and encodes with uploads, run on a thread pool so they overlap the model's compute; reads
from local disk are one system call each and run inline (a thread hop costs more than the read). Remote reads are
requested at most ``2 x io_threads`` images ahead and at most as many upscaled images wait for their upload, so the
memory an actor holds does not grow with the batch size. Only keys go in and metric rows come out through Ray's object
store. Every exception of one image becomes that image's failed row.

What is the same for every image of a batch is done once per batch, not once per image: the filesystem of the batch's
inputs and outputs, the manifest columns every row shares (model, device, actor, run, fingerprint, ``finished_at``),
and the result table, built column by column.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from srbatch.errors import SrbatchError
from srbatch.jobkit.actor import ModelActor, error_fields
from srbatch.upscale.config import UpscaleConfig
from srbatch.upscale.manifest import SCHEMA, is_local, put_atomic

__all__ = ["UpscaleWorker", "image_mode", "put_atomic"]

_STAGES = ("read_s", "decode_s", "infer_s", "encode_s", "write_s")


def image_mode(pixels: np.ndarray, alpha: np.ndarray | None) -> str:
    """Channel layout and depth of an image, Pillow style: ``L``, ``LA``, ``RGB``, ``RGBA``, with ``;16`` for 16-bit."""
    base = {1: "L", 3: "RGB"}.get(pixels.shape[2] if pixels.ndim == 3 else 1, f"{pixels.shape[2]}ch")
    if alpha is not None:
        base += "A"
    return base + (";16" if pixels.dtype == np.uint16 else "")


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class UpscaleWorker(ModelActor):
    """Callable class for ``Dataset.map_batches``: one instance per actor, one model per instance.

    Args:
        config: :meth:`UpscaleConfig.model_dump` of the job's configuration.
        fingerprint: the run's parameter fingerprint (recorded in each row).
        torch_threads: intra-op threads for CPU inference (None: leave torch's default).
    """

    job = "upscale"

    def __init__(self, config: dict[str, Any], fingerprint: str, torch_threads: int | None = None) -> None:
        from srbatch.inference import TilingConfig

        self.cfg = UpscaleConfig.model_validate(config)
        self.fingerprint = fingerprint
        self.so = self.cfg.fs_options()
        overlap = self.cfg.tile_overlap

        def tiling(desc: Any) -> TilingConfig:  # unset overlap: the model's receptive halo, capped at 32
            return TilingConfig(tile=self.cfg.tile, overlap=min(desc.info.receptive_halo or 0, 32) if overlap is None
                                else overlap)  # fmt: skip

        self._start_model(self.cfg.model, scale=self.cfg.scale, sha256=self.cfg.sha256, storage_options=self.so,
                          device=self.cfg.device, dtype=self.cfg.dtype, tiling=tiling, outscale=self.cfg.outscale,
                          torch_threads=torch_threads, io_threads=self.cfg.io_threads)  # fmt: skip
        self.ref_up = None
        self.window = 2 * self.cfg.io_threads
        """Remote reads requested ahead, and upscaled images waiting for their upload, at most (memory bound)."""
        self._shared = {
            "model": self.desc.name, "architecture": self.desc.architecture, "model_sha256": self.desc.sha256,
            "scale": self.up.scale, "dtype": str(self.up.dtype).removeprefix("torch."), "device": self.device,
            "gpu_ids": ",".join(self.gpu_ids) or None, "actor_id": self.actor_id, "fingerprint": self.fingerprint,
        }  # fmt: skip

    # -------------------------------------------------------------- I/O

    def _filesystem(self, uris: list[str]) -> Any:
        """The one fsspec filesystem of every URI in ``uris`` (None when they mix protocols or chain them: each is
        then opened on its own, as :func:`~srbatch.io.storage.read_bytes` does)."""
        from srbatch.io.storage import filesystem

        first = uris[0]
        prefix = first.split("://", 1)[0] + "://" if "://" in first else None

        def plain(u: str) -> bool:  # same protocol as the first, no chained URL
            return "::" not in u and (u.startswith(prefix) if prefix else "://" not in u)

        if not all(plain(u) for u in uris):
            return None
        try:
            return filesystem(first, self.so)[0]
        except SrbatchError:
            return None  # every read or write then reports the error on its own row

    def _reader(self, uris: list[str]) -> Callable[[int], tuple[bytes | BaseException, float]]:
        """``read(i)`` -> (bytes of ``uris[i]`` or the exception that is its row's error, seconds), asked for in
        order. Local files are read when asked for; remote ones are requested on the thread pool up to
        :attr:`window` images ahead, so they arrive while the model runs and a large batch never holds more."""
        fs = self._filesystem(uris)
        if fs is not None and is_local(fs):
            return lambda i: self._read(uris[i], fs)
        futures: list[Future[tuple[bytes | BaseException, float]]] = []

        def read(i: int) -> tuple[bytes | BaseException, float]:
            while len(futures) < min(len(uris), i + 1 + self.window):
                futures.append(self.pool.submit(self._read, uris[len(futures)], fs))
            return futures[i].result()

        return read

    def _read(self, uri: str, fs: Any) -> tuple[bytes | BaseException, float]:
        from srbatch.errors import StorageError
        from srbatch.io.storage import read_bytes

        t0 = time.perf_counter()
        try:
            if fs is None:
                data = read_bytes(uri, self.so)
            elif is_local(fs):
                data = _read_local(fs._strip_protocol(uri))
            else:
                data = fs.cat_file(fs._strip_protocol(uri))
            return data, time.perf_counter() - t0
        except SrbatchError as e:
            return e, time.perf_counter() - t0
        except FileNotFoundError:  # the errors of read_bytes
            return StorageError(f"not found: {uri}"), time.perf_counter() - t0
        except Exception as e:
            err = StorageError(f"could not read {uri}: {type(e).__name__}: {e}")
            err.__cause__ = e
            return err, time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - raised again by the caller
            return e, time.perf_counter() - t0

    def _write(self, uri: str, data: bytes, fs: Any) -> float:
        from srbatch.errors import StorageError
        from srbatch.io.storage import filesystem

        t0 = time.perf_counter()
        try:
            if fs is None:
                fs, path = filesystem(uri, self.so)
            else:
                path = fs._strip_protocol(uri)
            put_atomic(fs, path, data)
        except SrbatchError:
            raise
        except Exception as e:
            raise StorageError(f"could not write {uri}: {type(e).__name__}: {e}") from e
        return time.perf_counter() - t0

    # -------------------------------------------------------------- one image

    def _process(self, uri: str, data: bytes, row: dict[str, Any]) -> Any:
        """Decode and upscale one image (and audit it with ``--reference self``); returns the upscaled image."""
        from srbatch.io.images import decode_image

        t = time.perf_counter()
        img = decode_image(data, name=uri)
        row.update(input_width=img.width, input_height=img.height, input_mode=img.mode)
        row["decode_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out = self.up.upscale_image(img)
        if self.cfg.reference == "self":
            row.update(self._audit(img))
        row["infer_s"] = time.perf_counter() - t
        return out

    def _encode_and_write(self, out: Any, out_uri: str, row: dict[str, Any], fs: Any) -> None:
        """Encode and upload one result on the I/O pool, overlapping the next image's inference."""
        from srbatch.io.images import encode_image

        t = time.perf_counter()
        encoded = encode_image(out, format=self.cfg.format, quality=self.cfg.quality)
        row["encode_s"] = time.perf_counter() - t
        row.update(
            output_width=out.width, output_height=out.height, output_mode=image_mode(out.pixels, out.alpha),
            output_bytes=len(encoded),
        )  # fmt: skip
        row["write_s"] = self._write(out_uri, encoded, fs)

    def _audit(self, img: Any) -> dict[str, float]:
        """Downscale ``img`` by the scale with MATLAB bicubic, upscale, measure against ``img`` (paper convention)."""
        from dataclasses import replace

        from srbatch.metrics.quality import measure
        from srbatch.metrics.resize import imresize_uint8

        s = self.desc.scale
        hr = img.pixels[: img.height - img.height % s, : img.width - img.width % s]
        if hr.shape[0] < s or hr.shape[1] < s:
            return {}
        lr = imresize_uint8(hr, 1 / s) if s > 1 else hr
        if self.up.outscale is not None:  # measure at the model's own scale
            from srbatch.inference import Upscaler

            if self.ref_up is None:
                self.ref_up = Upscaler(self.desc, device=self.up.device, dtype=self.up.dtype, tiling=self.up.tiling)
            up = self.ref_up
        else:
            up = self.up
        sr = up.upscale_image(replace(img, pixels=np.ascontiguousarray(lr), alpha=None)).pixels
        m = measure(sr, hr, crop_border=s)
        return {"psnr_y": m.psnr_y, "ssim_y": m.ssim_y, "psnr_rgb": m.psnr_rgb, "ssim_rgb": m.ssim_rgb}

    # -------------------------------------------------------------- a batch

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Process ``batch`` (columns ``input_uri``, ``output_uri``, ``run_id``); one manifest row per input."""
        inputs = [str(u) for u in batch["input_uri"]]
        outputs = [str(u) for u in batch["output_uri"]]
        if not inputs:
            return SCHEMA.empty_table()
        run_id = str(batch["run_id"][0])
        read = self._reader(inputs)
        out_fs = self._filesystem(outputs)
        rows: list[dict[str, Any]] = []
        uploads: list[Future[None] | None] = []
        waited = 0  # uploads before this one are done (or failed)
        for i, (uri, out_uri) in enumerate(zip(inputs, outputs)):
            row: dict[str, Any] = {"input_uri": uri, "output_uri": out_uri, "status": "failed"}
            rows.append(row)
            uploads.append(None)
            while i - waited >= self.window:  # at most `window` upscaled images wait for their encode and upload
                if uploads[waited] is not None:
                    uploads[waited].exception()  # waits; the error, if any, is settled below
                waited += 1
            data, row["read_s"] = read(i)
            try:
                if isinstance(data, BaseException):
                    raise data
                row["input_bytes"] = len(data)
                out = self._process(uri, data, row)
                uploads[i] = self.pool.submit(self._encode_and_write, out, out_uri, row, out_fs)
                del out
            except Exception as e:  # noqa: BLE001 - one broken image is one failed row
                row.update(error_fields(e), output_uri=None)
        for row, fut in zip(rows, uploads):
            self._settle(row, fut)
            row["total_s"] = sum(row.get(k) or 0.0 for k in _STAGES)
        return self._table(rows, run_id, datetime.now(timezone.utc))

    def _table(self, rows: list[dict[str, Any]], run_id: str, finished_at: datetime) -> pa.Table:
        """The rows as a table of exactly the manifest's schema, column by column; the columns every row shares
        (this actor's model and device, the run, ``finished_at``: the batch's rows are stamped together) once."""
        shared = {**self._shared, "run_id": run_id, "finished_at": finished_at}
        n = len(rows)
        cols = [pa.array([shared[f.name]] * n, type=f.type) if f.name in shared else
                pa.array([r.get(f.name) for r in rows], type=f.type) for f in SCHEMA]  # fmt: skip
        return pa.Table.from_arrays(cols, schema=SCHEMA)
