"""The comparison job's Ray Data actor: one model loaded once, then each image of its batches upscaled, measured
(reference mode) and written as PNG. One row per image; a broken image is a failed row, never a failed job."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from srbatch.compare.config import CompareConfig
from srbatch.errors import ConfigError
from srbatch.jobkit.actor import ModelActor, error_fields

__all__ = ["CompareWorker", "ROW_SCHEMA", "empty_row"]

ROW_SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("lr_uri", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_spec", pa.string(), nullable=False),
        pa.field("architecture", pa.string()),
        pa.field("params", pa.int64()),
        pa.field("scale", pa.int32()),
        pa.field("mode", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("input_width", pa.int32()),
        pa.field("input_height", pa.int32()),
        pa.field("output_width", pa.int32()),
        pa.field("output_height", pa.int32()),
        pa.field("psnr_y", pa.float64()),
        pa.field("ssim_y", pa.float64()),
        pa.field("psnr_rgb", pa.float64()),
        pa.field("ssim_rgb", pa.float64()),
        pa.field("lpips", pa.float64()),
        pa.field("precision", pa.string()),
        pa.field("grey", pa.bool_()),
        pa.field("grey_as_rgb", pa.bool_()),
        pa.field("noise_sigma", pa.float64()),
        pa.field("runtime_s", pa.float64()),
        pa.field("output_uri", pa.string()),
        pa.field("device", pa.string()),
        pa.field("niqe", pa.float64()),
        pa.field("input_niqe", pa.float64()),
        pa.field("video_uri", pa.string()),
        pa.field("frame_index", pa.int64()),
        pa.field("flicker_tde", pa.float64()),
        pa.field("flicker_frames", pa.int32()),
    ]
)
"""Columns of ``comparison.parquet`` (one row per image x model). Metrics are null in real mode and on failure;
``runtime_s`` is the model's upscaling time for the image (decode, measure and write excluded). ``lpips``: reference
mode with ``--lpips-weights`` only (lower is better; see :mod:`srbatch.metrics.lpips`). ``grey``: the image
(or its LR) was grey, i.e. a row ``grey_as_rgb`` changes (null when it could not be read); ``grey_as_rgb`` and
``noise_sigma``: the run's options (see :class:`~srbatch.compare.config.CompareConfig`). ``niqe`` (real mode, with
``CompareConfig.niqe``): NIQE of the output as written (:func:`srbatch.metrics.niqe.niqe`, lower is better);
``input_niqe``: NIQE of the input image itself, the no-upscaling baseline (the same on every model's row); both null
where NIQE is undefined (an image under 192x192, or flat). ``video_uri`` and ``frame_index``: the video and the frame
a row compares (image ``<stem>#f<index>``; null for images; frame_index null when the video could not be probed);
``flicker_tde`` and ``flicker_frames``: reference mode, on the first compared frame's row of each video, the
temporal-difference error over that many consecutive middle frames (see :mod:`srbatch.compare.video`)."""


def empty_row(**values: Any) -> dict[str, Any]:
    """A row with every column present (None where not given)."""
    row: dict[str, Any] = {f.name: None for f in ROW_SCHEMA}
    row.update(values)
    return row


def load_input(
    cfg: CompareConfig, image_uri: str, lr_uri: str | None, mode: str, name: str
) -> tuple[Any, Any, bool]:
    """Read and decode one comparison input: ``(LR image, HR pixels or None, grey)`` — the exact pair `srbatch
    evaluate` measures in reference mode (with ``cfg.grey_as_rgb`` and ``cfg.noise_sigma``), the image itself (alpha
    dropped; replicated to RGB when grey and ``cfg.grey_as_rgb``) in real mode. ``grey``: the image or its LR has one
    channel as decoded."""
    from dataclasses import replace

    from srbatch.evaluate import is_grey, reference_pair
    from srbatch.io.images import decode_image
    from srbatch.io.storage import read_bytes

    so = cfg.fs_options()
    img = decode_image(read_bytes(image_uri, so), name=image_uri)
    if mode == "real":
        img.alpha = None
        grey = is_grey(img)
        if grey and cfg.grey_as_rgb:
            img = replace(img, pixels=np.repeat(img.pixels, 3, axis=2), mode="RGB")
        return img, None, grey
    lr = decode_image(read_bytes(lr_uri, so), name=lr_uri) if lr_uri else None
    grey = is_grey(img, lr)
    lr_img, hr = reference_pair(img, lr, cfg.scale, name=name, hr_uri=image_uri, lr_uri=lr_uri,
                                grey_as_rgb=cfg.grey_as_rgb, noise_sigma=cfg.noise_sigma)  # fmt: skip
    return lr_img, hr, grey


class CompareWorker(ModelActor):
    """Callable class for ``Dataset.map_batches``: one instance per actor, one model per instance.

    Args:
        config: :meth:`CompareConfig.model_dump`.
        model: index of the model in ``config["models"]``.
        label: the model's name in the report and the Parquet.
        mode: ``reference`` or ``real`` (resolved by the driver).
        torch_threads: intra-op threads for CPU inference (None: torch's default).
    """

    job = "compare"

    def __init__(
        self, config: dict[str, Any], model: int, label: str, mode: str, torch_threads: int | None = None,
        memory_share: float = 0.5,
    ) -> None:
        from srbatch.evaluate import resolve_precision
        from srbatch.inference import TilingConfig

        self.cfg = CompareConfig.model_validate(config)
        self.spec, self.label, self.mode = self.cfg.models[model], label, mode
        self._start_model(self.spec, scale=self.cfg.scale, storage_options=self.cfg.fs_options(),
                          device=self.cfg.device, dtype=self.cfg.dtype, tiling=TilingConfig(tile=self.cfg.tile),
                          torch_threads=torch_threads, label=label, max_memory=self.cfg.max_memory_bytes(),
                          memory_share=memory_share, paper=mode == "reference")  # fmt: skip
        self.params = sum(p.numel() for p in self.desc.module.parameters())
        self.precision = resolve_precision(self.cfg.precision, self.desc)  # as `upscale_and_measure` resolves it
        self.lpips = None
        if self.cfg.lpips_weights and mode == "reference":
            from srbatch.metrics.lpips import load_lpips

            self.lpips = load_lpips(self.cfg.lpips_weights, storage_options=self.cfg.fs_options(),
                                    device=self.up.device)  # fmt: skip
        self._videos: dict[str, Any] = {}

    def _one(self, image: str, image_uri: str, lr_uri: str | None, output_uri: str) -> tuple[dict[str, Any], Any]:
        from srbatch.evaluate import upscale_and_measure

        row = empty_row(
            image=image, image_uri=image_uri, lr_uri=lr_uri, model=self.label, model_spec=self.spec,
            architecture=self.desc.architecture, params=self.params, scale=self.cfg.scale, mode=self.mode,
            status="failed", device=self.device, grey_as_rgb=self.cfg.grey_as_rgb, noise_sigma=self.cfg.noise_sigma,
        )  # fmt: skip
        try:
            lr, hr, grey = load_input(self.cfg, image_uri, lr_uri, self.mode, image)
            row.update(input_width=lr.width, input_height=lr.height, grey=grey)
            if hr is not None:
                m, sr, secs = upscale_and_measure(self.up, lr, hr, border=self.cfg.scale, precision=self.cfg.precision)
                row.update(psnr_y=m.psnr_y, ssim_y=m.ssim_y, psnr_rgb=m.psnr_rgb, ssim_rgb=m.ssim_rgb,
                           precision=self.precision)
                if self.lpips is not None:
                    from srbatch.metrics.lpips import lpips_distance

                    row.update(lpips=lpips_distance(self.lpips, sr, hr, crop_border=self.cfg.scale))
            else:
                t0 = time.perf_counter()
                sr = self.up.upscale_image(lr).pixels
                secs = time.perf_counter() - t0
                if self.cfg.niqe:
                    row.update(niqe=_niqe_or_none(sr), input_niqe=_niqe_or_none(lr.pixels))
            row.update(runtime_s=secs, output_width=int(sr.shape[1]), output_height=int(sr.shape[0]))
            return row, self.pool.submit(_write_png, sr, output_uri, self.cfg.fs_options())
        except Exception as e:  # noqa: BLE001 - one broken image is one failed row
            row.update(error_fields(e))
            return row, None

    def _one_video(self, image: str, video_uri: str, frame: int, flicker_frames: int,
                   output_uri: str) -> tuple[dict[str, Any], Any]:  # fmt: skip
        """One video frame: its window through ``upscale_frames``, measured against the decoded frame (reference
        mode; uint8 output, paper convention), plus the flicker run when ``flicker_frames`` > 1."""
        from srbatch.compare.video import VideoFrames, flicker_run
        from srbatch.metrics.quality import measure

        row = empty_row(
            image=image, image_uri=video_uri, model=self.label, model_spec=self.spec, video_uri=video_uri,
            frame_index=frame if frame >= 0 else None, architecture=self.desc.architecture, params=self.params,
            scale=self.cfg.scale, mode=self.mode, status="failed", device=self.device,
            grey_as_rgb=self.cfg.grey_as_rgb, noise_sigma=self.cfg.noise_sigma, grey=False,
        )  # fmt: skip
        try:
            vf = self._videos.get(video_uri)
            if vf is None:
                vf = VideoFrames(video_uri, self.cfg.scale, self.mode, self.cfg.fs_options())
                self._videos = {video_uri: vf}  # one video cached at a time
            if frame < 0 or frame >= vf.n:
                raise ConfigError(f"{video_uri}: frame {frame} is outside the video's {vf.n} frames")
            r = int(self.desc.info.temporal_radius)
            win = vf.window(frame, r)
            row.update(input_width=int(win[0].shape[1]), input_height=int(win[0].shape[0]))
            t0 = time.perf_counter()
            sr = self.up.upscale_frames(win)
            secs = time.perf_counter() - t0
            hr = vf.hr(frame)
            if hr is not None:
                m = measure(sr, hr, crop_border=self.cfg.scale)
                row.update(psnr_y=m.psnr_y, ssim_y=m.ssim_y, psnr_rgb=m.psnr_rgb, ssim_rgb=m.ssim_rgb,
                           precision="uint8")  # fmt: skip
                if self.lpips is not None:
                    from srbatch.metrics.lpips import lpips_distance

                    row.update(lpips=lpips_distance(self.lpips, sr, hr, crop_border=self.cfg.scale))
                if flicker_frames > 1:
                    from srbatch.video.evaluate import flicker

                    a, b = flicker_run(vf.n, flicker_frames)
                    srs = [self.up.upscale_frames(vf.window(t, r)) for t in range(a, b)]
                    tde, _, _ = flicker(srs, [vf.hr(t) for t in range(a, b)], self.cfg.scale)
                    row.update(flicker_tde=float(np.mean(tde)), flicker_frames=b - a)
            elif self.cfg.niqe:
                row.update(niqe=_niqe_or_none(sr), input_niqe=_niqe_or_none(vf.lr(frame)))
            row.update(runtime_s=secs, output_width=int(sr.shape[1]), output_height=int(sr.shape[0]))
            return row, self.pool.submit(_write_png, sr, output_uri, self.cfg.fs_options())
        except Exception as e:  # noqa: BLE001 - one broken frame is one failed row
            row.update(error_fields(e))
            return row, None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Process ``batch`` (columns ``image``, ``image_uri``, ``lr_uri``, ``output_uri``, and for videos
        ``video_uri``, ``frame_index``, ``flicker_frames``); one row per image or video frame."""
        n = len(batch["image"])
        vids = batch.get("video_uri", [""] * n)
        frames = batch.get("frame_index", [-1] * n)
        flick = batch.get("flicker_frames", [0] * n)
        done = [
            self._one_video(str(i), str(v), int(f), int(k), str(o)) if v is not None and str(v) else
            self._one(str(i), str(u), (str(lr) or None) if lr is not None else None, str(o))
            for i, u, lr, o, v, f, k in zip(batch["image"], batch["image_uri"], batch["lr_uri"], batch["output_uri"],
                                            vids, frames, flick)  # fmt: skip
        ]
        rows = []
        for (row, fut), out_uri in zip(done, batch["output_uri"]):
            self._settle(row, fut, output_uri=str(out_uri))
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _niqe_or_none(pixels: np.ndarray) -> float | None:
    """NIQE of ``pixels`` (srbatch's pristine model), None where it is undefined (under 192x192, or flat)."""
    from srbatch.metrics.niqe import NiqeError, niqe

    try:
        return niqe(pixels)
    except NiqeError:
        return None


LARGE_OUTPUT_BYTES = 64 * 1024**2
"""Outputs larger than this are written as a streamed PNG, band of rows by band (no second copy for the encoder)."""


def _write_png(pixels: np.ndarray, uri: str, storage_options: dict[str, Any]) -> None:
    from srbatch.compare.report import png_bytes
    from srbatch.io.storage import filesystem, write_bytes

    if pixels.nbytes <= LARGE_OUTPUT_BYTES:
        write_bytes(uri, png_bytes(pixels), storage_options, content_type="image/png")
        return
    from srbatch.io.pngstream import write_png_stream
    from srbatch.upscale.manifest import put_file_atomic

    fs, path = filesystem(uri, storage_options)
    h, w = pixels.shape[:2]
    c = pixels.shape[2] if pixels.ndim == 3 else 1
    rows = max(1, (16 * 1024**2) // max(w * c * pixels.itemsize, 1))
    bands = (pixels[y : y + rows].reshape(-1, w, c) for y in range(0, h, rows))
    put_file_atomic(fs, path, lambda fh: write_png_stream(fh, bands, height=h, width=w, channels=c,
                                                          dtype=pixels.dtype))  # fmt: skip

