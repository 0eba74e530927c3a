"""The restoration VAE: forward against a float64 functional re-derivation, KL against torch.distributions (closed form
and Monte Carlo), determinism in eval, round trips, the receptive field measured from gradients, tiling, learning.

Tiny configurations on CPU; the whole file runs in a few seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributions import Normal, kl_divergence

from srbatch import load_model, save_model
from srbatch.inference import Upscaler
from srbatch.inference.tiling import TilingConfig
from srbatch.models.archs import edsr, vae
from srbatch.models.loader import build_model
from srbatch.models.registry import architectures

TINY: dict[str, Any] = {"scale": 1, "channels": 3, "num_feat": 4, "levels": 2, "num_block": 1, "latent_channels": 3,
                        "kl_weight": 0.05}  # fmt: skip


def _make(seed: int = 0, **over: Any) -> vae.VAE:
    """A tiny VAE whose moments are spread (|mu| ~ 1, logvar ~ +-1), so the KL and the sampling are not negligible."""
    torch.manual_seed(seed)
    model = vae.VAE(**{**TINY, **over})
    with torch.no_grad():
        model.encoder.to_moments.weight.mul_(4.0)
        model.encoder.to_moments.bias.normal_(0.0, 1.0)
    return model


def _input(n: int = 2, c: int = 3, h: int = 16, w: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------- an independent path: the layers called by hand


def _conv(sd: dict[str, torch.Tensor], key: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    return F.conv2d(x, sd[f"{key}.weight"].double(), sd[f"{key}.bias"].double(), stride=stride, padding=1)


def _reference(model: vae.VAE, x: torch.Tensor, eps: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(output, mu, logvar) in float64 from the state dict with torch.nn.functional, following the documented layout:
    centre, head, stride-2 convs, blocks, moments; ``z = mu`` or ``mu + exp(logvar / 2) * eps``; decode; + 0.5."""
    sd = model.state_dict()
    hp = {**TINY, **{k: getattr(model, k) for k in ("scale", "channels", "levels")}}
    blocks = len({k.split(".")[2] for k in sd if k.startswith("encoder.body.")})
    act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    h = act(_conv(sd, "encoder.head", x.double() - 0.5))
    for i in range(hp["levels"]):
        h = act(_conv(sd, f"encoder.down.{i}", h, stride=2))
    for j in range(blocks):
        h = h + _conv(sd, f"encoder.body.{j}.conv2", act(_conv(sd, f"encoder.body.{j}.conv1", h)))
    mu, logvar = _conv(sd, "encoder.to_moments", h).chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    z = mu if eps is None else mu + torch.exp(0.5 * logvar) * eps.double()
    h = _conv(sd, "decoder.from_latent", z)
    for j in range(blocks):
        h = h + _conv(sd, f"decoder.body.{j}.conv2", act(_conv(sd, f"decoder.body.{j}.conv1", h)))
    for i in range(hp["levels"]):
        h = act(F.pixel_shuffle(_conv(sd, f"decoder.up.{i}", h), 2))
    out = F.pixel_shuffle(_conv(sd, "decoder.tail", h), hp["scale"]) + 0.5
    return out, mu, logvar


# --------------------------------------------------------------------------------------------- forward and shapes


@pytest.mark.parametrize(("scale", "channels"), [(1, 3), (2, 3), (1, 1), (3, 1)])
def test_shapes_and_eval_matches_the_layers_called_by_hand(scale: int, channels: int) -> None:
    model = _make(scale=scale, channels=channels).eval()
    x = _input(c=channels)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, channels, 16 * scale, 20 * scale)
    want, mu, _ = _reference(model, x, eps=None)
    assert mu.shape == (2, TINY["latent_channels"], 4, 5)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    info = vae.info(model_hparams(model))
    assert (info.scale, info.in_channels, info.out_channels) == (scale, channels, channels)
    assert info.color_space == ("RGB" if channels == 3 else "L") and info.size_multiple == 4 and info.local


def model_hparams(model: vae.VAE) -> dict[str, Any]:
    return {**TINY, "scale": model.scale, "channels": model.channels}


def test_eval_is_deterministic_train_samples_with_the_reparameterisation_trick() -> None:
    model = _make()
    x = _input()
    with torch.no_grad():
        model.eval()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
        assert torch.equal(a, b)  # the posterior mean: no randomness, whatever the RNG state
        assert torch.equal(model.auxiliary_loss(), torch.zeros(()))  # no KL kept from an eval forward
        model.train()
        torch.manual_seed(1)
        s1 = model(x)
        torch.manual_seed(2)
        s2 = model(x)
        # the sample is mu + exp(logvar / 2) * eps with eps = the global RNG's next normal draws
        _, mu, _ = _reference(model, x, eps=None)
        torch.manual_seed(1)
        eps = torch.randn(mu.shape)
        want, _, _ = _reference(model, x, eps=eps)
    torch.testing.assert_close(s1.double(), want, rtol=1e-5, atol=1e-5)
    assert (s1 - s2).abs().mean() > 1e-3 and (s1 - a).abs().mean() > 1e-3


def test_kl_equals_closed_form_and_monte_carlo_estimate() -> None:
    model = _make().train()
    x = _input()
    out = model(x)
    aux = model.auxiliary_loss()
    assert aux.requires_grad and aux.ndim == 0 and out.requires_grad
    _, mu, logvar = _reference(model, x, eps=None)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    values = x.shape[1] * x.shape[2] * x.shape[3]
    closed = kl_divergence(q, p).sum() / (x.shape[0] * values)
    assert float(closed) > 0.01  # the moments are spread: the comparison is not between two near-zero numbers
    torch.testing.assert_close(aux.double(), TINY["kl_weight"] * closed, rtol=1e-5, atol=0)
    # Monte Carlo: E_q[log q(z) - log p(z)], 4000 samples
    z = q.sample((4000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(dim=(1, 2, 3, 4)) / (x.shape[0] * values)
    se = float(mc.std() / math.sqrt(len(mc)))
    assert abs(float(mc.mean()) - float(aux.detach()) / TINY["kl_weight"]) < 4 * se + 1e-6, (float(mc.mean()), float(aux.detach()), se)
    # the KL's gradient reaches the encoder
    aux.backward()
    assert model.encoder.to_moments.weight.grad.abs().sum() > 0


def test_builder_checks_and_parameter_count() -> None:
    for bad in ({"levels": 0}, {"levels": 6}, {"kl_weight": -1.0}, {"num_feat": 0}, {"scale": 0}, {"channels": True}):
        with pytest.raises(ValueError, match="vae: `"):
            vae.VAE(**{**TINY, **bad})
    with pytest.raises(ValueError, match="multiples of 4"):
        _make().eval()(_input(h=18))
    # the default variant, counted on meta, against the layer sizes written out (3x3 convs with bias)
    conv = lambda cin, cout: cin * cout * 9 + cout  # noqa: E731
    c, w, lat, nb = 3, [32, 64, 128], 64, 2
    want = (conv(c, 32) + conv(32, 64) + conv(64, 128) + 4 * nb * conv(128, 128) + conv(128, 2 * lat)
            + conv(lat, 128) + conv(128, 4 * 64) + conv(64, 4 * 32) + conv(32, c))  # fmt: skip
    with torch.device("meta"):
        got = sum(p.numel() for p in vae.vae().parameters())
    assert got == want == 1_865_251 and len(w) == 3
    assert build_model("vae", scale=1).hparams["kl_weight"] == 1e-3


# --------------------------------------------------------------------------------------------- layouts and files


def test_safetensors_round_trip_detect_and_only_vae_claims(tmp_path: Path) -> None:
    for over in ({}, {"scale": 2, "levels": 1, "num_block": 0}, {"channels": 1, "num_feat": 6, "levels": 3}):
        model = _make(**over).eval()
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        sd = load_file(str(path))
        det = vae.detect(sd)
        assert det is not None
        assert det.hparams == {**TINY, **over, "kl_weight": 1e-3}  # kl_weight is not in the tensors: the default
        loaded = vae.VAE(**det.hparams).eval()
        loaded.load_state_dict(det.state_dict, strict=True)
        x = _input(h=16, w=24, c=model.channels)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        claims = [name for name, a in architectures().items() if a.needs_weights and a.detect(sd) is not None]
        assert claims == ["vae"]
    # a self-describing file keeps kl_weight (a training hyper-parameter)
    desc = build_model("vae", scale=1, num_feat=4, num_block=1, latent_channels=2, kl_weight=0.25)
    save_model(desc, str(tmp_path / "m.safetensors"))
    back = load_model(str(tmp_path / "m.safetensors"))
    assert back.architecture == "vae" and back.hparams["kl_weight"] == 0.25 and back.module.kl_weight == 0.25


def test_detect_refuses_foreign_and_damaged() -> None:
    good = _make().state_dict()
    assert vae.detect(edsr.EDSR(scale=2, n_resblocks=1, n_feats=8).state_dict()) is None
    assert vae.detect({}) is None
    assert vae.detect({k: v for k, v in good.items() if k != "decoder.up.1.bias"}) is None
    assert vae.detect({**good, "decoder.extra.weight": torch.zeros(1)}) is None
    for key in ("encoder.head.weight", "encoder.to_moments.weight", "decoder.tail.weight", "decoder.body.0.conv1.bias"):
        for bad in ("x", torch.tensor(1.0), torch.zeros(0)):
            assert vae.detect({**good, key: bad}) is None, (key, bad)
    assert vae.detect({**good, "decoder.tail.weight": torch.zeros(5, 4, 3, 3)}) is None  # 5 = 3 * s**2 for no s


# --------------------------------------------------------------------------------------- receptive field, tiling


def _measured_radius(model: vae.VAE, size: int = 96) -> int:
    """Largest distance from an output pixel to an input pixel its value depends on (gradient support), over the
    latent grid's phases, far from the borders (float64, eval)."""
    f = 2**model.levels
    model = model.double().eval()
    worst = 0
    for p in range(f):
        x = torch.rand(1, model.channels, size, size, dtype=torch.float64, requires_grad=True)
        c = size // 2 + p
        model(x)[0, :, c, c].sum().backward()
        ys, xs = torch.nonzero(x.grad[0].abs().sum(0) > 0, as_tuple=True)
        worst = max(worst, int((ys - c).abs().max()), int((xs - c).abs().max()))
    model.float()
    return worst


@pytest.mark.parametrize(("levels", "num_block"), [(1, 0), (2, 1), (3, 0)])
def test_receptive_halo_is_the_measured_receptive_field(levels: int, num_block: int) -> None:
    model = _make(levels=levels, num_block=num_block)
    halo = vae.info({**TINY, "levels": levels, "num_block": num_block}).receptive_halo
    size = 4 * halo // 2**levels * 2**levels + 2**levels * 4
    assert _measured_radius(model, size) == halo == vae.receptive_radius(levels, num_block)


def test_tiles_with_the_halo_match_untiled_output() -> None:
    """Crops padded by the halo reproduce the untiled output, by hand and through the inference engine. The convs are
    doubled so that far context is not numerically invisible (at init it fades to ~1e-7 at the halo's edge)."""
    model = _make().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod is not model.encoder.to_moments:
                mod.weight.mul_(2.0)
    info = vae.info(TINY)
    m, halo = info.size_multiple, info.receptive_halo
    pad = math.ceil(halo / m) * m
    start, win = pad + m, 4 * m
    x = _input(n=1, h=2 * start + win, w=2 * start + win, seed=3)
    with torch.no_grad():
        full = model(x)[..., start : start + win, start : start + win]
        crop = x[..., start - pad : start + win + pad, start - pad : start + win + pad]
        tile = model(crop)[..., pad : pad + win, pad : pad + win]
        torch.testing.assert_close(tile, full, rtol=1e-5, atol=1e-5)
        # 8 pixels less context: the tile differs (the comparison can fail)
        c = 2 * m
        short = x[..., start - pad + c : start + win + pad - c, start - pad + c : start + win + pad - c]
        assert (model(short)[..., pad - c : pad - c + win, pad - c : pad - c + win] - full).abs().max() > 1e-3
    # through the inference engine (reflection padding to the multiple, windows aligned to it), 45x37 input; one
    # stride-2 level and no blocks (halo 10), so that an image this small is split into several windows
    small = {**TINY, "levels": 1, "num_block": 0}
    desc = build_model("vae", **small)
    with torch.no_grad():
        for name, t in _make(**small).state_dict().items():
            desc.module.state_dict()[name].copy_(t * (2.0 if name.endswith("weight") else 1.0))
    img = _input(n=1, h=45, w=37, seed=4)
    ref = Upscaler(desc, device="cpu", tiling=TilingConfig(tile=0)).upscale_tensor(img)
    up = Upscaler(desc, device="cpu", tiling=TilingConfig(tile=8, blend=0, batch_size=4))
    out = up.upscale_tensor(img)
    assert up.stats["tiles"] > up.stats["images"] and out.shape == ref.shape == img.shape
    assert float((out - ref).abs().max()) < 1e-5


# ------------------------------------------------------------------------------------------------------- learning


def test_a_few_dozen_steps_on_a_noisy_clean_pair_lower_the_loss() -> None:
    """Adam on pixel L1 + the KL term, one fixed noisy/clean pair: the eval-mode L1 to the clean image falls below
    60% of where it started (an optimiser that never steps leaves it where it was)."""
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    clean = torch.stack([0.2 + 0.6 * xx, 0.5 + 0.3 * torch.sin(6 * yy), 0.8 - 0.5 * xx * yy])[None]
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    torch.manual_seed(0)
    model = vae.VAE(scale=1, channels=3, num_feat=8, levels=2, num_block=1, latent_channels=8, kl_weight=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def eval_l1() -> float:
        with torch.no_grad():
            return float(F.l1_loss(model.eval()(noisy), clean))

    before = eval_l1()
    model.train()
    for _ in range(40):
        loss = F.l1_loss(model(noisy), clean) + model.auxiliary_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_l1()
    assert after < 0.6 * before, (before, after)
