"""The GAN stage's part of a training step (``--stage gan``): the discriminator, the VGG perceptual loss, the
generator's combined loss and the discriminator's own step, with their optimiser and schedule (checkpointed with the
generator by :mod:`srbatch.train.loop`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from srbatch.inference.colorspace import from_model_space
from srbatch.models.descriptor import ArchInfo
from srbatch.train.config import TrainConfig
from srbatch.train.loop import lr_lambda

__all__ = ["GanStage"]


class GanStage:
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
        cs = self.info.color_space
        sr_rgb, hr_rgb = from_model_space(sr, cs), from_model_space(hr, cs)
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

        cs = self.info.color_space
        real_logits, fake_logits = self._logits(self.d, from_model_space(hr, cs), from_model_space(sr, cs))
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
