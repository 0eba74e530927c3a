"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (one process per worker, DDP between them).

Every worker samples its own crops from its share of the images; gradients are averaged by DDP. Rank 0 validates,
writes checkpoints (reported to Ray Train, which keeps them under ``<storage_path>/<name>/``) and, at the end, exports
the model. A restarted worker group (``FailureConfig.max_failures``) or a resumed run starts from the latest reported
checkpoint: model, EMA, optimisers, schedulers, the crop generator, history and best weights, so the step count and
the random stream continue.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.inference.colorspace import data_channels, to_model_space
from srbatch.models.descriptor import ArchInfo, ModelDescriptor
from srbatch.train.config import TrainConfig
from srbatch.train.validation import print_val, validate, validate_bicubic

log = logging.getLogger("srbatch.train")

STATE_FILE = "training_state.pt"
GENERATOR_FILE = "generator.safetensors"


def say(line: str) -> None:
    """Print one line from a training worker, once. Ray Train patches ``print`` in its workers to log through the root
    logger and, when ``sys.stdout`` is wrapped (as in Ray workers), to print as well: every line reached the driver
    twice. Writing to the stream directly prints it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- model construction


def build_generator(cfg: TrainConfig, channels: int, storage_options: Mapping[str, Any] | None) -> ModelDescriptor:
    """The generator to train: ``--init`` weights (fine-tuning) or a freshly initialised ``--model``."""
    from srbatch.models.loader import build_model, load_model
    from srbatch.models.registry import architectures, get_architecture, variants

    if cfg.init:
        desc = load_model(cfg.init, scale=cfg.scale, storage_options=storage_options)
        if desc.architecture.startswith("spandrel:"):
            raise ConfigError(
                f"--init {cfg.init}: {desc.architecture} is a spandrel model; srbatch trains its native architectures "
                "only (see `srbatch models`)"
            )
        if desc.scale != cfg.scale:
            raise ConfigError(f"--init {cfg.init} is a x{desc.scale} model; train it with --scale {desc.scale}")
        return desc
    var = variants()
    arch_name = var[cfg.model][0] if cfg.model in var else cfg.model
    if arch_name not in architectures():
        known = ", ".join(sorted(a for a in architectures() if architectures()[a].needs_weights))
        raise ConfigError(f"--model {cfg.model!r} is not a trainable architecture; use one of {known} (or a variant)")
    arch = get_architecture(arch_name)
    if not arch.needs_weights:
        raise ConfigError(f"--model {cfg.model} has no weights to train; choose e.g. srresnet, edsr-baseline, espcn")
    params = inspect.signature(arch.build).parameters
    args: dict[str, Any] = {**cfg.model_args, "scale": cfg.scale}
    if "channels" in params:
        args.setdefault("channels", channels)
    elif "num_in_ch" in params:
        args.setdefault("num_in_ch", channels)
        args.setdefault("num_out_ch", channels)
    elif "in_nc" in params:
        args.setdefault("in_nc", channels)
        args.setdefault("out_nc", channels)
    elif channels != 3:
        raise ConfigError(
            f"--model {cfg.model} works on RGB only but the data is grey; use srresnet, rrdbnet, imdn or espcn, or "
            "--channels 3 to train on grey images replicated to RGB"
        )
    desc = build_model(cfg.model, **args)
    if desc.scale != cfg.scale:
        raise ConfigError(f"--model {cfg.model} is a x{desc.scale} variant; use --scale {desc.scale}")
    return desc


def model_input(lr: torch.Tensor, info: ArchInfo) -> torch.Tensor:
    """SRCNN/VDSR-style models take the bicubic-upscaled image."""
    if info.input_upsampled:
        from srbatch.metrics.resize import imresize

        return imresize(lr, info.scale)
    return lr


def frames_to_model_space(lr: torch.Tensor, color_space: str) -> torch.Tensor:
    """:func:`to_model_space` of ``(N, C, H, W)`` images or of ``(N, T, C, H, W)`` frame windows (frame by frame)."""
    if lr.ndim != 5:
        return to_model_space(lr, color_space)
    n, t = int(lr.shape[0]), int(lr.shape[1])
    y = to_model_space(lr.flatten(0, 1), color_space)
    if y.shape[0] != n * t:
        raise ConfigError(f"a {color_space} model on {lr.shape[2]}-channel frames: train it with --channels "
                          f"{y.shape[1]} (frames per channel are not supported)")  # fmt: skip
    return y.reshape(n, t, *y.shape[1:])


def lr_lambda(cfg: TrainConfig) -> Any:
    """Multiplier of the base learning rate at a step: warm-up, then cosine (to 1%), step (halving) or constant."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = min(1.0, step / max(1, cfg.steps))
        if cfg.lr_schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.lr_schedule == "step":
            return 0.5 ** sum(t >= m for m in cfg.lr_milestones)
        return 1.0

    return f


# ----------------------------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": TrainConfig dump, "plan": see runner.plan_data}``.

    The recipe: set up the worker, read its data, build the model and optimisers, restore the latest checkpoint,
    measure the starting point (rank 0), then train step by step, validating and checkpointing every ``val_every``
    steps, and export at the end (rank 0)."""
    import ray.train

    w = _set_up_worker(config)
    data = _read_data(w)
    run = _Training(w)
    run.restore(ray.train.get_checkpoint())
    sampler = data.crop_sampler(w, first_step=run.step)
    if w.rank == 0 and run.state["initial"] is None:
        run.measure_starting_point(data.val_set)
    run.prepare()
    while run.step < w.cfg.steps:
        parts = run.train_step(sampler)
        run.log_progress(parts)
        if run.step % w.cfg.val_every == 0 or run.step == w.cfg.steps:
            run.validate_and_checkpoint(data.val_set)
    if w.rank == 0:
        run.export()


@dataclass
class _Worker:
    """Who this worker is and what it trains: the config, the data plan, its rank, device and the generator."""

    cfg: TrainConfig
    plan: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    so: dict[str, Any]
    desc: ModelDescriptor
    channels: int

    @property
    def info(self) -> ArchInfo:
        return self.desc.info


def _set_up_worker(config: dict[str, Any]) -> _Worker:
    """Parse the config, pin threads and the seed (same initial weights on every worker; DDP also broadcasts rank
    0's), and build the generator."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["cfg"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    so = cfg.fs_options()
    desc = build_generator(cfg, plan["channels"], so)
    return _Worker(cfg=cfg, plan=plan, rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                   device=ray.train.torch.get_device(), so=so, desc=desc,
                   channels=data_channels(desc.info.color_space, desc.info.in_channels, plan["channels"]))  # fmt: skip


@dataclass
class _WorkerData:
    """This worker's share of the training images (all of them when there are fewer than workers) and, on rank 0,
    the validation pairs."""

    names: list[str]
    images: list[np.ndarray] | None
    lr_images: list[np.ndarray] | None
    val_set: list[Any]

    def crop_sampler(self, w: _Worker, *, first_step: int) -> Any:
        """The crop stream, seeded by (seed, rank, first step): a resumed run draws new crops, reproducibly. The
        decoded images move into the sampler. Clip datasets give windows of ``2 * temporal_radius + 1`` frames."""
        from srbatch.train.clips import ClipSampler
        from srbatch.train.data import CropSampler

        cfg = w.cfg
        if w.plan.get("clips"):
            sampler: Any = ClipSampler(self.images or [], radius=w.info.temporal_radius, scale=cfg.scale,
                                       crop_size=cfg.crop_size, degradation=cfg.degradation_config(),
                                       seed=(cfg.seed * 1009 + w.rank) * 1_000_003 + int(first_step),
                                       video_crf=cfg.video_crf, names=self.names)  # fmt: skip
            self.images = None
            return sampler
        sampler = CropSampler(self.images or [], scale=cfg.scale, crop_size=cfg.crop_size,
                              degradation=cfg.degradation_config(),
                              seed=(cfg.seed * 1009 + w.rank) * 1_000_003 + int(first_step), lr_images=self.lr_images,
                              names=self.names)  # fmt: skip
        self.images = self.lr_images = None
        return sampler


def _read_data(w: _Worker) -> _WorkerData:
    """Decode this worker's training images (and their paired LR files) and, on rank 0, build the validation pairs."""
    from srbatch.train.data import build_val_set, read_image, to_channels

    cfg, so = w.cfg, w.so
    clips = bool(w.plan.get("clips"))

    def load(uri: str) -> np.ndarray:
        if clips:
            from srbatch.train.clips import read_clip

            return np.stack([to_channels(f, w.channels) for f in read_clip(uri, so)])
        return to_channels(read_image(uri, so).pixels, w.channels)

    train_uris: list[str] = w.plan["train"]
    mine = train_uris[w.rank :: w.world] if len(train_uris) >= w.world else train_uris
    if clips:
        from srbatch.train.clips import build_val_clips

        val_clips = [(u, load(u)) for u in w.plan["val"]] if w.rank == 0 else []
        val_set: list[Any] = build_val_clips(val_clips, scale=cfg.scale, degradation=cfg.degradation_config(),
                                             max_size=cfg.val_max_size, seed=cfg.seed,
                                             video_crf=cfg.video_crf)  # fmt: skip
        return _WorkerData(names=mine, images=[load(u) for u in mine], lr_images=None, val_set=val_set)
    lr_map: dict[str, str] = w.plan.get("lr_map") or {}
    images = [load(u) for u in mine]
    lr_images = [load(lr_map[u]) for u in mine] if lr_map else None
    val_set: list[Any] = []
    if w.rank == 0:
        val = [(u, load(u)) for u in w.plan["val"]]
        val_lr = {u: load(lr_map[u]) for u, _ in val if u in lr_map} or None
        val_set = build_val_set(val, scale=cfg.scale, degradation=cfg.degradation_config(), max_size=cfg.val_max_size,
                                seed=cfg.seed, lr_images=val_lr)  # fmt: skip
    return _WorkerData(names=mine, images=images, lr_images=lr_images, val_set=val_set)


class _Training:
    """The generator, its EMA, the optimisers and schedulers, the GAN parts, and the run's state (step, history,
    best weights, figures before training, samples, time, restarts): everything a checkpoint holds."""

    def __init__(self, w: _Worker) -> None:
        from srbatch.train.gan import EMA
        from srbatch.train.gan_stage import GanStage

        cfg = w.cfg
        self.w, self.cfg = w, cfg
        self.gen = w.desc.module.to(w.device).train()
        for p in self.gen.parameters():
            p.requires_grad_(True)
        self.model: nn.Module = self.gen  # the DDP-wrapped generator after prepare()
        self.ema = EMA(self.gen, cfg.ema) if cfg.ema > 0 else None
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lr_lambda(cfg))
        self.gan = GanStage(cfg, w.info, w.device, w.so) if cfg.stage == "gan" else None
        self.pixel_loss = nn.L1Loss() if cfg.loss == "l1" else nn.MSELoss()
        self.amp = cfg.amp and w.device.type == "cuda"
        self.state: dict[str, Any] = {"step": 0, "history": [], "best": None, "best_step": None, "initial": None,
                                      "bicubic": None, "samples": 0, "train_seconds": 0.0, "restarts": 0}  # fmt: skip
        self.step = 0
        self.losses: list[float] = []
        self.aux_log: dict[str, list[float]] = {}  # auxiliary loss parts of the interval (see _add_auxiliary_loss)
        self._start_interval()

    @property
    def averaged(self) -> nn.Module:
        """What is validated, checkpointed as the generator file and exported: the EMA copy, else the generator."""
        return self.ema.module if self.ema is not None else self.gen

    def restore(self, ckpt: Any) -> None:
        """Continue from Ray Train's latest reported checkpoint (a restarted worker group or ``--resume``)."""
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        self.gen.load_state_dict(saved["generator"])
        self.opt_g.load_state_dict(saved["opt_g"])
        self.sched_g.load_state_dict(saved["sched_g"])
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.load_state_dict(saved["ema"])
        if self.gan is not None and saved.get("gan") is not None:
            self.gan.load_state_dict(saved["gan"])
        self.state.update(saved["state"])
        self.state["restarts"] += 1
        self.step = int(self.state["step"])
        if self.w.rank == 0:
            say(f"srbatch train: resumed from step {self.step} ({ckpt.path})")

    def measure_starting_point(self, val_set: list[Any]) -> None:
        """Bicubic and the initial weights on the validation pairs, once per run (rank 0)."""
        self.state["bicubic"] = validate_bicubic(val_set, self.cfg.scale)
        self.state["initial"] = validate(self.gen, self.w.desc, val_set, self.w.device)
        print_val("before training", self.state["initial"], self.state["bicubic"])

    def prepare(self) -> None:
        """Wrap the generator (and the discriminator) for DDP when there are several workers; start the clocks."""
        import ray.train.torch

        if self.w.world > 1:
            self.model = ray.train.torch.prepare_model(self.gen)
        if self.gan is not None:
            self.gan.prepare(self.w.world)
        self._start_interval()

    def train_step(self, sampler: Any) -> dict[str, float]:
        """One optimiser step of the generator (and, for the GAN stage, of the discriminator); the loss parts."""
        info, device, step = self.w.info, self.w.device, self.step
        lr_b, hr_b = sampler.sample(self.cfg.batch_size)
        x = model_input(frames_to_model_space(lr_b, info.color_space), info).to(device, non_blocking=True)
        y = to_model_space(hr_b, info.color_space).to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.amp):
            sr = self.model(x)
        sr = sr.float()
        if self.gan is None:
            loss = self.pixel_loss(sr, y)
            parts = {"loss": float(loss.detach())}
        else:
            loss, parts = self.gan.generator_loss(sr, y, self.pixel_loss)
        loss, parts = self._add_auxiliary_loss(loss, parts)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        self.sched_g.step()
        if self.gan is not None:
            parts.update(self.gan.discriminator_step(sr.detach(), y, sched_step=True))
        if self.ema is not None:  # warm-up: early on, the average must not drag the random initial weights along
            self.ema.decay = min(self.cfg.ema, (1 + step) / (10 + step))
            self.ema.update(self.gen)
        if not all(math.isfinite(v) for v in parts.values()):
            raise FloatingPointError(
                f"step {step + 1}: a loss is not finite ({parts}); lower --lr or disable --amp, then --resume"
            )
        samples = self.cfg.batch_size * self.w.world
        self.step += 1
        self.samples_log += samples
        self.state["samples"] += samples
        self.losses.append(parts["loss"])
        return parts

    def _add_auxiliary_loss(self, loss: torch.Tensor, parts: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """A generator with a loss term of its own (the VAE's ``kl_weight * KL`` of its last training forward) exposes
        it as ``auxiliary_loss()``, a scalar tensor: it is added to the loss and reported as its own part, named by the
        module's ``auxiliary_loss_name`` (default ``aux``), beside ``pixel`` (the loss without it); its mean over each
        validation interval goes into the history. The bare generator is asked, not the DDP wrapper (the forward ran
        through the wrapper, the term lives on the module). Generators without the method are left as they are."""
        term = getattr(self.gen, "auxiliary_loss", None)
        if not callable(term):
            return loss, parts
        aux = term().float()
        name = str(getattr(self.gen, "auxiliary_loss_name", "aux"))
        total = loss + aux
        parts = {"pixel": parts["loss"], **parts, name: float(aux.detach()), "loss": float(total.detach())}
        self.aux_log.setdefault(name, []).append(parts[name])
        return total, parts

    def log_progress(self, parts: Mapping[str, float]) -> None:
        """Rank 0 prints loss, learning rate, throughput and ETA every ``log_every`` steps (and at the last)."""
        cfg, step = self.cfg, self.step
        if self.w.rank != 0 or not (step % cfg.log_every == 0 or step == cfg.steps):
            return
        dt = time.perf_counter() - self.t_log
        eta = (cfg.steps - step) * dt / max(1, self.samples_log / (cfg.batch_size * self.w.world))
        extra = "".join(f" {k} {v:.4g}" for k, v in parts.items() if k != "loss")
        say(f"srbatch train: step {step}/{cfg.steps} loss {np.mean(self.losses):.5f}{extra} "
            f"lr {self.sched_g.get_last_lr()[0]:.3g} {self.samples_log / dt:.1f} samples/s eta {eta:.0f} s")

    def validate_and_checkpoint(self, val_set: list[Any]) -> None:
        """Report the interval's metrics to Ray Train; rank 0 also validates, keeps the best weights, appends to the
        history, and reports a checkpoint with it (``checkpoint_<step>``)."""
        import ray.train

        step, state = self.step, self.state
        state["train_seconds"] += time.perf_counter() - self.t_train0
        metrics: dict[str, Any] = {"step": step, "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                                   "lr": float(self.sched_g.get_last_lr()[0]),
                                   "samples_per_s": state["samples"] / max(1e-9, state["train_seconds"])}  # fmt: skip
        self.losses = []
        metrics.update({k: float(np.mean(v)) for k, v in self.aux_log.items() if v})
        self.aux_log = {}
        if self.w.rank == 0:
            v = validate(self.averaged, self.w.desc, val_set, self.w.device)
            metrics.update({f"val_{k}": x for k, x in v.items()})
            if v and (state["best"] is None or v["psnr_y"] > state["best"]["psnr_y"]):
                state["best"] = v
                state["best_step"] = step
                state["best_weights"] = {k: t.detach().cpu().clone() for k, t in self.averaged.state_dict().items()}
            state["history"].append({**metrics, "time": time.time(), "restarts": state["restarts"]})
            print_val(f"step {step}", v, state["bicubic"])
            state["step"] = step
            with tempfile.TemporaryDirectory(prefix="srbatch-ckpt-") as d:
                _write_checkpoint(d, self.gen, self.opt_g, self.sched_g, self.ema, self.gan, state, self.w.desc)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint_{step:08d}")  # fmt: skip
            _write_history(self.cfg, state["history"], self.w.so)
        else:
            ray.train.report(metrics)
        self._start_interval()

    def export(self) -> None:
        """Rank 0: the best-validating (``--export best``) or the last weights, with the model card, to --output."""
        from srbatch.train.export import export_model

        self.state["step"] = self.step
        best = self.state.get("best_weights")
        weights = best if self.cfg.export == "best" and best is not None else self.averaged.state_dict()
        export_model(self.cfg, self.w.desc, weights, self.state, self.w.plan, self.w.so)

    def _start_interval(self) -> None:
        self.t_log = self.t_train0 = time.perf_counter()
        self.samples_log = 0


def _write_checkpoint(d: str, gen: nn.Module, opt_g: Any, sched_g: Any, ema: Any, gan: Any,
                      state: Mapping[str, Any], desc: ModelDescriptor) -> None:  # fmt: skip
    """Everything needed to continue: one ``training_state.pt`` (tensors and plain data only, loadable with
    ``weights_only=True``) plus the current (EMA) generator as a self-describing safetensors file."""
    from srbatch.weights.checkpoint import save_checkpoint

    saved = {
        "generator": gen.state_dict(),
        "opt_g": opt_g.state_dict(),
        "sched_g": sched_g.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "gan": gan.state_dict() if gan is not None else None,
        "state": dict(state),
    }
    torch.save(saved, os.path.join(d, STATE_FILE))
    module = ema.module if ema is not None else gen
    save_checkpoint(module.state_dict(), os.path.join(d, GENERATOR_FILE), architecture=desc.architecture,
                    hparams=desc.hparams, name=desc.name)  # fmt: skip


def _write_history(cfg: TrainConfig, history: list[Mapping[str, Any]], so: Mapping[str, Any]) -> None:
    """``<storage_path>/<name>/history.parquet``: one row per validation (kept beside the checkpoints)."""
    from srbatch.io.storage import join_uri
    from srbatch.train.export import write_history

    write_history(history, join_uri(cfg.run_storage(), cfg.name, "history.parquet"), so)


__all__ = ["train_loop_per_worker", "build_generator", "validate", "validate_bicubic", "to_model_space"]
