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
from srbatch.upscale.manifest import SCHEMA, is_local, put_atomic, put_file_atomic

__all__ = ["STREAM_INPUT_PIXELS", "STREAM_OUTPUT_BYTES", "UpscaleWorker", "image_mode", "put_atomic"]

_STAGES = ("read_s", "decode_s", "infer_s", "encode_s", "write_s")

STREAM_OUTPUT_BYTES = 64 * 1024**2
"""PNG and TIFF outputs larger than this (as uint8/uint16 samples) are written band by band while the model runs,
never held whole: PNG as one streamed zlib stream, TIFF as a tiled, deflate-compressed BigTIFF."""
STREAM_INPUT_PIXELS = 64 * 1024**2
"""TIFF inputs with more pixels than this, or whose samples take more than a quarter of the memory budget, are read
region by region (tile by tile), never decoded whole; they are not subject to the decompression-bomb limit, which
guards formats that must be decoded whole."""
_TIFF_EXT = (".tif", ".tiff", ".btf", ".tf8")
_BLOCK = 4 * 1024**2  # read-ahead of a streamed TIFF on object storage (s3fs's default of 50 MiB is for whole reads)
_TILE = (512, 512)  # tiles of streamed TIFF outputs


class _Whole:
    """A decoded image whose output is streamed: upscaled band by band by :meth:`UpscaleWorker._stream`."""

    def __init__(self, img: Any) -> None:
        self.img = img


class _StreamedTiff:
    """A large TIFF input opened for region reads (its file stays open until the image is done)."""

    def __init__(self, source: Any, fh: Any, size: int) -> None:
        self.source, self.fh, self.size = source, fh, size

    def close(self) -> None:
        try:
            self.source.close()
        finally:
            self.fh.close()


def image_mode(pixels: np.ndarray, alpha: np.ndarray | None) -> str:
    """Channel layout and depth of an image, Pillow style: ``L``, ``LA``, ``RGB``, ``RGBA``, with ``;16`` for 16-bit."""
    return layout_mode(pixels.shape[2] if pixels.ndim == 3 else 1, pixels.dtype, alpha is not None)


def layout_mode(channels: int, dtype: Any, has_alpha: bool) -> str:
    """:func:`image_mode` from the layout alone (images that are never held whole)."""
    base = {1: "L", 3: "RGB"}.get(channels, f"{channels}ch") + ("A" if has_alpha else "")
    return base + (";16" if np.dtype(dtype) == np.uint16 else "")


def is_local_path(fh: Any) -> bool:
    """True for a plain local file object (no read-ahead buffer of its own to count)."""
    import io

    return isinstance(fh, io.BufferedReader)


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ImageIO:
    """Reading inputs and writing outputs, shared by the model actor (which does it all in the fused pipeline) and the
    CPU stages of the staged one (:mod:`srbatch.upscale.stages`). A subclass sets ``cfg``, ``so`` (storage options),
    ``pool`` (a thread pool) and ``window``, and says how much memory one image may use (:meth:`_budget`)."""

    cfg: UpscaleConfig
    so: dict[str, Any]
    pool: Any
    window: int

    def _budget(self) -> int:
        raise NotImplementedError

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
            if uri.lower().endswith(_TIFF_EXT):
                big = self._open_large_tiff(uri, fs)
                if big is not None:
                    return big, time.perf_counter() - t0
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

    def _open_large_tiff(self, uri: str, fs: Any) -> _StreamedTiff | None:
        """A TIFF with more than :data:`STREAM_INPUT_PIXELS` pixels (or samples over a quarter of the memory budget)
        opened for region reads; None for anything else (smaller TIFFs, and files that are not TIFF or whose header
        is broken: the whole-file path reports them)."""
        from srbatch.errors import ImageDecodeError
        from srbatch.io.tiff import TiffSource

        fs, path = self._fs_path(uri, fs)
        fh = open(path, "rb") if is_local(fs) else fs.open(path, "rb", block_size=_BLOCK, cache_type="bytes")
        try:
            source = TiffSource(fh, name=uri, cache_bytes=self._cache_bytes())
        except ImageDecodeError:
            fh.close()
            return None
        except BaseException:
            fh.close()
            raise
        px = source.height * source.width
        samples = px * (source.channels + int(bool(source.has_alpha))) * np.dtype(source.dtype).itemsize
        if px <= STREAM_INPUT_PIXELS and samples <= self._budget() // 4:
            source.close()
            fh.close()
            return None
        size = int(fs.size(path) or 0)
        return _StreamedTiff(source, fh, size)

    def _fs_path(self, uri: str, fs: Any) -> tuple[Any, str]:
        """``(filesystem, path)`` of ``uri``: the batch's filesystem when there is one, else its own."""
        if fs is None:
            from srbatch.io.storage import filesystem

            return filesystem(uri, self.so)
        return fs, fs._strip_protocol(uri)

    def _cache_bytes(self) -> int:
        """The decoded-tile cache of a streamed TIFF: an eighth of the budget, between 8 and 64 MiB."""
        return int(min(64 * 1024**2, max(8 * 1024**2, self._budget() // 8)))

    def _write(self, uri: str, data: bytes, fs: Any) -> float:
        from srbatch.errors import StorageError
        from srbatch.io.storage import filesystem

        t0 = time.perf_counter()
        try:
            fs, path = self._fs_path(uri, fs)
            put_atomic(fs, path, data)
        except SrbatchError:
            raise
        except Exception as e:
            raise StorageError(f"could not write {uri}: {type(e).__name__}: {e}") from e
        return time.perf_counter() - t0

    def _encode_and_write(self, out: Any, out_uri: str, row: dict[str, Any], fs: Any) -> None:
        """Encode and upload one result on the actor's I/O pool, overlapping the next image's inference."""
        row["write_s"] = self._write(out_uri, self._encode_row(out, row), fs)

    def _encode_row(self, out: Any, row: dict[str, Any]) -> bytes:
        """The output file's bytes for ``out``; its encode time and output size/mode recorded in ``row``."""
        t = time.perf_counter()
        encoded = self._encode(out)
        row["encode_s"] = time.perf_counter() - t
        alpha = None if self.cfg.format == "JPEG" else out.alpha
        row.update(output_width=out.width, output_height=out.height, output_mode=image_mode(out.pixels, alpha),
                   output_bytes=len(encoded))  # fmt: skip
        if self.cfg.quality_metric == "niqe":
            t = time.perf_counter()
            row["niqe"] = self._niqe(out, encoded)
            row["encode_s"] += time.perf_counter() - t
        return encoded

    def _niqe(self, out: Any, encoded: bytes) -> float | None:
        """NIQE of the output as written (``--quality-metric niqe``): of the pixels for lossless formats, of the
        decoded file for JPEG and lossy WebP; None when NIQE is undefined for it (under 192x192, or flat)."""
        from srbatch.metrics.niqe import NiqeError, niqe

        pixels = out.pixels
        if self.cfg.format == "JPEG" or (self.cfg.format == "WEBP" and not self.cfg.webp_lossless):
            from srbatch.io.images import decode_image

            pixels = decode_image(encoded, name="output", max_pixels=out.width * out.height + 1).pixels
        try:
            return niqe(pixels)
        except NiqeError:
            return None

    def _encode(self, out: Any) -> bytes:
        """The output file's bytes for an upscaled image, with the job's codec settings."""
        from srbatch.io.images import encode_image

        return encode_image(out, **self.cfg.encode_options())


class UpscaleWorker(ModelActor, ImageIO):
    """Callable class for ``Dataset.map_batches``: one instance per actor, one model per instance.

    Args:
        config: :meth:`UpscaleConfig.model_dump` of the job's configuration.
        fingerprint: the run's parameter fingerprint (recorded in each row).
        torch_threads: intra-op threads for CPU inference (None: leave torch's default).
    """

    job = "upscale"

    def __init__(
        self, config: dict[str, Any], fingerprint: str, torch_threads: int | None = None, memory_share: float = 0.5
    ) -> None:
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
                          torch_threads=torch_threads, io_threads=self.cfg.io_threads,
                          max_memory=self.cfg.max_memory_bytes(), memory_share=memory_share,
                          engine={"device_batch": self.cfg.device_batch, "channels_last": self.cfg.channels_last,
                                  "compile": self.cfg.compile})  # fmt: skip
        self.ref_up = None
        self.window = 2 * self.cfg.io_threads
        """Remote reads requested ahead, and upscaled images waiting for their upload, at most (memory bound)."""
        self._shared = {
            "model": self.desc.name, "architecture": self.desc.architecture, "model_sha256": self.desc.sha256,
            "scale": self.up.scale, "dtype": str(self.up.dtype).removeprefix("torch."), "device": self.device,
            "gpu_ids": ",".join(self.gpu_ids) or None, "actor_id": self.actor_id, "fingerprint": self.fingerprint,
        }  # fmt: skip
        self._local = self.desc.info.local
        self._jpeg_on_device = self.cfg.jpeg_on_device(self.up.device.type)  # a ConfigError for gpu without CUDA

    def _budget(self) -> int:
        return self.up.budget()

    # -------------------------------------------------------------- one image

    def _process(self, uri: str, data: bytes, row: dict[str, Any]) -> Any:
        """Decode and upscale one image (and audit it with ``--reference self``); returns the upscaled image, or the
        decoded one when its output is streamed (:meth:`_stream`, which upscales while it encodes)."""
        from srbatch.io.images import decode_image

        t = time.perf_counter()
        img = decode_image(data, name=uri, max_pixels=self.cfg.max_pixels)
        row.update(input_width=img.width, input_height=img.height, input_mode=img.mode)
        row["decode_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if self._streams(img.height, img.width, img.channels + (img.alpha is not None), img.pixels.itemsize):
            if self.cfg.reference == "self":
                row.update(self._audit(img))
            row["infer_s"] = time.perf_counter() - t
            return _Whole(img)
        out = self.up.upscale_image(img)
        self._record_plan(row)
        if self.cfg.reference == "self":
            row.update(self._audit(img))
        row["infer_s"] = time.perf_counter() - t
        return out

    def _streams(self, height: int, width: int, channels: int, itemsize: int) -> bool:
        """True when the output goes band by band to a streamed PNG/TIFF writer instead of a whole array."""
        oh, ow = self.up.output_size(height, width)
        return self.cfg.format in ("PNG", "TIFF") and oh * ow * channels * itemsize > STREAM_OUTPUT_BYTES

    def _record_plan(self, row: dict[str, Any]) -> None:
        plan = self.up.last_plan
        tile = plan.tile if plan is not None else None
        if tile is not None:
            row.update(tile_height=tile[0], tile_width=tile[1], tile_exact=self._local)

    def _stream(self, src: Any, uri: str, out_uri: str, row: dict[str, Any], fs: Any) -> None:
        """Upscale ``src`` (a decoded image, or a large TIFF read region by region) and write the output band by
        band to ``out_uri`` (PNG or tiled BigTIFF), never holding the whole output: infer, encode and upload."""
        from srbatch.inference.upscaler import image_reader

        if isinstance(src, _StreamedTiff):
            s = src.source
            h, w, c, has_alpha, dtype = s.height, s.width, s.channels, bool(s.has_alpha), np.dtype(s.dtype)
            icc, read, held, ome = s.icc_profile, s.read_region, False, bool(s.is_ome)
            row.update(input_width=w, input_height=h, input_bytes=src.size,
                       input_mode=layout_mode(c, dtype, has_alpha))
        else:
            img = src.img
            h, w, c, has_alpha, dtype, icc, held = img.height, img.width, img.channels, img.alpha is not None, \
                img.pixels.dtype, img.icc_profile, True
            ome = False
            read = image_reader(img)

        t0 = time.perf_counter()
        ct = c + int(has_alpha)
        reserve = 0
        if isinstance(src, _StreamedTiff):  # its tile cache and read-ahead
            reserve += self._cache_bytes() + (0 if is_local_path(src.fh) else 2 * _BLOCK)
        oh0, ow0 = self.up.output_size(h, w)
        # the writer: a row of tiles (TIFF) or filter buffers (PNG); alpha bands are joined to the colour in a copy
        reserve += 2 * _TILE[0] * ow0 * ct * dtype.itemsize if self.cfg.format == "TIFF" else 4 * 1024**2
        plan = self.up.plan(h, w, channels=c, has_alpha=has_alpha, itemsize=dtype.itemsize, hold_input=held,
                            hold_output=False, reserve=reserve)  # fmt: skip
        self._record_plan(row)
        oh, ow = plan.out_height, plan.out_width
        timing = {"infer": time.perf_counter() - t0}

        def bands() -> Any:
            it = self.up.iter_bands(read, plan, channels=c, has_alpha=has_alpha, dtype=dtype, name=uri,
                                    progress=lambda msg: print(f"srbatch actor {self.actor_id[:12]}: {msg}", flush=True))
            while True:
                t = time.perf_counter()
                try:
                    _, band, band_alpha = next(it)
                except StopIteration:
                    return
                timing["infer"] += time.perf_counter() - t
                yield band if band_alpha is None else np.concatenate([band, band_alpha[..., None]], axis=2)

        fmt = self.cfg.format

        def write(fh: Any) -> None:
            if fmt == "PNG":
                from srbatch.io.pngstream import write_png_stream

                write_png_stream(fh, bands(), height=oh, width=ow, channels=c, dtype=dtype, has_alpha=has_alpha,
                                 icc_profile=icc, level=self.cfg.png_compression)  # fmt: skip
            else:
                from srbatch.io.tiff import write_tiled_tiff

                write_tiled_tiff(fh, bands(), height=oh, width=ow, channels=c, dtype=dtype, has_alpha=has_alpha,
                                 icc_profile=icc, tile=_TILE, pyramid=self.cfg.tiff_pyramid, ome=ome)  # fmt: skip

        fs, path = self._fs_path(out_uri, fs)

        def timed_write(fh: Any) -> None:
            t = time.perf_counter()
            write(fh)
            timing["write"] = time.perf_counter() - t

        infer_before = timing["infer"]
        t = time.perf_counter()
        try:
            size = put_file_atomic(fs, path, timed_write)
        except SrbatchError:
            raise
        except Exception as e:
            from srbatch.errors import StorageError

            raise StorageError(f"could not write {out_uri}: {type(e).__name__}: {e}") from e
        finally:
            if isinstance(src, _StreamedTiff):
                src.close()
        total = time.perf_counter() - t
        row["infer_s"] = (row.get("infer_s") or 0.0) + timing["infer"]
        row["encode_s"] = max(timing["write"] - (timing["infer"] - infer_before), 0.0)  # the writer, less the model
        row["write_s"] = max(total - timing["write"], 0.0)  # rename, or the upload
        row.update(output_width=ow, output_height=oh, output_bytes=size,
                   output_mode=layout_mode(c, dtype, has_alpha))

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
        """Process ``batch`` (columns ``input_uri``, ``output_uri``, ``run_id``); one manifest row per input.

        In the staged pipeline the batch comes from the decode stage instead (columns ``row``, ``kind``,
        ``payload``; see :mod:`srbatch.upscale.stages`) and so does the result, for the encode stage."""
        if "payload" in batch:
            return self.model_stage(batch)
        if "segment" in batch:
            return self._with_segments(batch)
        return self._image_batch(batch)

    def _image_batch(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The fused pipeline's batch of images (columns ``input_uri``, ``output_uri``, ``run_id``)."""
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
                if isinstance(data, _StreamedTiff):  # a huge TIFF: read region by region, written band by band
                    out: Any = data
                else:
                    row["input_bytes"] = len(data)
                    out = self._process(uri, data, row)
                if isinstance(out, (_StreamedTiff, _Whole)):
                    for k in range(waited, i):  # one large image at a time: the uploads before it finish first
                        if uploads[k] is not None:
                            uploads[k].exception()
                    self._stream(out, uri, out_uri, row, out_fs)
                    row["status"] = "ok"
                else:
                    uploads[i] = self.pool.submit(self._encode_and_write, out, out_uri, row, out_fs)
                    if out.pixels.nbytes > STREAM_OUTPUT_BYTES:  # a large JPEG/WebP: encoded before the next
                        uploads[i].exception()
                del out
            except Exception as e:  # noqa: BLE001 - one broken image is one failed row
                if isinstance(data, _StreamedTiff):
                    data.close()
                row.update(error_fields(e), output_uri=None)
        for row, fut in zip(rows, uploads):
            self._settle(row, fut)
            row["total_s"] = sum(row.get(k) or 0.0 for k in _STAGES)
        return self._table(rows, run_id, datetime.now(timezone.utc))

    # -------------------------------------------------------------- video segments

    def _with_segments(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """A batch that may hold video segments (column ``segment``: a segment item's JSON, ``""`` for images): the
        images go the image path, each segment is decoded, upscaled frame by frame and encoded into its segment file
        (:func:`srbatch.upscale.video.process_segment_item`); one row per item either way."""
        is_seg = np.array([isinstance(x, str) and x != "" for x in batch["segment"]], dtype=bool)
        cols = ("input_uri", "output_uri", "run_id")
        parts = []
        if (~is_seg).any():
            parts.append(self._image_batch({c: batch[c][~is_seg] for c in cols}))
        if is_seg.any():
            parts.append(self._segments({c: batch[c][is_seg] for c in (*cols, "segment")}))
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def _segments(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from srbatch.upscale.video import process_segment_item

        temporal = getattr(self.up, "upscale_frames", None)  # temporal models (radius > 0): a window -> a frame
        rows = []
        for key, out_uri, item in zip(batch["input_uri"], batch["output_uri"], batch["segment"]):
            row: dict[str, Any] = {"input_uri": str(key), "output_uri": str(out_uri), "status": "failed",
                                   "media": "video-segment"}
            try:
                row.update(process_segment_item({"segment": str(item), "output_uri": str(out_uri)}, self.up,
                                                self.cfg, self.so, temporal))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one broken segment is one failed row (its video's error)
                row.update(error_fields(e))
            row["total_s"] = sum(row.get(k) or 0.0 for k in _STAGES)
            rows.append(row)
        return self._table(rows, str(batch["run_id"][0]), datetime.now(timezone.utc))

    def model_stage(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The model's part of the staged pipeline: upscale the decoded images of ``batch`` together (same-size images
        in one forward pass), and hand them on as uint8/uint16 arrays (or JPEG bytes encoded on the GPU) to the
        encode stage. Images the decode stage left to the actor (too large to pass around: they are read region by
        region and written band by band) are done here from start to end, as in the fused pipeline."""
        from srbatch.upscale import stages

        rows, kinds, payloads = stages.unpack(batch)
        out_kinds: list[str] = list(kinds)
        out_payloads: list[bytes | None] = [None] * len(rows)
        todo = [i for i, k in enumerate(kinds) if k == stages.DECODED]
        imgs = [stages.loads(payloads[i]) for i in todo]
        t = time.perf_counter()
        results = self.up.upscale_images(imgs) if imgs else []
        per_image = (time.perf_counter() - t) / max(len(todo), 1)
        for i, img, res in zip(todo, imgs, results):
            row = rows[i]
            row["infer_s"] = per_image
            try:
                if isinstance(res, BaseException):
                    raise res
                if self.cfg.reference == "self":
                    t = time.perf_counter()
                    row.update(self._audit(img))
                    row["infer_s"] += time.perf_counter() - t
                out_kinds[i], out_payloads[i] = self._hand_on(res, row)
            except Exception as e:  # noqa: BLE001 - one broken image is one failed row
                row.update(error_fields(e), output_uri=None, status="failed")
                out_kinds[i] = stages.DONE
        del imgs, results
        out_fs = None
        for i, kind in enumerate(kinds):
            if kind not in (stages.BYTES, stages.LARGE):
                continue
            row = rows[i]
            uri, out_uri = row["input_uri"], row["output_uri"]
            out_fs = out_fs or self._filesystem([out_uri])
            try:
                if kind == stages.BYTES:
                    data = payloads[i]
                else:
                    data, read_s = self._read(uri, self._filesystem([uri]))
                    row["read_s"] = (row.get("read_s") or 0.0) + read_s
                    if isinstance(data, BaseException):
                        raise data
                self._one(uri, out_uri, data, row, out_fs)
            except Exception as e:  # noqa: BLE001 - one broken image is one failed row
                row.update(error_fields(e), output_uri=None, status="failed")
            out_kinds[i] = stages.DONE
        for row in rows:
            row.update(self._shared)
        return stages.pack(rows, out_kinds, out_payloads)

    def _hand_on(self, out: Any, row: dict[str, Any]) -> tuple[str, bytes]:
        """What the model stage passes to the encode stage for one upscaled image: JPEG bytes when they are encoded
        on the GPU, else the image itself."""
        from srbatch.upscale import stages

        self._record_plan(row)
        if self._jpeg_on_device:
            return stages.ENCODED, self._encode_row(out, row)
        return stages.UPSCALED, stages.dumps(out)

    def _encode(self, out: Any) -> bytes:
        """As :meth:`ImageIO._encode`, but JPEG on the GPU (nvJPEG) when ``jpeg_encoder`` says so."""
        if not self._jpeg_on_device:
            return super()._encode(out)
        import torch

        from srbatch.io.images import encode_jpeg_tensor

        pixels = torch.from_numpy(out.pixels).to(self.up.device)
        return encode_jpeg_tensor(pixels, quality=self.cfg.quality or 95, icc_profile=out.icc_profile)

    def _one(self, uri: str, out_uri: str, data: Any, row: dict[str, Any], out_fs: Any) -> None:
        """Everything for one image the actor does alone: decode (or region reads), upscale, encode, write."""
        if isinstance(data, _StreamedTiff):
            self._stream(data, uri, out_uri, row, out_fs)
        else:
            row["input_bytes"] = len(data)
            out = self._process(uri, data, row)
            if isinstance(out, _Whole):
                self._stream(out, uri, out_uri, row, out_fs)
            else:
                self._encode_and_write(out, out_uri, row, out_fs)
        row["status"] = "ok"

    def _table(self, rows: list[dict[str, Any]], run_id: str, finished_at: datetime) -> pa.Table:
        return rows_table(rows, {**self._shared, "run_id": run_id, "finished_at": finished_at})


def rows_table(rows: list[dict[str, Any]], shared: dict[str, Any]) -> pa.Table:
    """The rows as a table of exactly the manifest's schema, column by column; the columns every row shares
    (``shared``: an actor's model and device, the run, ``finished_at``: a batch's rows are stamped together) once."""
    n = len(rows)
    cols = [pa.array([shared[f.name]] * n, type=f.type) if f.name in shared else
            pa.array([r.get(f.name) for r in rows], type=f.type) for f in SCHEMA]  # fmt: skip
    return pa.Table.from_arrays(cols, schema=SCHEMA)

