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
from typing import Any

import numpy as np
import torch
from torch import nn

from srbatch.errors import ConfigError
from srbatch.models.descriptor import ArchInfo, ModelDescriptor
from srbatch.train.config import TrainConfig

log = logging.getLogger("srbatch.train")

STATE_FILE = "training_state.pt"
GENERATOR_FILE = "generator.safetensors"
CRASH_STEP_ENV = "SRBATCH_TRAIN_CRASH_AT_STEP"
"""Fault injection for tests and drills: the last worker exits abruptly (``os._exit``) when it reaches this step..."""
CRASH_MARKER_ENV = "SRBATCH_TRAIN_CRASH_MARKER"
"""...once: the crash creates this local file first and does not happen again while it exists."""


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


def data_channels(info: ArchInfo, detected: int) -> int:
    """The channel count the data is converted to for a model: its input channels, except that Y models take colour
    data (their input is its luma)."""
    if info.color_space == "Y":
        return detected
    return info.in_channels


def to_model_space(x: torch.Tensor, info: ArchInfo) -> torch.Tensor:
    """RGB/grey ``(N, C, H, W)`` in [0, 1] -> the model's colour space (MATLAB YCbCr, its Y, or unchanged)."""
    from srbatch.metrics.color import rgb2ycbcr

    if info.color_space == "YCbCr":
        return rgb2ycbcr(x)
    if info.color_space == "Y" and x.shape[1] == 3:
        return rgb2ycbcr(x)[:, :1]
    return x


def to_rgb(x: torch.Tensor, info: ArchInfo) -> torch.Tensor:
    """The model's colour space back to RGB (or grey) for the perceptual loss and the discriminator."""
    from srbatch.metrics.color import ycbcr2rgb

    return ycbcr2rgb(x) if info.color_space == "YCbCr" else x


def model_input(lr: torch.Tensor, info: ArchInfo) -> torch.Tensor:
    """SRCNN/VDSR-style models take the bicubic-upscaled image."""
    if info.input_upsampled:
        from srbatch.metrics.resize import imresize

        return imresize(lr, info.scale)
    return lr


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


# ----------------------------------------------------------------------------------------------- validation


def validate(
    module: nn.Module, desc: ModelDescriptor, val_set: list[Any], device: torch.device
) -> dict[str, float]:
    """Mean PSNR/SSIM (paper convention: Y of MATLAB YCbCr for 8-bit RGB, the plane itself for grey, border = scale)
    of ``module`` on the validation pairs, through the inference engine the upscale job uses."""
    from srbatch.inference import Upscaler
    from srbatch.io.images import from_float
    from srbatch.metrics.quality import measure

    if not val_set:
        return {}
    was_training = module.training
    d = ModelDescriptor(module=module, architecture=desc.architecture, info=desc.info, hparams=desc.hparams,
                        name=desc.name)  # fmt: skip
    up = Upscaler(d, device=device)
    border = desc.scale if desc.scale > 1 else 0
    ms = []
    with torch.no_grad():
        for v in val_set:
            sr = from_float(up.upscale_array(v.lr), v.hr.dtype)
            ms.append(measure(sr.reshape(v.hr.shape), v.hr, crop_border=border))
    module.train(was_training)
    return _means(ms)


def validate_bicubic(val_set: list[Any], scale: int) -> dict[str, float]:
    """The same figures for MATLAB bicubic upscaling of the LR (for scale 1: the degraded input itself)."""
    from srbatch.metrics.quality import measure
    from srbatch.metrics.resize import imresize_uint8

    ms = []
    for v in val_set:
        sr = imresize_uint8(v.lr, scale) if scale > 1 else v.lr
        ms.append(measure(sr.reshape(v.hr.shape), v.hr, crop_border=scale if scale > 1 else 0))
    return _means(ms)


def _means(ms: list[Any]) -> dict[str, float]:
    if not ms:
        return {}
    return {
        "psnr_y": float(np.mean([m.psnr_y for m in ms])),
        "ssim_y": float(np.mean([m.ssim_y for m in ms])),
        "psnr_rgb": float(np.mean([m.psnr_rgb for m in ms])),
        "ssim_rgb": float(np.mean([m.ssim_rgb for m in ms])),
    }


# ----------------------------------------------------------------------------------------------- the loop


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") and isinstance(m.module, nn.Module) else m


def _maybe_crash(step: int, rank: int, world: int) -> None:
    target, marker = os.environ.get(CRASH_STEP_ENV), os.environ.get(CRASH_MARKER_ENV)
    if not target or not marker or step != int(target) or rank != world - 1 or os.path.exists(marker):
        return
    import ray.train

    # A drill of a crash after the last checkpoint is safe: wait until Ray Train has committed every report (a worker
    # dying before its checkpoint is committed restarts from the one before, which is Ray's contract).
    ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    with open(marker, "w") as f:
        f.write(f"worker {rank} crashed on purpose at step {step}\n")
    say(f"srbatch train: fault injection: worker {rank} exits abruptly at step {step}")
    os._exit(17)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"cfg": TrainConfig dump, "plan": see runner.plan_data}``."""
    import ray.train
    import ray.train.torch

    from srbatch.train.data import CropSampler, build_val_set, read_image, to_channels

    cfg = TrainConfig.model_validate(config["cfg"])
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # same initial weights on every worker (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    so = cfg.fs_options()
    degradation = cfg.degradation_config()

    desc = build_generator(cfg, plan["channels"], so)
    channels = data_channels(desc.info, plan["channels"])
    info = desc.info

    # ---- data: this worker's share of the training images (all of them when there are fewer than workers)
    train_uris: list[str] = plan["train"]
    mine = train_uris[rank::world] if len(train_uris) >= world else train_uris
    lr_map: dict[str, str] = plan.get("lr_map") or {}
    images = [to_channels(read_image(u, so).pixels, channels) for u in mine]
    lr_images = [to_channels(read_image(lr_map[u], so).pixels, channels) for u in mine] if lr_map else None

    val_set: list[Any] = []
    if rank == 0:
        val = [(u, to_channels(read_image(u, so).pixels, channels)) for u in plan["val"]]
        val_lr = {u: to_channels(read_image(lr_map[u], so).pixels, channels) for u, _ in val if u in lr_map} or None
        val_set = build_val_set(val, scale=cfg.scale, degradation=degradation, max_size=cfg.val_max_size,
                                seed=cfg.seed, lr_images=val_lr)  # fmt: skip

    # ---- model, EMA, optimisers
    gen = desc.module.to(device).train()
    for p in gen.parameters():
        p.requires_grad_(True)
    from srbatch.train.gan import EMA

    ema = EMA(gen, cfg.ema) if cfg.ema > 0 else None
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(cfg))
    gan = _GanParts(cfg, info, device, so) if cfg.stage == "gan" else None

    state: dict[str, Any] = {"step": 0, "history": [], "best": None, "best_step": None, "initial": None,
                             "bicubic": None, "samples": 0, "train_seconds": 0.0, "restarts": 0}  # fmt: skip
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        gen.load_state_dict(saved["generator"])
        opt_g.load_state_dict(saved["opt_g"])
        sched_g.load_state_dict(saved["sched_g"])
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        if gan is not None and saved.get("gan") is not None:
            gan.load_state_dict(saved["gan"])
        state.update(saved["state"])
        state["restarts"] += 1
        if rank == 0:
            say(f"srbatch train: resumed from step {state['step']} ({ckpt.path})")

    # Each worker's crop stream is seeded by (seed, rank, first step): a resumed run draws new crops, reproducibly.
    sampler = CropSampler(images, scale=cfg.scale, crop_size=cfg.crop_size, degradation=degradation,
                          seed=(cfg.seed * 1009 + rank) * 1_000_003 + int(state["step"]), lr_images=lr_images,
                          names=mine)  # fmt: skip
    del images, lr_images

    if rank == 0 and state["initial"] is None:
        state["bicubic"] = validate_bicubic(val_set, cfg.scale)
        state["initial"] = validate(gen, desc, val_set, device)
        _print_val("before training", state["initial"], state["bicubic"])

    model = ray.train.torch.prepare_model(gen) if world > 1 else gen
    if gan is not None:
        gan.prepare(world)
    pixel_loss = nn.L1Loss() if cfg.loss == "l1" else nn.MSELoss()
    amp = cfg.amp and device.type == "cuda"

    step = int(state["step"])
    bs = cfg.batch_size
    t_log, samples_log, t_train0 = time.perf_counter(), 0, time.perf_counter()
    losses: list[float] = []
    while step < cfg.steps:
        lr_b, hr_b = sampler.sample(bs)
        x = model_input(to_model_space(lr_b, info), info).to(device, non_blocking=True)
        y = to_model_space(hr_b, info).to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            sr = model(x)
        sr = sr.float()
        if gan is None:
            loss = pixel_loss(sr, y)
            parts = {"loss": float(loss.detach())}
        else:
            loss, parts = gan.generator_loss(sr, y, pixel_loss)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        sched_g.step()
        if gan is not None:
            parts.update(gan.discriminator_step(sr.detach(), y, sched_step=True))
        if ema is not None:  # warm-up: early on, the average must not drag the random initial weights along
            ema.decay = min(cfg.ema, (1 + step) / (10 + step))
            ema.update(gen)
        if not all(math.isfinite(v) for v in parts.values()):
            raise FloatingPointError(
                f"step {step + 1}: a loss is not finite ({parts}); lower --lr or disable --amp, then --resume"
            )
        step += 1
        samples_log += bs * world
        state["samples"] += bs * world
        losses.append(parts["loss"])
        _maybe_crash(step, rank, world)

        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
            dt = time.perf_counter() - t_log
            eta = (cfg.steps - step) * dt / max(1, samples_log / (bs * world))
            extra = "".join(f" {k} {v:.4g}" for k, v in parts.items() if k != "loss")
            say(f"srbatch train: step {step}/{cfg.steps} loss {np.mean(losses):.5f}{extra} "
                f"lr {sched_g.get_last_lr()[0]:.3g} {samples_log / dt:.1f} samples/s eta {eta:.0f} s")

        if step % cfg.val_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            state["train_seconds"] += now - t_train0
            metrics: dict[str, Any] = {"step": step, "loss": float(np.mean(losses)) if losses else float("nan"),
                                       "lr": float(sched_g.get_last_lr()[0]),
                                       "samples_per_s": state["samples"] / max(1e-9, state["train_seconds"])}  # fmt: skip
            losses = []
            if rank == 0:
                val_module = ema.module if ema is not None else gen
                v = validate(val_module, desc, val_set, device)
                metrics.update({f"val_{k}": x for k, x in v.items()})
                if v and (state["best"] is None or v["psnr_y"] > state["best"]["psnr_y"]):
                    state["best"] = v
                    state["best_step"] = step
                    state["best_weights"] = {k: t.detach().cpu().clone() for k, t in val_module.state_dict().items()}
                state["history"].append({**metrics, "time": time.time(), "restarts": state["restarts"]})
                _print_val(f"step {step}", v, state["bicubic"])
                state["step"] = step
                with tempfile.TemporaryDirectory(prefix="srbatch-ckpt-") as d:
                    _write_checkpoint(d, gen, opt_g, sched_g, ema, gan, state, desc)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                     checkpoint_dir_name=f"checkpoint_{step:08d}")  # fmt: skip
                _write_history(cfg, state["history"], so)
            else:
                ray.train.report(metrics)
            t_log, samples_log, t_train0 = time.perf_counter(), 0, time.perf_counter()

    if rank == 0:
        from srbatch.train.export import export_model

        state["step"] = step
        weights = (state.get("best_weights") if cfg.export == "best" and state.get("best_weights") is not None
                   else (ema.module if ema is not None else gen).state_dict())  # fmt: skip
        export_model(cfg, desc, weights, state, plan, so)


def _print_val(when: str, v: Mapping[str, float], bicubic: Mapping[str, float] | None) -> None:
    if not v:
        return
    b = f" ({bicubic.get('label', 'bicubic')} {bicubic['psnr_y']:.2f} dB / {bicubic['ssim_y']:.4f})" if bicubic else ""
    say(f"srbatch train: validation {when}: PSNR_Y {v['psnr_y']:.2f} dB SSIM_Y {v['ssim_y']:.4f}{b}")


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


class _GanParts:
    """Discriminator, VGG perceptual loss and their optimiser for ``--stage gan``."""

    def __init__(self, cfg: TrainConfig, info: ArchInfo, device: torch.device, so: Mapping[str, Any]) -> None:
        from srbatch.train.gan import PerceptualLoss, VGGFeatureExtractor, build_discriminator

        self.cfg, self.info, self.device = cfg, info, device
        self.recipe = cfg.recipe()
        d_channels = 3 if info.color_space in ("RGB", "YCbCr") else 1
        self.d_raw = build_discriminator(self.recipe["discriminator"], in_channels=d_channels,
                                         crop_size=cfg.crop_size).to(device).train()  # fmt: skip
        self.d = self.d_raw
        self.perceptual = None
        if self.recipe["perceptual_weight"] > 0:
            vgg = VGGFeatureExtractor(self.recipe["perceptual_layer"], weights=cfg.vgg_weights, storage_options=so)
            self.perceptual = PerceptualLoss(vgg.to(device), criterion=self.recipe["perceptual_criterion"],
                                             feature_scale=self.recipe["feature_scale"])  # fmt: skip
        self.opt = torch.optim.Adam(self.d_raw.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))

    def prepare(self, world: int) -> None:
        # The discriminator is wrapped for DDP on its own; its real and fake batches go through it in ONE forward
        # (concatenated), so BatchNorm statistics and DDP buffers are touched once per step.
        if world > 1:
            import ray.train.torch

            self.d = ray.train.torch.prepare_model(self.d_raw, move_to_device=False)

    def _logits(self, module: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = module(torch.cat([real, fake], 0))
        return out[: real.shape[0]], out[real.shape[0] :]

    def generator_loss(self, sr: torch.Tensor, hr: torch.Tensor, pixel_loss: nn.Module) -> tuple[torch.Tensor, dict]:
        from srbatch.train.gan import bce_generator_loss, relativistic_generator_loss

        r = self.recipe
        sr_rgb, hr_rgb = to_rgb(sr, self.info), to_rgb(hr, self.info)
        total = sr.new_zeros(())
        parts: dict[str, float] = {}
        if r["pixel_weight"] > 0:
            lp = pixel_loss(sr, hr)
            total = total + r["pixel_weight"] * lp
            parts["pixel"] = float(lp.detach())
        if self.perceptual is not None:
            lv = self.perceptual(sr_rgb, hr_rgb)
            total = total + r["perceptual_weight"] * lv
            parts["perceptual"] = float(lv.detach())
        # The generator step uses the unwrapped discriminator (no DDP gradient sync: D is not updated here) with its
        # parameters frozen, so no unused-parameter or double-forward trouble reaches DDP.
        for p in self.d_raw.parameters():
            p.requires_grad_(False)
        real_logits, fake_logits = self._logits(self.d_raw, hr_rgb, sr_rgb)
        if r["adversarial"] == "relativistic":
            la = relativistic_generator_loss(real_logits.detach(), fake_logits)
        else:
            la = bce_generator_loss(fake_logits)
        for p in self.d_raw.parameters():
            p.requires_grad_(True)
        total = total + r["adversarial_weight"] * la
        parts["adversarial"] = float(la.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    def discriminator_step(self, sr: torch.Tensor, hr: torch.Tensor, *, sched_step: bool) -> dict[str, float]:
        from srbatch.train.gan import bce_discriminator_loss, relativistic_discriminator_loss

        real_logits, fake_logits = self._logits(self.d, to_rgb(hr, self.info), to_rgb(sr, self.info))
        if self.recipe["adversarial"] == "relativistic":
            ld = relativistic_discriminator_loss(real_logits, fake_logits)
        else:
            ld = bce_discriminator_loss(real_logits, fake_logits)
        self.opt.zero_grad(set_to_none=True)
        ld.backward()
        self.opt.step()
        if sched_step:
            self.sched.step()
        return {"d_loss": float(ld.detach()), "d_real": float(torch.sigmoid(real_logits).mean().detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"d": self.d_raw.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        self.d_raw.load_state_dict(s["d"])
        self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])


__all__ = ["train_loop_per_worker", "build_generator", "validate", "validate_bicubic", "to_model_space"]
