"""Configuration of the comparison job: one frozen pydantic model, from YAML and flags (the upscale job's machinery)."""

from __future__ import annotations

import argparse
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from srbatch.errors import ConfigError
from srbatch.jobkit.config import ActorPoolConfig, Location, job_parser, load_model_config
from srbatch.jobkit.config import config_from_args as _config_from_args

__all__ = ["CompareConfig", "Crop", "parse_crops", "build_parser", "config_from_args", "load_compare_config"]

_BOX = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")


class Crop(BaseModel):
    """A crop rectangle in output (HR) pixels; ``reason`` says why it was chosen."""

    model_config = ConfigDict(frozen=True)

    x: int
    y: int
    w: int
    h: int
    reason: str = "user"


def parse_crops(text: str) -> list[Crop]:
    """``"x,y,w,h;x,y,w,h"`` (output pixels) -> crops. Raises :class:`ConfigError` naming the bad box."""
    out = []
    for part in [p for p in text.split(";") if p.strip()]:
        m = _BOX.match(part)
        if not m:
            raise ConfigError(f"--crops: {part.strip()!r} is not x,y,w,h (four integers in output pixels); e.g. "
                              "--crops '120,80,96,96;300,200,64,64'")  # fmt: skip
        x, y, w, h = (int(g) for g in m.groups())
        if w < 1 or h < 1:
            raise ConfigError(f"--crops: {part.strip()!r} has an empty width or height")
        out.append(Crop(x=x, y=y, w=w, h=h))
    if not out:
        raise ConfigError("--crops: no box given; use 'auto' or x,y,w,h;x,y,w,h")
    return out


class CompareConfig(ActorPoolConfig):
    """Everything the comparison job needs. Frozen; unknown fields are errors. The actor pool (per model), storage and
    Ray fields come from :class:`~srbatch.jobkit.config.ActorPoolConfig`."""

    images: Location = Field(
        description="the images: a folder/prefix, a file or a glob such as 's3://bucket/samples/*.png' (quote it); "
        "in a folder holding *_HR and *_LR files only the HR ones are taken; videos (.mp4 .mkv .mov .webm) listed "
        "here give --video-frames frames each"
    )
    models: list[str] = Field(
        description="models to compare, comma-separated: names (bicubic, default, srresnet ...; see `srbatch "
        "models`), checkpoint files or export folders (paths or URIs)"
    )
    output: Location = Field(
        description="output folder/prefix: index.html (the report), comparison.parquet, images/<model>/, report/"
    )
    scale: int = Field(4, ge=1, le=16, description="upscaling factor of every model")
    mode: Literal["auto", "reference", "real"] = Field(
        "auto",
        description="reference: downscale each image with MATLAB bicubic (or take --lr), upscale, measure against the "
        "original; real: upscale the images themselves, pictures only; auto: reference when --lr is given or the "
        "images' median short side is at least --reference-min-lr x the scale, else real",
    )
    lr: str | None = Field(
        None, description="reference mode: the LR images, paired by name as in `srbatch evaluate` (HR/LR tokens removed)"
    )
    reference_min_lr: int = Field(
        32, ge=1, description="auto mode: the smallest median LR short side (px) that makes the images references"
    )
    precision: Literal["auto", "uint8", "float"] = Field(
        "auto", description="how SR outputs are measured, as in `srbatch evaluate --precision`"
    )
    grey_as_rgb: bool = Field(
        False,
        description="convert grey images (and their LR) to RGB before the models and the measuring, as test scripts "
        "that read every image with OpenCV as 3-channel do (a grey image's Y then spans 16-235: its PSNR_Y rises by "
        "about 1.32 dB); off: grey images measured as they are, as the MATLAB benchmark tables do "
        "(as `srbatch evaluate --grey-as-rgb`)",
    )
    noise_sigma: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="reference mode: add Gaussian noise of this standard deviation (0..255 units) to each LR, seeded "
        "by the image's name (every model and every rerun see the same noise), rounded and clipped; measured against "
        "the clean image (a denoising comparison at --scale 1, where bicubic is the noisy input itself)",
    )
    lpips_weights: str | None = Field(
        None,
        description="reference mode: also measure LPIPS v0.1 (lower is better) with this weights file (path or s3://; "
        "torchvision AlexNet/VGG16 trunk + LPIPS linear heads in one safetensors file, made with `python -m "
        "srbatch.metrics.lpips make`; nothing is downloaded), on the RGB output vs the original, the same border "
        "shaved as for PSNR, grey images replicated to RGB (as `srbatch evaluate --lpips-weights`)",
    )
    niqe: bool = Field(
        True,
        description="real mode: NIQE (no-reference naturalness, lower is better; srbatch's fitted pristine model) of "
        "each model's output and of the input as a baseline, in comparison.parquet and the report; null where an image "
        "is under 192x192 or flat. About 0.35 s per output megapixel on one CPU core; --no-niqe turns it off",
    )
    video_frames: int = Field(
        3, ge=1, le=64,
        description="frames compared per video listed in --images (.mp4 .mkv .mov .webm), evenly spaced inside the "
        "video (frame floor((i+1)(n-1)/(k+1) + 1/2), never the first or last), each a comparison input named "
        "<stem>#f<index>; every model gets the window of frames its temporal radius needs (clamped at the ends)",
    )
    video_flicker_frames: int = Field(
        8, ge=0, le=256,
        description="reference mode, videos only: the flicker figure (temporal-difference error of Y, lower is "
        "better) over this many consecutive frames in the middle of each video, per model; 0 or 1: off",
    )
    crops: str = Field(
        "auto",
        description="auto: per image the highest-detail region, then where the models disagree most; or "
        "'x,y,w,h;x,y,w,h' in output pixels, the same boxes on every image",
    )
    crop_size: int = Field(96, ge=8, description="side of the automatic crops in output pixels")
    crops_per_image: int = Field(2, ge=1, le=8, description="automatic crops per image")
    max_report_images: int = Field(
        40, ge=1, description="images shown in the report (the first by name); comparison.parquet has them all"
    )
    title: str | None = Field(None, description="report title [srbatch comparison x<scale>]")
    tile: int | None = Field(0, ge=0, description="tile size in input pixels; 0: never tile (exact metrics)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="compute dtype (CUDA only)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when the actor sees a GPU")
    batch_size: int = Field(2, ge=1, description="images handed to an actor per call")

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [m.strip() for m in v.split(",")]
        if isinstance(v, list):
            v = [str(m).strip() for m in v if str(m).strip()]
            if not v:
                raise ValueError("no model given; e.g. --models bicubic,default")
        return v

    @field_validator("crops")
    @classmethod
    def _crops(cls, v: str) -> str:
        if v.strip() != "auto":
            try:
                parse_crops(v)
            except ConfigError as e:
                raise ValueError(str(e).removeprefix("--crops: ")) from None
        return v.strip()

    @model_validator(mode="after")
    def _consistent(self) -> CompareConfig:
        if self.lr and self.mode == "real":
            raise ValueError("--lr gives reference pairs; drop it or use --mode reference")
        if self.noise_sigma and self.mode == "real":
            raise ValueError("--noise-sigma needs the clean images as references (reference mode); drop it or use "
                             "--mode reference")  # fmt: skip
        if self.lpips_weights and self.mode == "real":
            raise ValueError("--lpips-weights measures against the original images (reference mode); drop it or use "
                             "--mode reference")  # fmt: skip
        return self

    def user_crops(self) -> list[Crop] | None:
        """The ``--crops`` boxes, or None for ``auto``."""
        return None if self.crops == "auto" else parse_crops(self.crops)


def load_compare_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> CompareConfig:
    """YAML file (optional, any fsspec URI) overridden by ``overrides``, validated; errors name the field."""
    return load_model_config(CompareConfig, path, overrides)


def build_parser(prog: str = "jobs/compare.py") -> argparse.ArgumentParser:
    """The comparison job's argument parser: one flag per :class:`CompareConfig` field, plus ``--config``."""
    return job_parser(
        prog,
        CompareConfig,
        description="Compare super-resolution models on your own images, with pictures. Every model upscales every "
        "image on Ray actors (one model loaded once per actor); in reference mode each image is first downscaled "
        "with MATLAB bicubic and PSNR/SSIM are measured against it (the paper convention, as `srbatch evaluate`). "
        "Writes <output>/index.html (a self-contained report: mean metrics, PSNR vs runtime, side-by-side crops), "
        "<output>/comparison.parquet (one row per image x model) and the upscaled images.",
        epilog="Every flag can also be set in the YAML file given with --config (field names with underscores). "
        "Exit codes: 0 done, 1 some image x model failed (see the Parquet's error columns), 2 configuration error, "
        "130 interrupted.",
        short={"images": ["-i"], "output": ["-o"], "models": ["-m"]},
    )


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """YAML first, then the flags that were given."""
    return _config_from_args(args, CompareConfig)
