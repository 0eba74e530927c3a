"""Configuration of the training job: one frozen pydantic model, read from YAML, a preset and command-line flags.

Precedence: flags > YAML file > preset (``--preset dogs``) > the field defaults. Every field is a flag documented in
``jobs/train.py --help``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from srbatch.jobkit.config import JobConfig, Location, job_parser, load_model_config
from srbatch.jobkit.config import config_from_args as _config_from_args

__all__ = ["TrainConfig", "PRESETS", "RECIPES", "load_train_config", "build_parser", "train_config_from_args"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

PRESETS: dict[str, dict[str, Any]] = {
    "dogs": {
        # The Stanford Dogs POC seed: bicubic x4 LR from HR, 96x96 HR crops, batch 16, MSE pre-training of SRResNet,
        # then the SRGAN stage (VGG54 + 1e-3 adversarial) with --stage gan --init <the psnr export>.
        "model": "srresnet",
        "scale": 4,
        "crop_size": 96,
        "batch_size": 16,
        "degradation": "bicubic",
        "loss": "mse",
        "gan": "srgan",
        "lr": 1e-4,
    },
    "microscopy": {
        # Grey or 16-bit fluorescence images: channels and data range come from the data; Poisson + Gaussian noise
        # and mild blur before the downscale; no JPEG (it would quantise to 8 bits).
        "model": "srresnet",
        "scale": 2,
        "crop_size": 96,
        "batch_size": 16,
        "degradation": "microscopy",
        "loss": "l1",
        "lr": 2e-4,
    },
    "faces": {
        # Portraits: mild blur, light noise and JPEG as found in photo archives; L1 then (optionally) ESRGAN.
        "model": "srresnet",
        "scale": 4,
        "crop_size": 128,
        "batch_size": 16,
        "degradation": "mild",
        "loss": "l1",
        "gan": "esrgan",
        "lr": 2e-4,
    },
    "generic": {
        # EDSR's recipe: 48 px LR crops, L1, Adam 1e-4 halved at the middle (EDSR halved every 200k steps).
        "model": "edsr-baseline",
        "scale": 4,
        "crop_size": 192,
        "batch_size": 16,
        "degradation": "bicubic",
        "loss": "l1",
        "lr": 1e-4,
        "lr_schedule": "step",
    },
    "restoration": {
        # The old-photo seed: noisy, degraded inputs and clean targets at the same size (--scale 1). SRResNet without
        # upsampling blocks, L1, Gaussian noise (sigma 5-50 of 255) and sometimes JPEG.
        "model": "srresnet",
        "scale": 1,
        "crop_size": 96,
        "batch_size": 16,
        "degradation": "denoise",
        "loss": "l1",
        "lr": 2e-4,
    },
}
"""Named starting points (``--preset``): each sets model, scale, crop size, degradation, loss and learning rate."""

RECIPES: dict[str, dict[str, Any]] = {
    # Ledig et al. 2017: content loss on VGG19 phi_5,4 (after activation) features scaled by 1/12.75, MSE;
    # 1e-3 x BCE adversarial loss; no pixel loss; Adam 1e-4.
    "srgan": {
        "pixel_weight": 0.0,
        "perceptual_weight": 1.0,
        "perceptual_layer": "relu5_4",
        "perceptual_criterion": "mse",
        "feature_scale": 1 / 12.75,
        "adversarial_weight": 1e-3,
        "adversarial": "bce",
        "discriminator": "srgan",
    },
    # Wang et al. 2018: L1 1e-2, VGG19 conv5_4 (before activation) L1 1.0, relativistic average GAN 5e-3; Adam 1e-4.
    "esrgan": {
        "pixel_weight": 1e-2,
        "perceptual_weight": 1.0,
        "perceptual_layer": "conv5_4",
        "perceptual_criterion": "l1",
        "feature_scale": 1.0,
        "adversarial_weight": 5e-3,
        "adversarial": "relativistic",
        "discriminator": "vgg",
    },
}
"""The GAN stage's loss recipes, from the papers; ``--pixel-weight`` etc. override single terms."""


class TrainConfig(JobConfig):
    """Everything the training job needs. Frozen; unknown fields are errors. The storage and Ray fields come from
    :class:`~srbatch.jobkit.config.JobConfig`."""

    data: Location = Field(
        description="high-resolution training images: folder/prefix, file or glob, e.g. 's3://pets/hr/**/*.jpg'; "
        "or video clips (.mp4/.mkv/.mov/.webm files, or one folder of frames per clip with --clips)"
    )
    output: Location = Field(
        description="export folder/prefix: model.safetensors, model_card.json/.md and history.parquet land here; "
        "`jobs/upscale.py --model <output>` loads it"
    )
    preset: Literal["dogs", "microscopy", "faces", "generic", "restoration"] | None = Field(
        None, description="a domain preset setting model, scale, crops, degradation, loss and learning rate"
    )
    lr_data: str | None = Field(
        None, description="paired low-resolution images (matched to --data by file name) instead of synthesised LR"
    )
    val_data: str | None = Field(
        None, description="held-out high-resolution images; unset: a deterministic share of --data (--val-fraction)"
    )
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of --data held out for validation (at least 1)")
    val_max_images: int = Field(16, ge=1, description="validate on at most this many held-out images")
    val_max_size: int = Field(
        512, ge=0, description="validate on centre crops of at most this many HR pixels per side (0: whole images)"
    )
    clips: bool | None = Field(
        None, description="treat --data/--val-data as video clips (video files, or one folder of frames per clip); "
        "unset: when --data holds videos or the model is temporal"
    )
    video_crf: tuple[int, int] | None = Field(
        None, description="clips: re-encode each LR training window with libx264 at a CRF drawn in this range, "
        "e.g. '[18, 32]' (YAML); unset: no video compression"
    )
    model: str = Field("srresnet", description="architecture or variant to train (see `srbatch models`)")
    model_args: dict[str, Any] = Field(
        default_factory=dict, description="architecture hyper-parameters, e.g. '{num_block: 8}' (YAML)"
    )
    scale: int = Field(4, ge=1, le=8, description="upscaling factor (1: restoration/denoising at the same size)")
    init: str | None = Field(
        None, description="initial weights: a model name or checkpoint/export URI (fine-tuning); unset: random"
    )
    stage: Literal["psnr", "gan"] = Field(
        "psnr", description="psnr: pixel loss; gan: perceptual + adversarial training from a psnr generator (--init)"
    )
    gan: Literal["srgan", "esrgan"] = Field("srgan", description="the GAN stage's recipe (losses, discriminator)")
    loss: Literal["l1", "mse"] = Field("l1", description="pixel loss of the psnr stage (EDSR: l1, SRGAN seed: mse)")
    pixel_weight: float | None = Field(None, ge=0, description="gan stage: pixel loss weight [from the recipe]")
    perceptual_weight: float | None = Field(None, ge=0, description="gan stage: VGG loss weight [from the recipe]")
    adversarial_weight: float | None = Field(None, ge=0, description="gan stage: adversarial weight [from the recipe]")
    vgg_weights: str | None = Field(
        None, description="VGG19 ImageNet weights in torchvision layout (.pth/.safetensors), needed by the gan stage"
    )
    steps: int = Field(1000, ge=1, description="total optimiser steps (a resumed run continues up to this)")
    batch_size: int = Field(16, ge=1, description="crops per step on each worker")
    crop_size: int = Field(96, ge=8, description="HR crop side in pixels (a multiple of the scale)")
    lr: float = Field(2e-4, gt=0, description="Adam learning rate (generator)")
    lr_schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="cosine decay to 1% of --lr, or halve at --lr-milestones, or constant"
    )
    lr_milestones: list[float] = Field(
        default_factory=lambda: [0.5], description="step schedule: fractions of --steps where the rate is halved"
    )
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    degradation: str | dict[str, Any] = Field(
        "bicubic",
        description="LR synthesis: bicubic (MATLAB-exact), mild, microscopy, realesrgan, denoise, or a mapping of "
        "DegradationConfig fields (YAML)",
    )
    channels: int | None = Field(
        None, description="image channels the model works on (1 or 3); unset: from the data (all grey -> 1)"
    )
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay of the generator weights (0: off); EMA is exported")
    amp: bool = Field(False, description="mixed precision (bfloat16 autocast) on GPU")
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel, DDP)")
    use_gpu: bool | None = Field(None, description="one GPU per worker; unset: when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker; unset: --cpus-per-worker")
    val_every: int = Field(200, ge=1, description="validate and checkpoint every this many steps (and at the end)")
    log_every: int = Field(50, ge=1, description="print loss and samples/s every this many steps")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in storage (the best is always kept)")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from the last checkpoint")
    seed: int = Field(0, description="seed of crops, degradations, initialisation and the validation split")
    export: Literal["best", "last"] = Field("best", description="export the best-validating or the last weights")
    storage_path: str | None = Field(
        None, description="where Ray Train keeps checkpoints (any fsspec URI); unset: <output>/_train"
    )
    name: str = Field("train", description="run name under --storage-path; the same name + --resume continues it")
    resume: bool = Field(False, description="continue the run --name from its latest checkpoint")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("preset"):
            preset = PRESETS.get(str(data["preset"]))
            if preset is not None:
                return {**preset, **dict(data)}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits and . _ - only (it becomes a folder name), e.g. dogs-x4")
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: int | None) -> int | None:
        if v is not None and v not in (1, 3):
            raise ValueError("must be 1 (grey) or 3 (RGB); leave it unset to follow the data")
        return v

    @field_validator("video_crf")
    @classmethod
    def _crf(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] <= v[1] <= 51:
            raise ValueError(f"give a range (lo, hi) with 0 <= lo <= hi <= 51 (x264 CRF), e.g. [18, 32]; got {v}")
        return v

    @field_validator("lr_milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or sorted(v) != list(v):
            raise ValueError("give increasing fractions of --steps between 0 and 1, e.g. [0.5, 0.75]")
        return v

    @field_validator("degradation")
    @classmethod
    def _degradation(cls, v: str | dict[str, Any]) -> str | dict[str, Any]:
        from srbatch.train.degrade import PRESET_DEGRADATIONS, DegradationConfig

        if isinstance(v, str):
            if v not in PRESET_DEGRADATIONS:
                raise ValueError(f"unknown degradation {v!r}; use one of {', '.join(PRESET_DEGRADATIONS)} or a mapping")
        else:
            DegradationConfig.model_validate(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.scale > 1 and self.crop_size % self.scale:
            fix = self.crop_size - self.crop_size % self.scale
            raise ValueError(f"crop_size {self.crop_size} is not a multiple of the scale {self.scale}; use {fix}")
        if self.stage == "gan" and not self.init:
            raise ValueError(
                "the gan stage starts from a trained generator: give --init <psnr export or checkpoint> (train it "
                "first with --stage psnr)"
            )
        if self.stage == "gan" and self.recipe()["perceptual_weight"] > 0 and not self.vgg_weights:
            from srbatch.train.gan import _MISSING_WEIGHTS_HELP

            raise ValueError(f"the {self.gan} recipe's perceptual loss needs VGG19 weights: {_MISSING_WEIGHTS_HELP}")
        if self.scale == 1 and self.degradation == "bicubic" and not self.lr_data:
            raise ValueError(
                "--scale 1 with the bicubic degradation gives LR == HR: nothing to learn; choose a degradation that "
                "damages the image (--degradation denoise, mild or realesrgan; or --preset restoration), or give "
                "--lr-data with the degraded inputs"
            )
        if self.clips and self.lr_data:
            raise ValueError("--clips synthesises LR frames; drop --lr-data (paired LR clips are not supported)")
        if self.video_crf is not None and self.clips is False:
            raise ValueError("--video-crf compresses LR clips; drop it or drop --no-clips")
        if self.lr_data and self.degradation != "bicubic":
            raise ValueError("--lr-data gives the LR images; drop --degradation (it synthesises LR)")
        return self

    # -------------------------------------------------------------- derived values

    def degradation_config(self) -> Any:
        """The :class:`srbatch.train.degrade.DegradationConfig` of ``degradation``."""
        from srbatch.train.degrade import PRESET_DEGRADATIONS, DegradationConfig

        if isinstance(self.degradation, str):
            return PRESET_DEGRADATIONS[self.degradation]
        return DegradationConfig.model_validate(self.degradation)

    def recipe(self) -> dict[str, Any]:
        """The gan stage's loss recipe with the user's weight overrides applied."""
        r = dict(RECIPES[self.gan])
        for k in ("pixel_weight", "perceptual_weight", "adversarial_weight"):
            if getattr(self, k) is not None:
                r[k] = getattr(self, k)
        return r

    def run_storage(self) -> str:
        """The ``storage_path`` of the Ray Train run (checkpoints go to ``<storage_path>/<name>/``)."""
        from srbatch.io.storage import join_uri

        return self.storage_path or join_uri(self.output, "_train")


def load_train_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read ``path`` (YAML; any fsspec URI) if given, apply ``overrides`` and validate (:class:`ConfigError`).

    A preset named in the file or the overrides fills the fields neither of them sets.
    """
    return load_model_config(TrainConfig, path, overrides)


def build_parser(prog: str = "jobs/train.py") -> argparse.ArgumentParser:
    """The training job's argument parser: ``--config`` and one flag per :class:`TrainConfig` field."""
    return job_parser(
        prog,
        TrainConfig,
        description="Train or fine-tune a super-resolution model for a domain on a Ray cluster (Ray Train, DDP on GPUs "
        "or CPUs). HR images are read from object storage, LR inputs synthesised on the fly (MATLAB-exact bicubic or a "
        "degradation pipeline), checkpoints kept under --storage-path, and the trained generator exported to --output "
        "with a model card, ready for `jobs/upscale.py --model <output>`.",
        epilog="Presets: " + "; ".join(f"{k}: {v['model']} x{v['scale']}, {v['degradation']} LR, {v['loss']} loss"
                                        for k, v in PRESETS.items())  # fmt: skip
        + ". Every flag can also be set in the YAML file given with --config; flags win over the file, the file over "
        "the preset. Exit codes: 0 done, 1 training failed, 2 configuration error, 130 interrupted.",
        short={"data": ["-d"], "output": ["-o"], "model": ["-m"]},
    )


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build the config from parsed arguments: preset, then YAML, then the flags that were given."""
    return _config_from_args(args, TrainConfig)
