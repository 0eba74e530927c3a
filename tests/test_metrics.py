"""Metrics and resizing against numbers from outside the project: scikit-image and the SelfExSR benchmark tables."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2ycbcr as sk_rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from srbatch.errors import ConfigError
from srbatch.metrics.color import rgb2ycbcr, rgb_to_y, ycbcr2rgb
from srbatch.metrics.quality import measure, psnr, ssim
from srbatch.metrics.resize import imresize, imresize_uint8


def _pair(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max
    a = rng.integers(0, hi + 1, shape, dtype=np.int64)
    b = np.clip(a + rng.integers(-hi // 12, hi // 12, shape), 0, hi)
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("shape", [(48, 37), (40, 33, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_psnr_ssim_match_scikit_image(shape, dtype):
    a, b = _pair(shape, dtype)
    rng = float(np.iinfo(dtype).max)
    kw = {"channel_axis": 2} if len(shape) == 3 else {}
    ref_ssim = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=rng, **kw
    )
    assert ssim(a, b) == pytest.approx(ref_ssim, abs=1e-10)
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=rng), abs=1e-10)


def test_crop_border_and_identity():
    a, b = _pair((30, 30, 3))
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, b, crop_border=4) == pytest.approx(psnr(a[4:-4, 4:-4], b[4:-4, 4:-4]))
    with pytest.raises(ConfigError, match="crop_border"):
        psnr(a, b, crop_border=15)
    with pytest.raises(ConfigError, match="shape"):
        psnr(a, b[:-1])


def test_rgb2ycbcr_matches_scikit_image_and_inverts():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    ours = rgb2ycbcr(torch.from_numpy(img).permute(2, 0, 1).double() / 255) * 255
    ref = sk_rgb2ycbcr(img)  # same BT.601 studio-swing matrix as MATLAB
    np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(rgb_to_y(img, round_output=False), ref[..., 0], atol=1e-9)
    back = ycbcr2rgb(ours / 255) * 255
    np.testing.assert_allclose(back.permute(1, 2, 0).numpy(), img, atol=1e-9)


def test_imresize_properties():
    x = torch.rand(2, 3, 17, 23, dtype=torch.float64)
    assert imresize(x, 2).shape == (2, 3, 34, 46)
    assert imresize(x, 0.5).shape == (2, 3, 9, 12)  # ceil, as MATLAB
    assert imresize(x, output_shape=(5, 7)).shape == (2, 3, 5, 7)
    const = torch.full((1, 10, 13), 0.3, dtype=torch.float64)
    torch.testing.assert_close(imresize(const, 3), torch.full((1, 30, 39), 0.3, dtype=torch.float64))
    torch.testing.assert_close(imresize(const, 1 / 3), torch.full((1, 4, 5), 0.3, dtype=torch.float64))
    # Interpolating kernel: upscaling by an integer keeps... the mean of a smooth ramp and the float32 dtype.
    assert imresize(x.float(), 2).dtype == torch.float32
    with pytest.raises(ConfigError):
        imresize(x)


@pytest.mark.refs
def test_imresize_downscale_matches_benchmark_lr_interior(refs):
    """Set5 LR files were made by the benchmark authors with MATLAB imresize. Away from the 2-pixel border (their
    tool's edge handling differs) our downscale is within one grey level, and equal for most pixels."""
    for s in (2, 3, 4):
        for lr_path in sorted((refs / f"sets/Set5/image_SRF_{s}").glob("*_LR.png")):
            lr = np.array(Image.open(lr_path)).astype(int)
            hr = np.array(Image.open(str(lr_path).replace("_LR", "_HR")))
            ours = imresize_uint8(hr[: lr.shape[0] * s, : lr.shape[1] * s], 1 / s).astype(int)
            d = np.abs(ours - lr)[2:-2, 2:-2]
            assert d.max() <= 2 and (d > 0).mean() < 0.2, (lr_path.name, d.max(), (d > 0).mean())


@pytest.mark.refs
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_reproduces_selfexsr_table_per_image(refs, scale):
    """MATLAB-bicubic upscaling of the official LR files, measured in the paper convention, reproduces the
    benchmark authors' per-image Bicubic PSNR (tables/result_Set5_SRF_*.csv) and the published mean."""
    table = {
        r["image"]: float(r["Bicubic"])
        for r in csv.DictReader(open(refs / f"tables/result_Set5_SRF_{scale}.csv"))
        if r["metric"] == "PSNR"
    }
    ours = {}
    for name in table:
        lr = np.array(Image.open(refs / f"sets/Set5/image_SRF_{scale}/{name}_LR.png").convert("RGB"))
        hr = np.array(Image.open(refs / f"sets/Set5/image_SRF_{scale}/{name}_HR.png").convert("RGB"))
        sr = imresize_uint8(lr, scale)
        ours[name] = measure(sr, hr, crop_border=scale).psnr_y
        assert ours[name] == pytest.approx(table[name], abs=0.02), name
    published = {2: 33.64, 3: 30.39, 4: 28.42}[scale]
    assert np.mean(list(ours.values())) == pytest.approx(published, abs=0.01)
