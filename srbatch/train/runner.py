"""The training job's driver: plan the data, start Ray Train's ``TorchTrainer``, report the domain gain.

The driver only lists files and reads image headers; decoding, cropping, training, validation, checkpoints and the
export happen in the Ray Train workers (:mod:`srbatch.train.loop`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from srbatch.errors import ConfigError, SrbatchError
from srbatch.train.config import TrainConfig

log = logging.getLogger("srbatch.train")

__all__ = ["TrainResult", "TrainingError", "plan_data", "run_training", "storage_for_ray"]

_FORWARD_ENV = ("AWS_", "SRBATCH_")


class TrainingError(SrbatchError):
    """Ray Train gave up (more worker failures than --max-failures, or an error in the training loop)."""


@dataclass
class TrainResult:
    """What a training run produced: the model card of the export and where the checkpoints are."""

    output: str
    run_path: str
    card: dict[str, Any]
    seconds: float
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """The domain gain report: bicubic, the initial weights and the trained model on the held-out images."""
        v, t = self.card["validation"], self.card["training"]
        base = "degraded input" if self.card["scale"] == 1 else "bicubic"
        rows = [(base, v.get("bicubic")), ("initial weights", v.get("initial")), ("trained", v.get("final"))]
        lines = [f"srbatch train: {self.card['name']} ({self.card['architecture']} x{self.card['scale']}), "
                 f"{t['steps']} steps, {t['samples']:,} samples, {(t['samples_per_s'] or 0):.1f} samples/s, "
                 f"{t['restarts']} restart(s)",
                 f"  domain gain on {self.card['data']['val_images']} held-out "
                 f"{'clip(s)' if self.card['data'].get('clips') else 'image(s)'} (PSNR_Y dB / SSIM_Y):"]  # fmt: skip
        for label, m in rows:
            lines.append(f"    {label:<16} " + (f"{m['psnr_y']:7.2f} / {m['ssim_y']:.4f}" if m else "    n/a"))
        for label, g in (("vs initial", v.get("gain_vs_initial")), ("vs " + base.split()[-1], v.get("gain_vs_bicubic"))):
            if g:
                lines.append(f"    {label:<16} {g['psnr_y_db']:+7.2f} / {g['ssim_y']:+.4f}")
        lines.append(f"  model: {self.output} (load with --model {self.output})")
        lines.append(f"  checkpoints: {self.run_path}")
        return "\n".join(lines)


def _header_channels(uri: str, so: Mapping[str, Any]) -> int:
    from PIL import Image

    from srbatch.io.storage import filesystem

    fs, path = filesystem(uri, so)
    with fs.open(path, "rb") as f, Image.open(f) as im:
        return 1 if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F") else 3


def model_radius(cfg: TrainConfig) -> int:
    """The temporal radius of ``--model`` with ``--model-args`` (0 for image models, and with ``--init``)."""
    from srbatch.models.registry import architectures, variants

    if cfg.init:
        return 0
    var = variants()
    name, vargs = var[cfg.model] if cfg.model in var else (cfg.model, {})
    arch = architectures().get(name)
    if arch is None:
        return 0
    try:
        return int(arch.info({**vargs, **cfg.model_args, "scale": cfg.scale}).temporal_radius)
    except Exception:  # noqa: BLE001 - bad arguments are reported when the worker builds the model
        return 0


def _has_videos(spec: str, so: Mapping[str, Any]) -> bool:
    from srbatch.errors import SrbatchError
    from srbatch.io.storage import VIDEO_EXTENSIONS, list_images

    try:
        return bool(list_images(spec, so, extensions=VIDEO_EXTENSIONS))
    except SrbatchError:
        return False


def _plan_clips(cfg: TrainConfig, so: Mapping[str, Any], radius: int) -> dict[str, Any]:
    """Clip datasets: list the clips of --data (and --val-data), split them by clip, check each training clip has a
    window's worth of frames (from the video header or the folder listing)."""
    from srbatch.train.clips import list_clips
    from srbatch.train.data import split_images

    clips = list_clips(cfg.data, so)
    if cfg.val_data:
        val = list_clips(cfg.val_data, so)[: cfg.val_max_images]
        train = [u for u in clips if u not in set(val)]
    else:
        train, val = split_images(clips, val_fraction=cfg.val_fraction, val_max=cfg.val_max_images, seed=cfg.seed)
    if not train:
        raise ConfigError(f"--data {cfg.data}: no training clips left after holding out {len(val)} for validation")
    need = 2 * radius + 1
    for uri in train:
        n = clip_length(uri, so)
        if n < need:
            raise ConfigError(f"clip {uri} has {n} frame(s); --model {cfg.model} needs windows of {need} frames "
                              f"(temporal radius {radius}): remove it from --data or use longer clips")  # fmt: skip
    channels = cfg.channels if cfg.channels is not None else 3
    return {"train": train, "val": val, "lr_map": {}, "channels": channels, "clips": True, "radius": radius}


def clip_length(uri: str, so: Mapping[str, Any]) -> int:
    """Frames of a clip: the video's probed frame count, or the images directly in the folder."""
    from srbatch.io.storage import is_video, list_images

    if is_video(uri):
        from srbatch.video import probe

        return int(probe(uri, so).frames)
    return sum(1 for u in list_images(uri, so) if u.rsplit("/", 1)[0] == uri.rstrip("/"))


def plan_data(cfg: TrainConfig) -> dict[str, Any]:
    """List and split the images (or clips), pair LR files, and decide the channel count (from up to 32 image
    headers; clips: 3 unless --channels)."""
    from srbatch.io.storage import list_images
    from srbatch.train.data import pair_lr, split_images

    so = cfg.fs_options()
    radius = model_radius(cfg)
    clips = cfg.clips if cfg.clips is not None else (radius > 0 or _has_videos(cfg.data, so))
    if clips:
        return _plan_clips(cfg, so, radius)
    if radius > 0:
        raise ConfigError(f"--model {cfg.model} is a video model (temporal radius {radius}); train it on clips: drop "
                          "--no-clips and point --data at videos or folders of frames")  # fmt: skip
    uris = list_images(cfg.data, so)
    if cfg.val_data:
        val = list_images(cfg.val_data, so)[: cfg.val_max_images]
        train = [u for u in uris if u not in set(val)]
    else:
        train, val = split_images(uris, val_fraction=cfg.val_fraction, val_max=cfg.val_max_images, seed=cfg.seed)
    if not train:
        raise ConfigError(f"--data {cfg.data}: no training images left after holding out {len(val)} for validation")
    lr_map: dict[str, str] = {}
    if cfg.lr_data:
        lr_map = pair_lr(train + val, cfg.lr_data, so)
        missing = [u for u in train + val if u not in lr_map]
        if missing:
            raise ConfigError(f"--lr-data {cfg.lr_data}: no LR image pairs with {missing[:3]} (by file name); "
                              "name LR files like their HR files (scale tokens such as _LR/x4 are ignored)")  # fmt: skip
    if cfg.channels is not None:
        channels = cfg.channels
    else:
        probe = (train + val)[:32]
        channels = 1 if all(_header_channels(u, so) == 1 for u in probe) else 3
    return {"train": train, "val": val, "lr_map": lr_map, "channels": channels}


def storage_for_ray(uri: str, storage_options: Mapping[str, Any]) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``: local paths as they are; other fsspec URIs through
    a pyarrow ``PyFileSystem`` wrapping the same fsspec filesystem srbatch uses (endpoint and credentials included)."""
    from srbatch.io.storage import filesystem

    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        return os.path.abspath(os.path.expanduser(path)), None
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, storage_options)
    return path.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _existing_run(cfg: TrainConfig) -> bool:
    from srbatch.io.storage import filesystem, join_uri

    fs, path = filesystem(join_uri(cfg.run_storage(), cfg.name), cfg.fs_options())
    try:
        fs.invalidate_cache()
        return bool(fs.exists(path)) and any("checkpoint_" in p for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return False


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train as configured on the Ray cluster (:func:`srbatch.jobkit.cluster.ray_session`), export, and return the
    card."""
    from srbatch.io.storage import join_uri
    from srbatch.jobkit.cluster import ray_session
    from srbatch.train.export import read_card
    from srbatch.train.loop import train_loop_per_worker

    t0 = time.perf_counter()
    cfg.degradation_config()  # fail early on a bad degradation mapping
    exists = _existing_run(cfg)
    run_path = join_uri(cfg.run_storage(), cfg.name)
    if exists and not cfg.resume:
        raise ConfigError(
            f"a training run named {cfg.name!r} already has checkpoints at {run_path}; pass --resume to continue it "
            "(raise --steps to train longer), or choose another --name"
        )
    if cfg.resume and not exists:
        raise ConfigError(f"--resume: no checkpoints of a run named {cfg.name!r} at {run_path}; drop --resume to "
                          "start it, or check --name / --storage-path / --output")  # fmt: skip
    plan = plan_data(cfg)
    what = "clip(s)" if plan.get("clips") else "image(s)"
    print(f"srbatch train: {len(plan['train'])} training and {len(plan['val'])} validation {what} from {cfg.data}; "
          f"{plan['channels']} channel(s); checkpoints at {run_path}", flush=True)  # fmt: skip

    with ray_session(cfg, dashboard=True) as ray:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        gpus = float(ray.cluster_resources().get("GPU", 0))
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus >= 1
        if use_gpu and gpus < 1:
            raise ConfigError("--use-gpu: the Ray cluster has no GPU; drop the flag to train on CPUs")
        storage_path, storage_fs = storage_for_ray(cfg.run_storage(), cfg.fs_options())
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_ENV)}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                               **({"GPU": 1} if use_gpu else {})}),  # fmt: skip
            run_config=RunConfig(
                name=cfg.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                worker_runtime_env={"env_vars": env} if env else None,
            ),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # Ray Train wraps worker errors; keep the first line of the cause
            raise TrainingError(f"training failed after {cfg.max_failures} allowed failure(s): "
                                f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}; "
                                f"the latest checkpoint is under {run_path}: fix the cause and rerun with --resume"
                                ) from e  # fmt: skip
        if getattr(result, "error", None):
            raise TrainingError(f"training failed: {result.error}; rerun with --resume to continue from {run_path}")
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
    card = read_card(cfg.output, cfg.fs_options())
    return TrainResult(output=cfg.output, run_path=run_path, card=card, seconds=time.perf_counter() - t0,
                       checkpoint=ckpt)  # fmt: skip
