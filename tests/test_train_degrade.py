"""Fast CPU tests of srbatch.train.degrade: small images, seeded generators."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from srbatch.errors import ConfigError
from srbatch.metrics.resize import imresize
from srbatch.train.degrade import (
    PRESET_DEGRADATIONS,
    DegradationConfig,
    _gaussian_kernel,
    degrade,
    degrade_batch,
)

OFF = {"blur_prob": 0.0, "noise_prob": 0.0, "jpeg_prob": 0.0}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(c: int = 3, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    """A smooth gradient plus texture, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 0.2 + 0.6 * (0.5 * xx + 0.5 * yy)
    tex = 0.15 * torch.rand(c, h, w, generator=g) - 0.075
    return (base[None] + tex).clamp(0, 1).to(torch.float32)


def _checkerboard(c: int = 1, n: int = 32) -> torch.Tensor:
    idx = torch.arange(n)
    board = ((idx[:, None] + idx[None, :]) % 2).to(torch.float32)
    return board[None].repeat(c, 1, 1)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_and_classic_off_equal_imresize(scale: int) -> None:
    hr = torch.rand(3, 24, 36, generator=_gen(5))
    hr[:, :, 12:24] = (torch.arange(24) // 12 % 2).to(torch.float32)[None, :, None]  # hard 0/1 edges: overshoot
    raw = imresize(hr, 1 / scale)
    want = raw.clamp(0, 1)
    assert want.shape == (3, 24 // scale, 36 // scale)
    assert raw.min() < 0 and raw.max() > 1  # so the clamp is exercised
    bic = degrade(hr, scale, DegradationConfig(kind="bicubic"), _gen())
    cla = degrade(hr, scale, DegradationConfig(kind="classic", **OFF), _gen())
    assert bic.dtype == torch.float32
    assert torch.equal(bic, want)
    assert torch.equal(cla, want)
    # Float, not quantised to 8 bits.
    assert not torch.allclose(bic * 255, torch.round(bic * 255), atol=1e-3)


@pytest.mark.parametrize("kind", ["bicubic", "classic", "realesrgan"])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("scale", [1, 2, 4])
def test_shapes_and_range(kind: str, c: int, scale: int) -> None:
    hr = _image(c, 32, 24)
    cfg = PRESET_DEGRADATIONS["realesrgan"] if kind == "realesrgan" else DegradationConfig(kind=kind)
    lr = degrade(hr, scale, cfg, _gen(scale * 10 + c))
    assert lr.shape == (c, 32 // scale, 24 // scale)
    assert lr.dtype == torch.float32
    assert torch.isfinite(lr).all()
    assert lr.min() >= 0 and lr.max() <= 1


def test_output_in_unit_range_under_heavy_noise() -> None:
    cfg = DegradationConfig(kind="classic", blur_prob=0, jpeg_prob=0, gaussian_sigma=(60.0, 60.0))
    hr = torch.cat([torch.zeros(3, 16, 32), torch.ones(3, 16, 32)], dim=1)
    lr = degrade(hr, 2, cfg, _gen())
    assert lr.min() == 0 and lr.max() == 1  # clamped, and the noise did reach both ends


@pytest.mark.parametrize("name", ["realesrgan", "mild", "microscopy"])
def test_deterministic_and_seed_sensitive(name: str) -> None:
    cfg = PRESET_DEGRADATIONS[name]
    hr = _image(3, 32, 32)
    a = degrade(hr, 2, cfg, _gen(123))
    b = degrade(hr, 2, cfg, _gen(123))
    c = degrade(hr, 2, cfg, _gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_blur_reduces_high_frequencies() -> None:
    hr = _checkerboard(1, 32)
    cfg = DegradationConfig(kind="classic", blur_sigma=(2.0, 2.0), blur_anisotropic_prob=0, noise_prob=0, jpeg_prob=0)
    out = degrade(hr, 1, cfg, _gen())
    # Energy of the checkerboard's (alternating) component: a sigma-2 Gaussian all but removes it.
    energy_in = (hr - hr.mean()).pow(2).mean()
    energy_out = (out - out.mean()).pow(2).mean()
    assert energy_out < 1e-3 * energy_in
    assert out.mean().item() == pytest.approx(0.5, abs=0.02)  # mean preserved (kernel sums to 1)


def test_tiny_isotropic_blur_is_identity() -> None:
    hr = _checkerboard(3, 24)
    cfg = DegradationConfig(kind="classic", blur_sigma=(0.2, 0.2), blur_anisotropic_prob=0, noise_prob=0, jpeg_prob=0)
    out = degrade(hr, 1, cfg, _gen())
    assert (out - hr).abs().max() < 1e-4


def test_gaussian_kernel_shapes() -> None:
    iso = _gaussian_kernel(21, 2.0, 2.0, 0.0)
    assert iso.sum().item() == pytest.approx(1.0)
    assert torch.allclose(iso, iso.rot90(1, (0, 1)), atol=1e-12)
    aniso = _gaussian_kernel(21, 3.0, 0.8, math.pi / 6)
    assert aniso.sum().item() == pytest.approx(1.0)
    assert (aniso - aniso.rot90(1, (0, 1))).abs().max() > 1e-3
    # Unrotated, the long axis is x: the kernel is wider along columns than along rows.
    flat = _gaussian_kernel(21, 3.0, 0.8, 0.0)
    assert flat[10, 13] > flat[13, 10]


def test_anisotropic_blur_of_a_point_is_not_rotationally_symmetric() -> None:
    hr = torch.zeros(1, 41, 41)
    hr[0, 20, 20] = 1.0
    cfg = DegradationConfig(kind="classic", blur_sigma=(0.5, 3.0), blur_anisotropic_prob=1.0, noise_prob=0, jpeg_prob=0)
    for seed in range(3):
        psf = degrade(hr, 1, cfg, _gen(seed))[0]
        assert psf.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert (psf - psf.rot90(1, (0, 1))).abs().max() > 1e-3


def test_gaussian_noise_std() -> None:
    hr = torch.full((3, 64, 64), 0.5)
    cfg = DegradationConfig(kind="classic", blur_prob=0, jpeg_prob=0, gaussian_sigma=(10.0, 10.0))
    out = degrade(hr, 1, cfg, _gen(3))
    std = (out - hr).std().item()
    assert std == pytest.approx(10 / 255, rel=0.15)
    assert abs((out - hr).mean().item()) < 1e-3


def test_gray_noise_is_the_same_on_every_channel() -> None:
    hr = torch.full((3, 32, 32), 0.5)
    for poisson in (0.0, 1.0):
        cfg = DegradationConfig(
            kind="classic", blur_prob=0, jpeg_prob=0, gray_noise_prob=1.0, poisson_prob=poisson, poisson_scale=(1, 1)
        )
        out = degrade(hr, 1, cfg, _gen(7))
        assert (out - hr).abs().max() > 1e-3
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    colour = DegradationConfig(kind="classic", blur_prob=0, jpeg_prob=0, gray_noise_prob=0.0)
    out = degrade(hr, 1, colour, _gen(7))
    assert not torch.equal(out[0], out[1])


def test_poisson_noise_grows_with_intensity_on_grey_data() -> None:
    # Left half 0.2, right half 0.8, plus one ramp row so the image has 256 distinct 8-bit levels (vals = 256).
    hr = torch.full((1, 64, 256), 0.2)
    hr[:, :, 128:] = 0.8
    hr[:, 0, :] = torch.arange(256) / 255.0
    cfg = DegradationConfig(kind="classic", blur_prob=0, jpeg_prob=0, poisson_prob=1.0, poisson_scale=(1.0, 1.0))
    out = degrade(hr, 1, cfg, _gen(11))
    noise = (out - hr)[0, 1:]
    var_lo = noise[:, :128].var().item()
    var_hi = noise[:, 128:].var().item()
    # Real-ESRGAN convention: var = intensity / vals * scale^2.
    assert var_lo == pytest.approx(0.2 / 256, rel=0.15)
    assert var_hi == pytest.approx(0.8 / 256, rel=0.15)
    assert 3.0 < var_hi / var_lo < 5.0


def test_jpeg_quantises_and_changes_the_image() -> None:
    for c in (1, 3):
        hr = _image(c, 32, 32)
        cfg = DegradationConfig(kind="classic", blur_prob=0, noise_prob=0, jpeg_quality=(10, 10))
        out = degrade(hr, 1, cfg, _gen())
        codes = out * 255
        assert torch.allclose(codes, torch.round(codes), atol=1e-4)
        assert (out - torch.round(hr * 255) / 255).abs().max() > 5 / 255


def test_realesrgan_shapes_for_scale_4_and_1() -> None:
    cfg = PRESET_DEGRADATIONS["realesrgan"]
    hr = _image(3, 48, 64)
    for seed in range(4):  # different draws exercise up/down/keep and both final orders
        assert degrade(hr, 4, cfg, _gen(seed)).shape == (3, 12, 16)
        assert degrade(hr, 1, cfg, _gen(seed)).shape == (3, 48, 64)
    grey = degrade(_image(1, 32, 32), 4, cfg, _gen())
    assert grey.shape == (1, 8, 8)


def test_degrade_batch_draws_differ_per_image() -> None:
    img = _image(3, 32, 32)
    batch = img[None].repeat(3, 1, 1, 1)
    cfg = PRESET_DEGRADATIONS["mild"].model_copy(update={"noise_prob": 1.0})
    out = degrade_batch(batch, 2, cfg, _gen(9))
    assert out.shape == (3, 3, 16, 16)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    assert torch.equal(out, degrade_batch(batch, 2, cfg, _gen(9)))
    # Same as degrading the images one after the other from the same generator.
    g = _gen(9)
    assert torch.equal(out, torch.stack([degrade(x, 2, cfg, g) for x in batch]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("jpeg_quality", (90, 30)),
        ("jpeg_quality", (0, 50)),
        ("blur_sigma", (3.0, 0.2)),
        ("blur_sigma", (0.0, 1.0)),
        ("gaussian_sigma", (-1.0, 5.0)),
        ("poisson_scale", (2.0, 1.0)),
        ("noise_prob", 1.5),
        ("poisson_prob", -0.1),
        ("blur_kernel_size", 20),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        DegradationConfig(kind="classic", **{field: value})


def test_config_is_frozen_and_strict() -> None:
    cfg = DegradationConfig()
    with pytest.raises(ValidationError):
        cfg.kind = "classic"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="blur_sgima"):
        DegradationConfig(blur_sgima=(1, 2))  # type: ignore[call-arg]
    assert DegradationConfig(jpeg_quality=[40, 50]).jpeg_quality == (40, 50)  # YAML lists are accepted


def test_presets() -> None:
    assert set(PRESET_DEGRADATIONS) == {"bicubic", "mild", "microscopy", "realesrgan", "denoise"}
    assert PRESET_DEGRADATIONS["microscopy"].jpeg_prob == 0.0
    assert PRESET_DEGRADATIONS["realesrgan"].kind == "realesrgan"
    grey = _image(1, 32, 32)
    lr = degrade(grey, 2, PRESET_DEGRADATIONS["microscopy"], _gen())
    assert lr.shape == (1, 16, 16)
    # No JPEG: microscopy output is not forced onto the 8-bit grid.
    assert not torch.allclose(lr * 255, torch.round(lr * 255), atol=1e-3)
    den = degrade(_image(3, 32, 32), 1, PRESET_DEGRADATIONS["denoise"], _gen())
    assert den.shape == (3, 32, 32)


def test_bad_inputs_raise_config_error() -> None:
    cfg = DegradationConfig()
    with pytest.raises(ConfigError, match="multiples of scale 4"):
        degrade(torch.rand(3, 30, 32), 4, cfg, _gen())
    with pytest.raises(ConfigError, match="channels"):
        degrade(torch.rand(4, 32, 32), 2, cfg, _gen())
    with pytest.raises(ConfigError, match="float"):
        degrade(torch.zeros(3, 32, 32, dtype=torch.uint8), 2, cfg, _gen())
    with pytest.raises(ConfigError, match="scale"):
        degrade(torch.rand(3, 32, 32), 0, cfg, _gen())
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        degrade_batch(torch.rand(3, 32, 32), 2, cfg, _gen())
