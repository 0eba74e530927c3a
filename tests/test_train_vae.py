"""The VAE through the training loop: the generic auxiliary-loss hook (one step compared with the same step written out
by hand; other models untouched), then the real job on a local Ray cluster (history with the KL part, an export that
loads and runs)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from srbatch.local import sample_images_dir
from srbatch.train import TrainConfig, run_training

VAE_ARGS: dict[str, Any] = {"num_feat": 4, "levels": 2, "num_block": 1, "latent_channels": 4, "kl_weight": 0.5}


def _training(model: str, model_args: dict[str, Any]) -> Any:
    """The loop's ``_Training`` for one CPU worker (rank 0 of 1), with the real crop sampler on two sample images."""
    from srbatch.train.data import CropSampler
    from srbatch.train.loop import _Training, _Worker, build_generator

    cfg = TrainConfig(data="unused/", output="unused/", preset="restoration", model=model, model_args=model_args,
                      crop_size=32, batch_size=2, ema=0.0, lr=1e-2)  # fmt: skip
    torch.manual_seed(cfg.seed)
    desc = build_generator(cfg, 3, None)
    w = _Worker(cfg=cfg, plan={}, rank=0, world=1, device=torch.device("cpu"), so={}, desc=desc, channels=3)
    images = [np.asarray(Image.open(Path(sample_images_dir()) / n).convert("RGB")) for n in ("chelsea.png", "coffee.jpg")]
    sampler = CropSampler(images, scale=1, crop_size=32, degradation=cfg.degradation_config(), seed=7)
    return _Training(w), sampler, images, cfg


def test_hook_adds_the_kl_term_exactly_and_reports_it() -> None:
    """One ``train_step`` of the loop back-propagates the loss written out here: L1 + kl_weight * KL (the KL from the
    encoder's moments with torch.distributions), same gradients; the reported parts add up."""
    from torch.distributions import Normal, kl_divergence

    from srbatch.train.data import CropSampler

    run, sampler, images, cfg = _training("vae", VAE_ARGS)
    ref = copy.deepcopy(run.gen)
    lr_b, hr_b = CropSampler(images, scale=1, crop_size=32, degradation=cfg.degradation_config(), seed=7).sample(2)

    torch.manual_seed(11)
    parts = run.train_step(sampler)
    torch.manual_seed(11)
    sr = ref.train()(lr_b)
    mu, logvar = ref.encode(lr_b)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum() / lr_b[0].numel() / 2
    pixel = F.l1_loss(sr, hr_b)
    loss = pixel + VAE_ARGS["kl_weight"] * kl
    loss.backward()

    assert set(parts) == {"loss", "pixel", "kl"}
    assert parts["kl"] == pytest.approx(VAE_ARGS["kl_weight"] * float(kl.detach()), rel=1e-5) and parts["kl"] > 1e-4
    assert parts["pixel"] == pytest.approx(float(pixel), rel=1e-5)
    assert parts["loss"] == pytest.approx(parts["pixel"] + parts["kl"], rel=1e-6)
    # the loop's gradients (kept after its step: it zeroes them before the backward) are those of this loss
    for (name, got), want in zip(run.gen.named_parameters(), ref.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-7)
    # and it stepped: Adam's first step moves every weight with a gradient by about the learning rate
    moved = (run.gen.decoder.tail.weight - ref.decoder.tail.weight).abs()
    assert float(moved.max()) == pytest.approx(cfg.lr, rel=0.01)
    assert run.aux_log == {"kl": [parts["kl"]]}


def test_hook_leaves_other_models_alone() -> None:
    run, sampler, _, _ = _training("srresnet", {"num_block": 1, "num_feat": 8})
    parts = run.train_step(sampler)
    assert set(parts) == {"loss"} and run.aux_log == {}



@pytest.mark.slow
def test_vae_trains_through_the_job_and_its_export_runs(ray_cluster, tmp_path: Path) -> None:
    from srbatch.inference import Upscaler
    from srbatch.models.loader import load_model

    out = tmp_path / "vae-x1"
    r = run_training(TrainConfig(data=sample_images_dir(), output=str(out), preset="restoration", model="vae",
                                 model_args=VAE_ARGS, steps=4, val_every=2, crop_size=32, batch_size=2,
                                 val_max_size=64, log_every=1))  # fmt: skip
    assert r.card["architecture"] == "vae" and r.card["scale"] == 1
    assert r.card["hparams"]["kl_weight"] == VAE_ARGS["kl_weight"]
    hist = pq.read_table(out / "history.parquet").to_pylist()
    assert [h["step"] for h in hist] == [2, 4]
    for h in hist:  # the KL is its own part of the history; the loss includes it
        assert math.isfinite(h["kl"]) and 0 < h["kl"] < h["loss"]
    assert all(math.isfinite(r.card["validation"][k]["psnr_y"]) for k in ("initial", "final"))

    desc = load_model(str(out))
    assert desc.architecture == "vae" and desc.hparams == r.card["hparams"] and not desc.module.training
    img = np.asarray(Image.open(Path(sample_images_dir()) / "chelsea.png").convert("RGB"))[:45, :37]
    up = Upscaler(desc, device="cpu")
    a, b = up.upscale_array(img), up.upscale_array(img)
    assert a.shape == img.shape and np.array_equal(a, b)  # eval: the posterior mean, deterministic
    assert a.dtype == np.float32 and float(np.std(a)) > 0.02  # values in [0, 1]: an image, not a blank
