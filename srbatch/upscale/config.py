"""Configuration of the upscale job: one frozen pydantic model (on :mod:`srbatch.jobkit.config`'s base), read from
YAML and overridden by command-line flags generated from its fields."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from srbatch.jobkit.config import ActorPoolConfig, Location, default_run_id, job_parser, load_model_config
from srbatch.jobkit.config import config_from_args as _config_from_args

__all__ = ["UpscaleConfig", "load_config", "build_parser", "config_from_args"]

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


class UpscaleConfig(ActorPoolConfig):
    """Everything the upscale job needs. Frozen; unknown fields are errors. The actor pool, storage and Ray fields
    come from :class:`~srbatch.jobkit.config.ActorPoolConfig`."""

    input: Location = Field(
        description="images to upscale: a folder/prefix (recursive), a file, or a glob such as "
        "'s3://photos/raw/**/*.jpg' (quote it so the shell leaves it alone)"
    )
    output: Location = Field(
        description="output folder/prefix; images keep their path relative to the input root and the manifest goes "
        "to <output>/_manifest/"
    )
    model: str = Field("bicubic", description="model name (see `srbatch models`) or checkpoint path/URI (.pb, .onnx too)")
    scale: int = Field(4, ge=1, le=16, description="upscaling factor of the model (2, 3, 4, 8; 1 for restoration)")
    outscale: float | None = Field(
        None, gt=0, description="final scale when different from the model's (output resized with MATLAB bicubic)"
    )
    sha256: str | None = Field(None, description="refuse the checkpoint unless its sha256 matches")
    tile: int | None = Field(
        None, ge=0, description="tile size in input pixels; unset: the model's hint; 0: never tile"
    )
    tile_overlap: int | None = Field(
        None, ge=0, description="context pixels around each tile; unset: the model's receptive halo, capped at 32"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="compute dtype; half precision is used on CUDA only, with an fp32 retry on bad output"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the actor sees a GPU, else CPU"
    )
    format: Literal["PNG", "JPEG", "WEBP", "TIFF"] = Field("PNG", description="output image format")
    quality: int | None = Field(None, ge=1, le=100, description="JPEG/WebP quality [95]")
    # --- output encoding (codecs): fields, their checks and the encoder arguments, kept together -----------------
    png_compression: int = Field(
        1,
        ge=0,
        le=9,
        description="zlib level of PNG outputs (0-9, streamed PNGs too; other formats ignore it); 1 encodes a "
        "1024x1024 photo 4-5x faster than 6 (Pillow's default) for files up to 21% larger (README: output encoding)",
    )
    webp_lossless: bool = Field(
        False, description="lossless WebP (RGB under transparent pixels kept exactly); needs --format WEBP, no quality"
    )
    jpeg_encoder: Literal["auto", "pillow", "gpu"] = Field(
        "auto",
        description="JPEG encoder: gpu = nvJPEG on the CUDA actor's tensor (torchvision); pillow = libjpeg in Pillow; "
        "auto = gpu when the actor runs on CUDA, else pillow",
    )

    @model_validator(mode="after")
    def _codecs(self) -> UpscaleConfig:
        if self.webp_lossless and self.format != "WEBP":
            raise ValueError(f"webp_lossless applies to WEBP outputs only, not {self.format}; drop it or use "
                             "format WEBP")
        if self.webp_lossless and self.quality is not None:
            raise ValueError("quality does not apply to lossless WebP (webp_lossless: true); drop quality, or set "
                             "webp_lossless false for lossy WebP at that quality")
        if self.jpeg_encoder == "gpu" and self.format != "JPEG":
            raise ValueError(f"jpeg_encoder gpu applies to JPEG outputs only, not {self.format}; use jpeg_encoder "
                             "auto or format JPEG")
        return self

    def encode_options(self) -> dict:
        """Keyword arguments of :func:`srbatch.io.images.encode_image` for this run's outputs: ``format``,
        ``quality``, ``lossless`` and ``compress_level`` (``png_compression`` for PNG; TIFF keeps level 6)."""
        return {"format": self.format, "quality": self.quality, "lossless": self.webp_lossless,
                "compress_level": self.png_compression if self.format == "PNG" else 6}

    def jpeg_on_device(self, device_type: str) -> bool:
        """True when outputs are encoded by :func:`srbatch.io.images.encode_jpeg_tensor` on the actor's device
        (``device_type``: ``"cuda"`` or ``"cpu"``), False when by Pillow (:func:`~srbatch.io.images.encode_image`).
        ``jpeg_encoder="gpu"`` on an actor without CUDA is a :class:`~srbatch.errors.ConfigError`."""
        if self.format != "JPEG" or self.jpeg_encoder == "pillow":
            return False
        if device_type == "cuda":
            return True
        if self.jpeg_encoder == "gpu":
            from srbatch.errors import ConfigError

            raise ConfigError(f"jpeg_encoder gpu needs a CUDA device, and this actor runs on {device_type}; use "
                              "jpeg_encoder auto (Pillow without a GPU) or pillow")
        return False
    # --- end of output encoding ----------------------------------------------------------------------------------
    io_threads: int = Field(4, ge=1, le=64, description="threads per actor that read and upload while the model runs")
    pipeline: Literal["auto", "fused", "stages"] = Field(
        "auto",
        description="fused: each model actor reads, decodes, upscales, encodes and writes; stages: reading+decoding "
        "and encoding+writing run as CPU tasks on every core of the cluster around the model actors (what a GPU needs "
        "to be kept busy); auto: stages when the actors have GPUs, fused on CPU",
    )
    device_batch: int = Field(
        8, ge=1, le=256, description="same-size images run through the model together (one forward pass)"
    )
    channels_last: bool = Field(False, description="channels-last memory format for the model and its inputs (CUDA)")
    compile: bool = Field(
        False, description="torch.compile the model (each actor compiles once; the warm-up time is printed)"
    )
    reference: Literal["none", "self"] = Field(
        "none",
        description="self: also downscale each input by the scale (MATLAB bicubic), upscale it and record PSNR/SSIM "
        "against the original (a quality audit)",
    )
    quality_metric: Literal["none", "niqe"] = Field(
        "none",
        description="niqe: also compute NIQE (no-reference naturalness, lower is better; srbatch's fitted pristine "
        "model, see srbatch.metrics.niqe) of each written output into the manifest column `niqe` (null when the output "
        "is under 192x192, flat, or streamed); about 0.35 s per output megapixel on one CPU core",
    )
    max_failed_fraction: float = Field(
        0.0, ge=0, le=1, description="exit 1 when more than this fraction of processed images failed (0: any failure)"
    )
    force: bool = Field(False, description="redo every input, even those with an ok row and output")
    check_outputs: Literal["list", "trust"] = Field(
        "list",
        description="list: list the output prefix and redo inputs whose output is gone; trust: take the run state's "
        "word that a done input's output is there (no output listing: for buckets of millions where nothing else "
        "deletes outputs)",
    )
    batch_size: int = Field(32, ge=1, description="images handed to an actor per call")
    tiff_pyramid: int = Field(
        0,
        ge=0,
        le=12,
        description="half-size levels (SubIFDs, the OME-TIFF/QuPath pyramid layout) added to streamed TIFF outputs "
        "(those above 64 MB of samples); each level the 2x2 mean of the one above",
    )
    max_pixels: int = Field(
        2**27,
        ge=1,
        description="refuse images declaring more pixels than this before decoding them (a guard against "
        "decompression bombs); TIFFs above 64 Mpx are read tile by tile and not subject to it",
    )
    # --- videos (.mp4 .mkv .mov .webm inputs): upscaled frame by frame in keyframe-aligned segments -------------
    video_codec: Literal["libx264", "libvpx-vp9", "libsvtav1", "ffv1"] = Field(
        "libx264", description="encoder of video outputs: libx264 (H.264), libvpx-vp9, libsvtav1 (AV1), or ffv1 "
        "(lossless, for archives; .mkv)"
    )
    video_crf: int | None = Field(
        None, ge=0, le=63,
        description="constant-quality level of the video encoder (lower is better) [x264 18, VP9 32, AV1 35; ffv1: "
        "none]"
    )
    video_preset: str | None = Field(
        None, description="encoder speed preset: x264's name (ultrafast..veryslow) [medium], VP9's cpu-used (0-8) [4], "
        "SVT-AV1's preset (0-13) [8]"
    )
    video_pix_fmt: str | None = Field(
        None, description="pixel format of video outputs [yuv420p; ffv1: yuv444p]; ffv1 with bgr0 keeps the model's "
        "RGB output bit for bit"
    )
    video_container: Literal["auto", ".mp4", ".mkv", ".mov", ".webm"] = Field(
        "auto", description="container of video outputs; auto: the source's when it can hold the codec, else .mkv"
    )
    video_segment_frames: int = Field(
        250, ge=1, description="frames per segment (cut at the nearest keyframe); segments go to different actors and "
        "a rerun redoes only the segments not yet written"
    )

    @model_validator(mode="after")
    def _video(self) -> UpscaleConfig:
        if self.video_codec == "ffv1" and self.video_crf is not None:
            raise ValueError("video_crf does not apply to ffv1 (lossless); drop it, or choose a lossy video_codec")
        if self.video_codec == "ffv1" and self.video_preset is not None:
            raise ValueError("video_preset does not apply to ffv1 (lossless); drop it")
        if self.video_codec == "ffv1" and self.video_container not in ("auto", ".mkv"):
            raise ValueError(f"video_container {self.video_container} cannot hold ffv1; use .mkv (or auto)")
        return self
    # --- end of videos --------------------------------------------------------------------------------------------
    run_id: str = Field(default_factory=default_run_id, description="run id recorded in the manifest [UTC time]")
    manifest_flush_seconds: float = Field(
        30.0, gt=0, description="write the manifest rows gathered so far at least this often"
    )

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not _RUN_ID.match(v):
            raise ValueError("use letters, digits and . _ : + - only (it becomes a folder name), e.g. 2026-11-23T10")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
            raise ValueError("must be 64 hexadecimal digits (the output of `sha256sum`)")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _quality(self) -> UpscaleConfig:
        if self.quality is not None and self.format not in ("JPEG", "WEBP"):
            raise ValueError(f"quality applies to JPEG and WEBP only, not {self.format}; drop it or change format")
        return self


def load_config(path: str | Path | None = None, overrides: Mapping[str, object] | None = None) -> UpscaleConfig:
    """Read ``path`` (YAML; any fsspec URI) if given, apply ``overrides`` (fields set on the command line) and
    validate. Errors name the field and the fix (:class:`~srbatch.errors.ConfigError`)."""
    return load_model_config(UpscaleConfig, path, overrides)


def build_parser(prog: str = "jobs/upscale.py") -> argparse.ArgumentParser:
    """The job's argument parser: ``INPUT`` (optional positional), ``--config``, and one flag per config field."""
    return job_parser(
        prog,
        UpscaleConfig,
        description="Upscale a whole image dataset on a Ray cluster: model actors (one per GPU, or on CPU) stream images "
        "from object storage, write the upscaled images under --output with the same relative paths, and record one "
        "manifest row per input in <output>/_manifest/ (Parquet). Reruns skip inputs already done with the same model "
        "and parameters and retry failed ones. With no arguments at all, python jobs/upscale.py upscales the bundled "
        "sample images.",
        epilog="Every flag can also be set in the YAML file given with --config (field names with underscores); flags "
        "win. Exit codes: 0 done, 1 more failures than --max-failed-fraction, 2 configuration error, 130 interrupted.",
        short={"input": ["-i"], "output": ["-o"], "model": ["-m"]},
        positional="input",
    )


def config_from_args(args: argparse.Namespace) -> UpscaleConfig:
    """Build the config from parsed arguments: YAML first, then the flags that were given."""
    return _config_from_args(args, UpscaleConfig)
